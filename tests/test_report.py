"""`compile --report DIR`: the files, their schema, and the numbers in them recomputed independently —
the weights dequantized from the written MatMulNBits bytes with numpy, the layer inputs from ONNX Runtime
running the float model with those values as extra outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ptqonnx.config import CalibConfig, GptqConfig, RtnConfig, as_recipe
from ptqonnx.errors import UserError
from ptqonnx.pipeline import compile_model
from tests.graphs import activations, float_weights

pytest.importorskip("matplotlib")

CALIB = dict(samples=8, seq_len=32)
PNG = b"\x89PNG\r\n\x1a\n"


def _held_feeds(export: Path, text: Path) -> list[dict[str, np.ndarray]]:
    """The rows the report says it measured on: 4 windows drawn with the calibration seed + 1."""
    from ptqonnx.calibration.sources import calibration_batches

    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    return calibration_batches(CalibConfig(text=text, samples=4, seq_len=32, seed=1), export,
                               [i.name for i in model.graph.input])


def _matmulnbits_weights(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """weight name -> (input value name, W_hat [N, K]) for every 4-bit symmetric MatMulNBits, dequantized with
    numpy from the bytes: low nibble first, zero point 8, one scale per block."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 4 and len(node.input) == 3  # symmetric: no zero points written
        b, scales = inits[node.input[1]], inits[node.input[2]]
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float32)
        s = scales.reshape(n, -1)[:, np.arange(k) // block]
        out[node.input[1].removesuffix("_Q4")] = (node.input[0], (codes - 8.0) * s)
    return out


def _rel_mse(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    got = x.astype(np.float64) @ w_hat.T.astype(np.float64)
    return float(((got - ref) ** 2).sum() / (ref**2).sum())


def test_gptq_report_files_and_numbers(tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    src = tiny_export / "model.onnx"
    recipe = as_recipe(GptqConfig(bits=4, group_size=128), calibration=CalibConfig(text=calib_text, **CALIB))
    report = compile_model(src, tmp_path / "gptq.onnx", recipe, report_dir=tmp_path / "rep")

    files = {p.name for p in report.report_files}
    assert files == {"report.json", "report.md", "layer_error.png", "outliers.png", "sizes.png"}
    for name in ("layer_error.png", "outliers.png", "sizes.png"):
        data = (tmp_path / "rep" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["schema"] == 1
    assert doc["versions"]["onnxruntime"] == ort.__version__ and doc["versions"]["onnx"] == onnx.__version__
    assert list(doc["recipe"]["stages"][0]) == ["gptq"] and doc["recipe"]["calibration"]["samples"] == 8
    assert {"prepare", "gptq", "lowering", "save and checks"} <= set(doc["timings"])
    assert len(doc["stages"][0]["losses"]) == len(doc["quantized"])  # GPTQ's own losses, per weight
    assert "drawn with seed 1 (another draw than calibration's seed 0" in doc["analysis"]
    layers = {m["weight"]: m for m in doc["layers"]}
    assert len(layers) == len(doc["quantized"]) == 15
    assert {m["kind"] for m in layers.values()} == {"q", "k", "v", "o", "gate", "up", "down", "head"}
    assert {m["depth"] for m in layers.values()} == {0, 1, None}

    # every layer's error, recomputed: numpy-dequantized output weights on ORT's float-model inputs (4 windows
    # x 32 tokens = 128 rows, fewer than the 256 the report keeps, so it saw exactly these rows)
    dq, w = _matmulnbits_weights(tmp_path / "gptq.onnx"), float_weights(src)
    acts = activations(src, sorted({x for x, _ in dq.values()}), _held_feeds(tiny_export, calib_text))
    assert set(dq) == set(layers)
    for name, (x, w_hat) in dq.items():
        expected = _rel_mse(acts[x], w[name], w_hat)
        assert layers[name]["on_data"] and layers[name]["rel_mse"] == pytest.approx(expected, rel=1e-4)
        absmax = np.abs(acts[x]).max(axis=0)
        assert layers[name]["outlier_after"] == pytest.approx(absmax.max() / np.median(absmax), rel=1e-5)
        assert layers[name]["outlier_before"] == layers[name]["outlier_after"]  # no float rewrite in gptq

    out = onnx.load(str(tmp_path / "gptq.onnx"))
    assert sum(doc["sizes"].values()) == sum(numpy_helper.to_array(i).nbytes for i in out.graph.initializer)
    assert doc["sizes"]["quantized"] > 0 and doc["sizes"]["embeddings"] > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![per-layer error](layer_error.png)" in md and "model.layers.1.mlp.down_proj.weight" in md


def test_smoothquant_report_shows_the_smoothed_inputs(tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    from ptqonnx.cli import main

    rep = tmp_path / "rep"
    assert main(["-q", "compile", str(tiny_export / "model.onnx"), "-o", str(tmp_path / "sq.onnx"), "--method",
                 "smoothquant", "--w8a8", "--calib-text", str(calib_text), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--report", str(rep)]) == 0
    doc = json.loads((rep / "report.json").read_text())
    layers = {m["weight"]: m for m in doc["layers"]}
    acts = activations(tiny_export / "model.onnx", ["mul_130"], _held_feeds(tiny_export, calib_text))
    absmax = np.abs(acts["mul_130"]).max(axis=0)  # the first norm's output, read by q/k/v of block 0
    q = layers["model.layers.0.self_attn.q_proj.weight"]
    assert q["outlier_before"] == pytest.approx(absmax.max() / np.median(absmax), rel=1e-5)
    assert q["outlier_after"] != q["outlier_before"]  # after folding its scale into the norm
    assert all(m["bits"] == 8 and m["on_data"] and m["act_rel_mse"] is not None for m in layers.values())

    # q_proj's two errors, recomputed from the written file: its smoothed input X_s (ORT, the output model's
    # float value before the QuantizeLinear), that QuantizeLinear's scale, the INT8 weight codes x their scales;
    # the reference is the input model's own q_proj output (the fold is exact: X_s W_s^T = X W^T)
    out = onnx.load(str(tmp_path / "sq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    producer = {o: n for n in out.graph.node for o in n.output}
    mm = next(n for n in out.graph.node if n.op_type == "MatMul" and producer[n.input[1]].op_type == "DequantizeLinear"
              and producer[n.input[1]].input[0].startswith("model.layers.0.self_attn.q_proj.weight"))
    wdq, xdq = producer[mm.input[1]], producer[mm.input[0]]
    qnode = producer[xdq.input[0]]
    w_hat = (inits[wdq.input[0]].astype(np.float64) * inits[wdq.input[1]].astype(np.float64)).T  # [N, K]
    feeds = _held_feeds(tiny_export, calib_text)
    x_s = activations(tmp_path / "sq.onnx", [qnode.input[0]], feeds)[qnode.input[0]].astype(np.float64)
    src = onnx.load(str(tiny_export / "model.onnx"))
    q_out = next(n.output[0] for n in src.graph.node if n.op_type == "MatMul" and n.input[0] == "mul_130"
                 and n.input[1] == "model.layers.0.self_attn.q_proj.weight")  # stored [K, N]
    ref = activations(tiny_export / "model.onnx", [q_out], feeds)[q_out].astype(np.float64)
    scale, zp = float(inits[qnode.input[1]]), int(inits[qnode.input[2]]) if len(qnode.input) > 2 else 0
    x_q = (np.clip(np.rint(x_s / np.float32(scale)) + zp, -128, 127) - zp) * np.float32(scale)
    mse = lambda y: float(((y - ref) ** 2).sum() / (ref**2).sum())  # noqa: E731
    assert q["rel_mse"] == pytest.approx(mse(x_s @ w_hat.T), rel=1e-3)
    assert q["act_rel_mse"] == pytest.approx(mse(x_q @ w_hat.T), rel=1e-3)
    assert q["act_rel_mse"] > q["rel_mse"]
    assert "## Activation outliers" in (rep / "report.md").read_text()


def test_data_free_report(tiny_export: Path, tmp_path: Path) -> None:
    """RTN without calibration data: the weight-space error, said so; no outlier profile."""
    src = tiny_export / "model.onnx"
    report = compile_model(src, tmp_path / "rtn.onnx", RtnConfig(bits=4, group_size=128), report_dir=tmp_path / "r")
    dq, w = _matmulnbits_weights(tmp_path / "rtn.onnx"), float_weights(src)
    assert "no calibration data" in report.analysis
    assert {p.name for p in report.report_files} == {"report.json", "report.md", "layer_error.png", "sizes.png"}
    for m in report.layers:
        w_hat = dq[m.weight][1]
        ref = w[m.weight].astype(np.float64)
        expected = float(((w_hat - ref) ** 2).sum() / (ref**2).sum())
        assert not m.on_data and m.outlier_after is None
        assert m.rel_mse == pytest.approx(expected, rel=1e-5)


def test_report_folder_refusals(tiny_export: Path, calib_text: Path, tmp_path: Path, capsys) -> None:
    from ptqonnx.cli import main

    src, out, rep = str(tiny_export / "model.onnx"), str(tmp_path / "o.onnx"), tmp_path / "rep"
    (tmp_path / "afile").write_text("x")
    assert main(["-q", "compile", src, "-o", out, "--report", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()  # refused before any work
    # rtn takes calibration flags when a report will use them, and refuses them otherwise
    assert main(["-q", "compile", src, "-o", str(tmp_path / "x.onnx"), "--calib-text", str(calib_text)]) == 2
    assert "needs no calibration data" in capsys.readouterr().err
    assert main(["-q", "compile", src, "-o", out, "--calib-text", str(calib_text), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--report", str(rep)]) == 0
    assert "no method read calibration data" in json.loads((rep / "report.json").read_text())["analysis"]
    capsys.readouterr()
    with pytest.raises(UserError, match="already holds a report"):
        compile_model(src, tmp_path / "p.onnx", RtnConfig(bits=4), report_dir=rep)
    assert main(["-q", "compile", src, "-o", out, "--report", str(rep), "--force"]) == 0


def test_layer_position_names() -> None:
    from ptqonnx.analysis import layer_position

    assert layer_position("/model/layers.3/mlp/down_proj/MatMul") == (3, "down")
    assert layer_position("node_linear_7", "model.layers.12.self_attn.o_proj.weight") == (12, "o")
    assert layer_position("/transformer/h.0/attn/c_attn/Gemm") == (0, "qkv")
    assert layer_position("/transformer/h.11/mlp/c_proj/Gemm") == (11, "down")
    assert layer_position("/bert/encoder/layer.2/attention/output/dense/MatMul") == (2, "o")
    assert layer_position("/bert/encoder/layer.2/output/dense/MatMul") == (2, "down")
    assert layer_position("/lm_head/MatMul") == (None, "head")
    assert layer_position("/graph.3/x") == (None, "other")
