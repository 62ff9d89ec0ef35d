"""`ptqonnx inspect`: our compile outputs, ONNX Runtime's own quantizers' outputs, KV interfaces, files, CLI.

Expected numbers come from outside inspect: the tiny model's config.json (layer shapes), the protobuf read
with `onnx` (initializer bytes, summed over the tensors each quantized op reads), the file system (sizes),
and the calibration data itself (ORT's MinMax activation scales)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import model_from_text, save
from ptqonnx.cli import main
from ptqonnx.graph import ACTIVATION_MATMUL_REASON
from ptqonnx.inspect import inspect_model

K, N = 64, 32
# y = (x @ w1) @ w2 and z = Gemm(x0, w3ᵀ) + b3: two MatMuls and a transposed Gemm with a bias
LINEAR = f"""<ir_version: 10, opset_import: ["" : 21]>
g (float[B, S, {K}] x, float[B, {K}] x0) => (float[B, S, {N}] y, float[B, {N}] z) {{
  h = MatMul(x, w1)
  y = MatMul(h, w2)
  z = Gemm<transB = 1>(x0, w3, b3)
}}"""


def _float_model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((K, K)), "w2": rng.standard_normal((K, N)), "w3": rng.standard_normal((N, K)),
               "b3": rng.standard_normal(N)}
    return save(model_from_text(LINEAR, {k: v.astype(np.float32) for k, v in weights.items()}), tmp_path / "f.onnx")


def _config(export: Path) -> dict:
    return json.loads((export / "config.json").read_text())


def _expected_linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(K, N) of every linear layer of a LLaMA from its config, LM head included."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    block = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return sorted(block * cfg["num_hidden_layers"] + [(h, cfg["vocab_size"])])


def _read_by(path: Path, ops: dict[str, tuple[int, ...]]) -> set[str]:
    """Names of the initializers that nodes of `ops` read at the given input positions (onnx protobuf)."""
    model = onnx.load(path)
    return {n.input[i] for n in model.graph.node if n.op_type in ops for i in ops[n.op_type] if i < len(n.input)}


def _stored_bytes(path: Path, names: set[str] | None = None, *, dtype: int | None = None) -> tuple[int, int]:
    """(elements, bytes as stored) of the initializers named (or of one data type), from the protobuf."""
    elements = nbytes = 0
    for t in onnx.load(path).graph.initializer:
        if (names is None or t.name in names) and (dtype is None or t.data_type == dtype):
            elements += int(np.prod(t.dims))
            nbytes += len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
    return elements, nbytes


@pytest.fixture(scope="module")
def compiled(tiny_export: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("inspect")
    variants = {
        "rtn": ["--group-size", "32"],
        "asym": ["--group-size", "32", "--asym", "--accuracy-level", "4"],
        "qdq": ["--group-size", "32", "--format", "qdq"],
        "w8": ["--wbits", "8"],
        "emb": ["--group-size", "32", "--quantize-embeddings"],
    }
    paths = {}
    for name, extra in variants.items():
        paths[name] = out / f"{name}.onnx"
        assert main(["-q", "compile", str(tiny_export / "model.onnx"), "-o", str(paths[name]), *extra]) == 0
    return paths


def test_float_export(tiny_export: Path) -> None:
    path = tiny_export / "model.onnx"
    info = json.loads(inspect_model(path).to_json())
    cfg = _config(tiny_export)
    layers = info["linear_layers"]
    assert sorted((layer["K"], layer["N"]) for layer in layers) == _expected_linear_shapes(cfg)
    assert {layer["weight_quant"]["format"] for layer in layers} == {"float"}
    assert all(layer["activations"] is None for layer in layers)
    assert [e["op_type"] for e in info["embeddings"]] == ["Gather"]
    assert (info["embeddings"][0]["V"], info["embeddings"][0]["H"]) == (cfg["vocab_size"], cfg["hidden_size"])
    model = onnx.load(path)
    floats = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert info["summary"]["parameters"] == info["summary"]["float_parameters"] == sum(a.size for a in floats)
    assert info["summary"]["quantized_parameters"] == 0 and info["summary"]["bits_per_weight"] is None
    assert info["files"] == [{"name": "model.onnx", "bytes": path.stat().st_size}]
    assert info["total_bytes"] == path.stat().st_size
    assert [i["name"] for i in info["inputs"]] == ["input_ids"] and info["kv_cache"] is None
    # attention's Q·Kᵀ and P·V in each layer
    assert [s["reason"] for s in info["skipped"]] == [ACTIVATION_MATMUL_REASON] * (2 * cfg["num_hidden_layers"])


def test_kv_cache_interface(tiny_export: Path) -> None:
    cfg = _config(tiny_export)
    kv = inspect_model(tiny_export / "model_kv.onnx").kv_cache
    layers = cfg["num_hidden_layers"]
    assert kv is not None and kv.convention == "optimum / onnxruntime-genai"
    assert kv.layers == layers
    assert kv.past == tuple(f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert kv.present == tuple(f"present.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert kv.missing_present == () and kv.dtype == "FLOAT"
    assert (kv.kv_heads, kv.head_dim) == (cfg["num_key_value_heads"], cfg["head_dim"])
    assert kv.other_inputs == ("input_ids", "attention_mask", "position_ids")


@pytest.mark.parametrize("variant, fmt, dtype, block, zero_point, bits_per_weight", [
    ("rtn", "MatMulNBits", "UINT4", 32, None, 4 + 32 / 32),  # 4-bit codes + one float32 scale per 32
    ("asym", "MatMulNBits", "UINT4", 32, "UINT8", 4 + 32 / 32 + 4 / 32),  # + a 4-bit zero point per block
    ("qdq", "QDQ", "INT4", 32, None, 4 + 32 / 32),
    ("w8", "MatMulNBits", "UINT8", None, None, None),  # per channel, written with kernel-friendly blocks
])
def test_our_outputs(compiled, tiny_export, variant, fmt, dtype, block, zero_point, bits_per_weight) -> None:
    path = compiled[variant]
    info = json.loads(inspect_model(path).to_json())
    cfg = _config(tiny_export)
    layers = info["linear_layers"]
    assert sorted((layer["K"], layer["N"]) for layer in layers) == _expected_linear_shapes(cfg)
    for layer in layers:
        wq = layer["weight_quant"]
        assert (wq["format"], wq["dtype"], wq["zero_point"], wq["scale_dtype"]) == (fmt, dtype, zero_point, "FLOAT")
        assert layer["params"] == layer["K"] * layer["N"]
        if block is not None:
            assert (wq["granularity"], wq["block_size"]) == ("blocked", block)
        if fmt == "QDQ":
            assert wq["axis"] == 0  # blocks along K of W [K, N]
    summary = info["summary"]
    assert summary["quantized_parameters"] == sum(k * n for k, n in _expected_linear_shapes(cfg))
    reads = {"MatMulNBits": (1, 2, 3)} if fmt == "MatMulNBits" else {"DequantizeLinear": (0, 1, 2)}
    assert summary["quantized_bytes"] == _stored_bytes(path, _read_by(path, reads))[1]
    if bits_per_weight is not None:
        assert summary["bits_per_weight"] == pytest.approx(bits_per_weight, rel=1e-12)
    levels = {layer["weight_quant"]["accuracy_level"] for layer in layers}
    acts = [layer["activations"] for layer in layers]
    if variant == "asym":
        assert levels == {4} and all(a["kind"] == "in-kernel" and a["dtype"] == "INT8" for a in acts)
    else:
        assert all(a is None for a in acts)
    # quantized layers leave only the attention MatMuls among the skips
    assert [s["reason"] for s in info["skipped"]] == [ACTIVATION_MATMUL_REASON] * (2 * cfg["num_hidden_layers"])


def test_quantized_embeddings(compiled, tiny_export) -> None:
    path = compiled["emb"]
    info = inspect_model(path)
    cfg = _config(tiny_export)
    (emb,) = info.embeddings
    assert (emb.op_type, emb.V, emb.H, emb.params) == (
        "GatherBlockQuantized", cfg["vocab_size"], cfg["hidden_size"], cfg["vocab_size"] * cfg["hidden_size"])
    assert (emb.weight_quant.bits, emb.weight_quant.block_size, emb.weight_quant.zero_point) == (4, 32, None)
    linear = sum(k * n for k, n in _expected_linear_shapes(cfg))
    assert info.summary.quantized_parameters == linear + emb.params
    reads = {"MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3)}
    quantized = _read_by(path, reads)
    assert info.summary.quantized_bytes == _stored_bytes(path, quantized)[1]
    float_names = {t.name for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert info.summary.float_parameters == _stored_bytes(path, float_names - quantized)[0]
    # the norms' gammas (and the rotary table) are all that stays float
    assert info.summary.float_parameters < 2 * (2 * cfg["num_hidden_layers"] + 1) * cfg["hidden_size"]


def test_ort_matmulnbits_quantizer_output(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    f = _float_model(tmp_path)
    q = MatMulNBitsQuantizer(onnx.load(f), block_size=32, is_symmetric=False)
    q.process()
    q.model.save_model_to_file(str(tmp_path / "nbits.onnx"))
    info = inspect_model(tmp_path / "nbits.onnx")
    by_weight = {layer.weight: layer for layer in info.linear_layers}
    assert {w: (layer.K, layer.N) for w, layer in by_weight.items()} == {"w1_Q4": (K, K), "w2_Q4": (K, N), "w3": (K, N)}
    wq = by_weight["w1_Q4"].weight_quant
    assert (wq.format, wq.bits, wq.block_size, wq.zero_point, wq.scale_dtype, wq.accuracy_level) == (
        "MatMulNBits", 4, 32, "UINT8", "FLOAT", 0)
    assert by_weight["w3"].weight_quant.format == "float"  # ORT's quantizer leaves the Gemm alone
    assert info.summary.quantized_parameters == K * K + K * N
    assert info.summary.bits_per_weight == pytest.approx(4 + 1 + 4 / 32, rel=1e-12)
    assert info.summary.float_parameters == K * N + N

    q = MatMulNBitsQuantizer(onnx.load(f), block_size=32, is_symmetric=True, quant_format=QuantFormat.QDQ)
    q.process()
    q.model.save_model_to_file(str(tmp_path / "qdq.onnx"))
    qdq = [layer for layer in inspect_model(tmp_path / "qdq.onnx").linear_layers if layer.weight_quant.format == "QDQ"]
    assert sorted((layer.K, layer.N) for layer in qdq) == [(K, N), (K, K)]
    for layer in qdq:
        wq = layer.weight_quant
        assert (wq.dtype, wq.granularity, wq.block_size, wq.axis, wq.zero_point) == ("INT4", "blocked", 32, 0, None)


def test_ort_quantize_dynamic_output(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    f = _float_model(tmp_path)
    for name, wtype, per_channel, dtype, granularity in (("int8", QuantType.QInt8, False, "INT8", "per-tensor"),
                                                         ("uint8pc", QuantType.QUInt8, True, "UINT8", "per-channel")):
        out = tmp_path / f"{name}.onnx"
        quantize_dynamic(f, out, weight_type=wtype, per_channel=per_channel)
        info = inspect_model(out)
        assert sorted((layer.K, layer.N) for layer in info.linear_layers) == [(K, N), (K, N), (K, K)]
        for layer in info.linear_layers:
            wq, act = layer.weight_quant, layer.activations
            assert (wq.format, wq.dtype, wq.granularity) == ("MatMulInteger", dtype, granularity)
            assert wq.scale_dtype == "FLOAT"
            assert (act.kind, act.dtype, act.granularity) == ("dynamic", "UINT8", "per-tensor")
        assert info.summary.quantized_parameters == K * K + 2 * K * N
        assert info.summary.float_parameters == N  # the Gemm's bias stays float
        assert not info.skipped


class _Reader:
    """ORT CalibrationDataReader over a fixed list of feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_ort_quantize_static_output(tmp_path: Path, fmt: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    f = _float_model(tmp_path)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, K)).astype(np.float32),
              "x0": rng.standard_normal((1, K)).astype(np.float32)} for _ in range(3)]
    out = tmp_path / f"static_{fmt}.onnx"
    reader = type("R", (_Reader, CalibrationDataReader), {})(feeds)
    quantize_static(f, out, reader, quant_format=getattr(QuantFormat, fmt), per_channel=fmt == "QDQ")
    info = inspect_model(out)
    layers = {layer.K * 1000 + layer.N: layer for layer in info.linear_layers}
    assert sorted((layer.K, layer.N) for layer in info.linear_layers) == [(K, N), (K, N), (K, K)]
    expected = {"QDQ": {"QDQ"}, "QOperator": {"QLinearMatMul", "QGemm"}}[fmt]
    assert {layer.weight_quant.format for layer in info.linear_layers} == expected
    assert {layer.weight_quant.dtype for layer in info.linear_layers} == {"INT8"}
    if fmt == "QDQ":
        assert {layer.weight_quant.granularity for layer in info.linear_layers} == {"per-channel"}
    # the first MatMul reads x: ORT's MinMax grid over the calibration data, int8 [-128, 127]
    x = np.concatenate([fd["x"].ravel() for fd in feeds]).astype(np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255
    act = layers[K * 1000 + K].activations
    assert (act.kind, act.dtype, act.granularity) == ("static", "INT8", "per-tensor")
    assert act.scale == pytest.approx(scale, rel=1e-6)
    assert act.zero_point == round(-128 - lo / scale)
    assert all(layer.activations.kind == "static" for layer in info.linear_layers)


def test_gpt2_style_cache_and_missing_presents(tmp_path: Path) -> None:
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (int64[b, s] input_ids, float[2, b, 3, p, 8] past_0, float[2, b, 3, p, 8] past_1)
      => (float[2, b, 3, t, 8] present_0) {
      present_0 = Identity(past_0)
    }"""
    path = save(onnx.parser.parse_model(text), tmp_path / "gpt2.onnx")
    kv = inspect_model(path).kv_cache
    assert (kv.convention, kv.layers, kv.past, kv.present) == ("GPT-2 (K and V stacked)", 2, ("past_0", "past_1"),
                                                               ("present_0",))
    assert kv.missing_present == ("present_1",) and (kv.kv_heads, kv.head_dim) == (3, 8)
    assert kv.other_inputs == ("input_ids",)


def test_external_data_files(tmp_path: Path) -> None:
    model = onnx.load(_float_model(tmp_path))
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.weights",
              size_threshold=0)
    info = inspect_model(path)
    sizes = {f.name: f.bytes for f in info.files}
    assert sizes == {"m.onnx": path.stat().st_size, "m.weights": (path.parent / "m.weights").stat().st_size}
    assert info.total_bytes == sum(sizes.values())
    assert info.summary.float_parameters == K * K + 2 * K * N + N


def test_cli_json_and_text(compiled, capsys) -> None:
    assert main(["inspect", str(compiled["asym"]), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(inspect_model(compiled["asym"]).to_json())
    assert main(["inspect", str(compiled["asym"])]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text == inspect_model(compiled["asym"]).lines()
    assert text[0].startswith("asym.onnx: IR 10") and "5.12 bits/weight" in text[2]
    assert sum("MatMulNBits, UINT4, blocked 32, zero points UINT8" in line for line in text) == 15
    assert text[-1].startswith(f"not quantizable: 4 {ACTIVATION_MATMUL_REASON}")


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.onnx", "model file not found"),
    (lambda d: d, "is a folder, not a model file"),
    (lambda d: (d / "x.onnx").write_text("not onnx") and d / "x.onnx", "not a readable ONNX model"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys, make, match) -> None:
    assert main(["inspect", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_inspect_does_not_import_onnxruntime() -> None:
    import subprocess
    import sys

    code = "import sys, ptqonnx.inspect; sys.exit('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
