"""Mixed precision under `--budget-bits`: the size reached, counted from the written bytes, stays within the
budget; the ranking is the RTN error recomputed independently; the written recipe compiles the same bytes;
the raised layers are 8-bit MatMulNBits / per-channel INT8 DQ that ORT runs and TensorRT-RTX parses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptqonnx.config import ConfigError, GptqConfig, RtnConfig
from tests.graphs import compile_cli, held_out_ids, prefill_logits, rel_error

CALIB = ["--calib-samples", "8", "--calib-seq-len", "32"]


def _bits_per_weight(path: Path) -> tuple[float, dict[str, int]]:
    """(bits per weight of the MatMulNBits layers from the bytes written: codes, scales, zero points; the bits
    of each layer by its weight name)."""
    model = onnx.load(str(path))
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in model.graph.initializer}
    stored = weights = 0
    bits = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            stored += 8 * sum(sizes[n] for n in node.input[1:] if n)
            weights += attrs["N"] * attrs["K"]
            bits[node.input[1].rsplit("_Q", 1)[0]] = attrs["bits"]
    return stored / weights, bits


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_budget_is_met_and_helps(method: str, tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    src = tiny_export / "model.onnx"
    calib = ["--calib-text", str(calib_text), *CALIB]
    uniform = compile_cli(src, tmp_path / "u.onnx", "--method", method, *(calib if method == "gptq" else []))
    mixed = compile_cli(src, tmp_path / "m.onnx", "--method", method, "--budget-bits", "5", *calib)
    grid, bits0 = _bits_per_weight(uniform)
    reached, bits = _bits_per_weight(mixed)
    assert set(bits0.values()) == {4}
    assert grid < reached <= 5.0  # measured from the bytes, not from the report
    raised = sorted(n for n, b in bits.items() if b == 8)
    assert raised and len(raised) < len(bits)
    recipe = (tmp_path / "m.recipe.yaml").read_text()
    assert "high_bits: [" in recipe and "budget_bits: null" in recipe
    # the written recipe is the whole choice: compiled again, the same bytes
    again = compile_cli(src, tmp_path / "again.onnx", "--recipe", str(tmp_path / "m.recipe.yaml"))
    assert again.read_bytes() == mixed.read_bytes()
    ids = held_out_ids(tiny_export)
    ref = prefill_logits(src, ids)
    assert rel_error(prefill_logits(mixed, ids), ref) < rel_error(prefill_logits(uniform, ids), ref)


def _rtn(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """numpy RTN on ONNX Runtime's symmetric grid: each block's signed extreme on code -2^(b-1), round half
    away from zero, codes clipped to [-2^(b-1), 2^(b-1) - 1]."""
    n, k = w.shape
    blocks = w.reshape(n, -1, block).astype(np.float64)
    ext = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    s = np.where(ext == 0, 1.0, ext / -(2 ** (bits - 1)))
    r = blocks / s
    q = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * s).reshape(n, k)


def test_budget_ranking_is_the_rtn_error(tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    """Every layer's ranking number recomputed: numpy RTN W4 (one block: K <= 128) and W8 per channel, output
    error on ORT's rows of the layer's input (4 x 32 calibration tokens: all of them are in the statistics'
    1024-row sample); the greedy choice on those numbers and MatMulNBits' stored sizes is the one made."""
    from ptqonnx.calibration.sources import calibration_batches
    from ptqonnx.config import CalibConfig, as_recipe
    from ptqonnx.pipeline import compile_model
    from ptqonnx.report import BudgetSummary
    from tests.graphs import activations, float_weights

    src = tiny_export / "model.onnx"
    calib = CalibConfig(text=calib_text, samples=4, seq_len=32)
    recipe = as_recipe(RtnConfig(bits=4, group_size=128, budget_bits=4.8), calibration=calib)
    report = compile_model(src, tmp_path / "b.onnx", recipe, calibration=calib, sensitivity=True)
    summary = report.summary(BudgetSummary)
    assert summary is not None and summary.grid_bits < summary.bits_per_weight <= 4.8
    assert set(summary.high) == set(report.recipe.weights.high_bits)

    model = onnx.load(str(src))
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    inputs = {n.name: n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    feeds = calibration_batches(calib, tiny_export, [i.name for i in model.graph.input])
    w = float_weights(src)
    names = {layer: transposed.get(weight_of[layer], weight_of[layer]) for layer in summary.errors}
    x = activations(src, sorted({inputs[layer] for layer in summary.errors}), feeds)
    costs = {}
    for layer, weight in names.items():
        ww = w[weight].astype(np.float64)
        xs = x[inputs[layer]].astype(np.float64)
        ref = xs @ ww.T
        err = {b: float((((xs @ _rtn(ww, b, ww.shape[1] if b == 8 else min(128, ww.shape[1])).T) - ref) ** 2).sum()
                        / (ref**2).sum()) for b in (4, 8)}
        assert summary.errors[layer] == pytest.approx(err[4], rel=1e-3)
        ranked = next(c for c in report.sensitivity if c.name == layer)  # --sensitivity: the same measurement
        assert (ranked.base_error, ranked.high_error) == pytest.approx((err[4], err[8]), rel=1e-3)
        k, nk = ww.shape[1], ww.size
        blocks = -(-k // 128)  # MatMulNBits writes g128, and a per-channel weight as blocks of 128
        costs[layer] = (err[4] - err[8]) / (nk * (8 + blocks * 32 / k - 4 - blocks * 32 / k)), nk
    total = sum(nk for _, nk in costs.values())
    spent = sum(nk * (4 + -(-w[names[layer]].shape[1] // 128) * 32 / w[names[layer]].shape[1])
                for layer, (_, nk) in costs.items())
    chosen = []
    for layer in sorted(costs, key=lambda n: costs[n][0], reverse=True):
        if spent + 4 * costs[layer][1] <= 4.8 * total:
            chosen.append(layer)
            spent += 4 * costs[layer][1]
    assert sorted(chosen) == sorted(summary.high)
    assert summary.bits_per_weight == pytest.approx(spent / total)
    errors = [c.base_error for c in report.sensitivity]
    assert errors == sorted(errors, reverse=True) and len(errors) == len(summary.errors)


def test_sensitivity_flag_prints_the_ranking(tiny_export: Path, calib_text: Path, tmp_path: Path, capsys) -> None:
    """`compile --sensitivity` (rtn, with calibration flags): one line per layer, largest error first, the same
    numbers report.json holds."""
    import json

    from ptqonnx.cli import main

    assert main(["-q", "compile", str(tiny_export / "model.onnx"), "-o", str(tmp_path / "s.onnx"), "--sensitivity",
                 "--calib-text", str(calib_text), *CALIB, "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("sensitivity (relative output MSE of RTN on"))
    rows = [line.split() for line in out[start + 2:] if line.startswith("  ") and line.split()[0].isdigit()]
    ranked = json.loads((tmp_path / "rep" / "report.json").read_text())["sensitivity"]["layers"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Sensitivity" in md and f"| 1 | `{ranked[0]['name']}` |" in md
    assert [r[1] for r in rows] == [c["name"] for c in ranked] and len(rows) == len(ranked) > 10
    assert [float(r[3]) for r in rows] == pytest.approx([c["base_error"] for c in ranked], rel=1e-2)
    assert all(a["base_error"] >= b["base_error"] for a, b in zip(ranked, ranked[1:]))


@pytest.mark.parametrize("fixture", ["optimum_llama", "optimum_gpt2", "genai_llama"])
def test_max_size_mb_holds_on_other_exporters_files(fixture: str, calib_text: Path, tmp_path: Path) -> None:
    """Files we did not export (intermediate values unshaped until shape inference adds value_info, Constant
    nodes, external data): at three sizes between the uniform grid's and all-8-bit, every written file
    (its bytes on disk) is within the budget, and `io.predicted_file_bytes` bounds each written file from
    above."""
    import onnx_ir as ir

    from ptqonnx.io import file_bytes, predicted_file_bytes

    src = Path(__file__).parent / "fixtures" / fixture / "model.onnx"
    calib = ["--calib-text", str(calib_text), *CALIB]
    uniform = compile_cli(src, tmp_path / "u" / "model.onnx", *calib[:0])
    full = compile_cli(src, tmp_path / "f" / "model.onnx", "--budget-bits", "8.4", *calib)
    lo, hi = file_bytes(uniform), file_bytes(full)
    written = [uniform, full]
    for i, frac in enumerate((0.5, 0.7, 0.9)):
        limit = round((lo + frac * (hi - lo)) / 2**20, 4)
        out = compile_cli(src, tmp_path / f"m{i}" / "model.onnx", "--max-size-mb", str(limit), *calib)
        assert file_bytes(out) <= limit * 2**20, (frac, file_bytes(out), limit * 2**20)
        written.append(out)
    for path in written:
        assert predicted_file_bytes(ir.load(path)) >= file_bytes(path)


def test_max_size_mb_is_met(tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    """--max-size-mb N: the written file (its bytes on disk) is within N MiB, layers were raised above the
    uniform grid's size, the plan's estimate of the file is close to what was written, and the recipe holds
    the choice (compiled again: the same bytes)."""
    from ptqonnx.cli import main

    src = tiny_export / "model.onnx"
    calib = ["--calib-text", str(calib_text), *CALIB]
    uniform = compile_cli(src, tmp_path / "u.onnx", "--method", "gptq", *calib).stat().st_size
    full = compile_cli(src, tmp_path / "f.onnx", "--method", "gptq", "--budget-bits", "8.4", *calib).stat().st_size
    limit = (uniform + full) / 2 / 2**20
    out = compile_cli(src, tmp_path / "m.onnx", "--method", "gptq", "--max-size-mb", f"{limit:.4f}", *calib)
    size = out.stat().st_size
    assert uniform < size <= round(limit, 4) * 2**20
    _, bits = _bits_per_weight(out)
    assert 0 < sum(b == 8 for b in bits.values()) < len(bits)
    recipe = (tmp_path / "m.recipe.yaml").read_text()
    assert "high_bits: [" in recipe and "max_size_mb: null" in recipe
    again = compile_cli(src, tmp_path / "again.onnx", "--recipe", str(tmp_path / "m.recipe.yaml"))
    assert again.read_bytes() == out.read_bytes()
    # below the uniform grid's own size: one line naming the smallest size that fits
    assert main(["-q", "compile", str(src), "-o", str(tmp_path / "x.onnx"), "--max-size-mb",
                 f"{uniform / 2**20 * 0.9:.4f}"]) == 2


def test_budget_refusals(tiny_export: Path, capsys) -> None:
    from ptqonnx.cli import main

    src = str(tiny_export / "model.onnx")
    assert main(["-q", "compile", src, "-o", "/nonexistent/x.onnx", "--budget-bits", "4.1"]) == 2
    err = capsys.readouterr().err
    assert "below the" in err and "bits per weight the grid alone takes" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="8-bit weights"):
        RtnConfig(bits=8, budget_bits=8.2)
    with pytest.raises(ConfigError, match="between"):
        GptqConfig(bits=4, budget_bits=3.5)
    with pytest.raises(ConfigError, match="give one of them"):
        RtnConfig(bits=4, budget_bits=4.5, high_bits=("a",))
    with pytest.raises(ConfigError, match="two budgets"):
        RtnConfig(bits=4, budget_bits=4.5, max_size_mb=100)
    with pytest.raises(ConfigError, match="8-bit weights"):
        RtnConfig(bits=8, max_size_mb=100)
    with pytest.raises(ConfigError, match="positive size"):
        RtnConfig(bits=4, max_size_mb=0)
    assert main(["-q", "compile", src, "-o", "/nonexistent/x.onnx", "--max-size-mb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "MiB the grid alone writes" in err and "pass at least" in err and err.count("\n") == 1
    assert main(["-q", "compile", src, "-o", "/nonexistent/x.onnx", "--max-size-mb", "100",
                 "--quantize-embeddings"]) == 2
    err = capsys.readouterr().err
    assert "does not count quantized embeddings" in err and err.count("\n") == 1


def test_budget_tensorrt_form_parses(tiny_export: Path, calib_text: Path, tmp_path: Path) -> None:
    """INT4 blocked DQ with the raised layers as per-channel INT8 DQ: the target's rules pass (checked before
    the write) and TensorRT-RTX parses and builds it where installed."""
    out = compile_cli(tiny_export / "model.onnx", tmp_path / "t.onnx", "--target", "tensorrt", "--group-size", "64",
                      "--budget-bits", "5", "--calib-text", str(calib_text), *CALIB)
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    types = {inits[n.input[0]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear"
             and n.input[0] in inits}
    assert types == {onnx.TensorProto.INT4, onnx.TensorProto.INT8}
    from ptqonnx.runtime.tensorrt import parse_onnx, tensorrt_available

    if tensorrt_available():
        assert parse_onnx(out).ok


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 64), (3, True, 128), (8, True, None),
                                                  (4, True, 256)])
@pytest.mark.parametrize("k", [200, 576])
def test_stored_bits_are_the_written_bytes(k: int, bits: int, symmetric: bool, group, fmt: str,
                                           tmp_path: Path) -> None:
    """The budget's cost of a layer equals the bytes the lowering writes (codes padded to whole blocks,
    scales, zero points padded per row), for K that no block divides, asymmetric, 3-bit and per channel."""
    from ptqonnx.budget import stored_bits
    from ptqonnx.config import as_recipe
    from ptqonnx.pipeline import compile_model
    from tests.graphs import linear_model, save

    n = 48
    src = save(linear_model(k, n)[0], tmp_path / "m.onnx")
    cfg = RtnConfig(bits=bits, group_size=group, symmetric=symmetric)
    compile_model(src, tmp_path / "q.onnx", as_recipe(cfg, format=fmt))
    model = onnx.load(str(tmp_path / "q.onnx"))
    float_inputs = {i.name for i in model.graph.input}
    written = 0
    for init in model.graph.initializer:
        if init.name in float_inputs:
            continue
        arr = numpy_helper.to_array(init)
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            written += 4 * arr.size + (4 if arr.size % 2 else 0)  # two codes per byte
        else:
            written += 8 * arr.nbytes
    assert written == pytest.approx(stored_bits(cfg, k, 32, fmt) * n * k, abs=8)
