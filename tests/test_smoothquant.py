"""SmoothQuant W8A8: scale formula, activation grids, QDQ numerics in ORT against a numpy fake-quant reference,
encoder-style and tiny-LLaMA graphs end to end, outlier smoothing, skips and config validation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import NameFixPass

from graphs import CALIB_TEXT, model_from_text, ort_int8_kernel_saturates, real_windows, run, run_optimized, save
from ptqonnx.calibration.sources import CalibConfig
from ptqonnx.errors import UserError
from ptqonnx.graph import find_linear_sites
from ptqonnx.numerics.quant import fake_quantize
from ptqonnx.numerics.smoothquant import (
    ActivationQParams, activation_scale, auto_alpha, fake_quantize_activation, fake_quantize_activation_dynamic,
    percentile_absmax, percentile_range, smooth_scales, w8a8_group_error,
)
from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
from ptqonnx.passes.qdq import LowerToQdqPass
from ptqonnx.passes.w8a8 import (
    GEMV_REASON, LM_HEAD_REASON, QuantizeActivationsPass, find_bmm_nodes, lm_head_reason, select_w8a8_sites,
)
from ptqonnx.pipeline import compile_model
from ptqonnx.plan import plan_weights, rtn_solver
from ptqonnx.config import ConfigError, GptqConfig, Recipe, RtnConfig, SmoothQuantConfig, W8A8Config
from ptqonnx.registry import recipe_for
from ptqonnx.runtime.ort import PRECISE_INT8
from ptqonnx.report import ScalesSummary

W8 = RtnConfig(bits=8, group_size=None, symmetric=True)


def _w8a8(method: str = "smoothquant", alpha: float | str = 0.5, **kw) -> Recipe:
    return recipe_for(method, w8a8=True, **({"alpha": alpha} if method == "smoothquant" else {}), **kw)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- numerics -------------------------------------------------------------------------------------------

def test_smooth_scales_formula():
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal(16)).astype(np.float32) * 10
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((4, 16)).astype(np.float32)
    a[3] = 0.0  # dead activation channel
    w1[:, 5], w2[:, 5] = 0.0, 0.0  # dead weight channel
    for alpha in (0.0, 0.5, 0.85, 1.0):
        wmax = np.maximum(np.abs(w1).max(0), np.abs(w2).max(0))
        ref = np.maximum(np.maximum(a, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-5)
        ref[[3, 5]] = 1.0
        np.testing.assert_allclose(smooth_scales(a, [w1, w2], alpha), ref.astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(a, [w1], 1.5)
    with pytest.raises(ValueError, match="K=16"):
        smooth_scales(a, [w1.T], 0.5)


def test_activation_grids_and_percentiles():
    assert activation_scale(-2.54, 1.0) == ActivationQParams(float(np.float32(2.54 / 127)), 0, True)
    qp = activation_scale(-1.0, 3.0, symmetric=False)
    assert qp.signed is False and qp.scale == pytest.approx(4 / 255) and qp.zero_point == 64
    assert activation_scale(0.0, 0.0) == ActivationQParams(1.0, 0, True)
    assert activation_scale(0.5, 2.0, symmetric=False).zero_point == 0  # range always includes 0
    x = np.arange(-500, 501, dtype=np.float32).reshape(-1, 7)[:-1]  # 1001 entries less the last row
    assert percentile_absmax(x, 100.0) == 500.0
    assert percentile_absmax(x, 90.0) == pytest.approx(np.percentile(np.abs(x), 90))
    lo, hi = percentile_range(x, 99.0)
    assert lo == pytest.approx(np.percentile(x, 1)) and hi == pytest.approx(np.percentile(x, 99))
    # ONNX QuantizeLinear rounds half to even and saturates
    q = fake_quantize_activation(np.array([0.5, 1.5, -2.5, 1000.0], np.float32), ActivationQParams(1.0, 0, True))
    np.testing.assert_array_equal(q, [0.0, 2.0, -2.0, 127.0])
    with pytest.raises(ValueError):
        ActivationQParams(0.0, 0, True)


def _outlier_data(seed: int = 0, n: int = 512, k: int = 64, outliers=(3, 17, 40)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, list(outliers)] *= 100.0  # LLM-style outlier channels
    ws = [rng.standard_normal((48, k)).astype(np.float32) * 0.05, rng.standard_normal((32, k)).astype(np.float32)]
    return x, ws


def _sym_grid(amax, sample):
    a = float(np.max(amax))
    return activation_scale(-a, a)


def test_smoothing_reduces_w8a8_error_on_outlier_channels():
    x, ws = _outlier_data()
    amax = np.abs(x).max(0)
    plain = w8a8_group_error(x, ws, np.ones(64, np.float32), _sym_grid(amax, x))
    s = smooth_scales(amax, ws, 0.5)
    smoothed = w8a8_group_error(x, ws, s, _sym_grid(amax / s, x / s))
    assert smoothed < 0.2 * plain, (smoothed, plain)
    alpha, s_auto, errors = auto_alpha(x[:256], ws, amax, _sym_grid)
    assert errors[alpha] == min(errors.values()) and errors[alpha] <= errors[0.5] and 0.0 < alpha < 1.0
    np.testing.assert_array_equal(s_auto, smooth_scales(amax, ws, alpha))
    assert errors[0.0] > 2 * errors[alpha]  # alpha 0 leaves the outliers in the activations


def test_dynamic_activation_fake_quant_per_row_and_block():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 200)).astype(np.float32)
    x[0, 1, 130:] = 0.0  # an all-zero (short) block stays zero
    x[1, 2, 7] = 500.0  # an outlier costs resolution only in its own row and block
    ref = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        for b0 in range(0, 200, 128):
            blk = x[idx][b0:b0 + 128]
            a = np.float32(np.abs(blk).max())
            ref[idx][b0:b0 + 128] = 0.0 if a == 0 else np.rint(blk * (np.float32(127) / a)) * (a / np.float32(127))
    got = fake_quantize_activation_dynamic(x, 128)
    np.testing.assert_array_equal(got, ref)
    assert np.all(got[0, 1, 130:] == 0) and got[1, 2, 7] == 500.0
    assert np.abs(got[1, 2, 128:] - x[1, 2, 128:]).max() <= np.abs(x[1, 2, 128:]).max() / 254 * 1.0001
    with pytest.raises(ValueError, match="block size"):
        fake_quantize_activation_dynamic(x, 0)
    # per row and block beats a static per-tensor grid on token-varying outliers; the group error takes either
    xs, ws = _outlier_data(seed=2, outliers=())
    xs[::7] *= 50.0  # some tokens 50x larger
    ones = np.ones(64, np.float32)
    static = w8a8_group_error(xs, ws, ones, _sym_grid(np.abs(xs).max(0), xs))
    dynamic = w8a8_group_error(xs, ws, ones, lambda v: fake_quantize_activation_dynamic(v, 64))
    assert dynamic < 0.2 * static, (dynamic, static)


# -- QDQ emission in ORT --------------------------------------------------------------------------------

_TWO_LINEAR = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, S, 64] x) => (float[B, S, 48] y, float[B, S, 32] z) { y = MatMul(x, w1) z = MatMul(x, w2) }"""


def _optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("signed", [True, False])
def test_w8a8_qdq_matches_numpy_fake_quant(tmp_path, signed):
    x, ws = _outlier_data(seed=1, n=24, outliers=())
    x = x.reshape(2, 12, 64) * 0.5 + (0.0 if signed else 0.7)  # skewed for the uint8 grid
    proto = model_from_text(_TWO_LINEAR, {"w1": ws[0].T.copy(), "w2": ws[1].T.copy()})
    model = ir.from_proto(proto)
    NameFixPass()(model)
    sites = find_linear_sites(model).sites
    qp = activation_scale(float(x.min()), float(x.max()), symmetric=signed)
    act = QuantizeActivationsPass({s.name: {0: qp} for s in sites})
    LowerToQdqPass(plan_weights(sites, rtn_solver(W8)))(model)
    assert act(model).modified and act.quantized_tensors == 1
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 4  # 1 Q shared, 2 act + 2 weight DQ
    path = tmp_path / "w8a8.onnx"
    ir.save(model, str(path))
    onnx.checker.check_model(str(path))
    xq = fake_quantize_activation(x, qp)
    refs = [xq @ fake_quantize(w, 8, None, True).T for w in ws]
    bound = [np.abs(x - xq).max() * np.abs(fake_quantize(w, 8, None, True)).sum(1) for w in ws]
    for out, ref in zip(run(path, {"x": x}, "disable"), refs):
        assert _rel(out, ref) < 1e-5
    # ORT fuses the uint8 case to MatMulIntegerToFloat; on x86 without VNNI its default u8s8 kernel saturates
    # (io.py's gate says so), so the check runs in its exact kernel there
    exact = PRECISE_INT8 if not signed and ort_int8_kernel_saturates() else None
    for out, ref, b in zip(run(path, {"x": x}, "all", exact), refs, bound):
        assert np.all(np.abs(out - ref) <= b + 1e-4 * np.abs(ref).max())
    if not signed:  # ORT's CPU EP fuses uint8 activations shared by two MatMuls (int8 ones only with one reader)
        assert _optimized_ops(path, tmp_path).count("MatMulIntegerToFloat") == 2


@pytest.mark.parametrize("k", [64, 200])
def test_dynamic_matmulnbits_int8_matches_numpy_fake_quant(tmp_path, k):
    """bits 8, accuracy_level 4: ORT quantizes each activation row per block of K (short last block) to int8."""
    from ptqonnx.passes.matmul_nbits import per_channel_block
    from ptqonnx.methods.w8a8 import DYNAMIC_ACCURACY_LEVEL

    rng = np.random.default_rng(k)
    ws = [rng.standard_normal((48, k)).astype(np.float32) * 0.1, rng.standard_normal((32, k)).astype(np.float32)]
    text = _TWO_LINEAR.replace("64]", f"{k}]")
    model = ir.from_proto(model_from_text(text, {"w1": ws[0].T.copy(), "w2": ws[1].T.copy()}))
    NameFixPass()(model)
    sites = find_linear_sites(model).sites
    assert LowerToMatMulNBitsPass(plan_weights(sites, rtn_solver(W8)), DYNAMIC_ACCURACY_LEVEL)(model).modified
    path = tmp_path / "dyn.onnx"
    ir.save(model, str(path))
    onnx.checker.check_model(str(path))
    x = rng.standard_normal((2, 12, k)).astype(np.float32)
    x[0, 3, 5] = 40.0  # one outlier token
    xq = fake_quantize_activation_dynamic(x, per_channel_block(k))
    refs = [xq @ fake_quantize(w, 8, None, True).T for w in ws]
    for level in ("disable", "all"):
        for out, ref in zip(run(path, {"x": x}, level), refs):
            assert _rel(out, ref) < 2e-5, (level, _rel(out, ref))


def test_gemv_and_lm_head_are_skipped_with_reasons():
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[B, 1, 64] x) => (float[B, 1, 8] logits) { h = MatMul(x, w1)  r = Relu(h)  logits = MatMul(r, w2) }"""
    rng = np.random.default_rng(0)
    model = ir.from_proto(model_from_text(text, {"w1": rng.standard_normal((64, 32)).astype(np.float32),
                                                 "w2": rng.standard_normal((32, 8)).astype(np.float32)}))
    sites = find_linear_sites(model).sites
    chosen, skipped = select_w8a8_sites(sites)
    # a float input (no token ids): its "logits" layer is the output layer, not an LM head
    assert chosen == [] and [s.reason for s in skipped] == [GEMV_REASON, lm_head_reason("output layer")]
    chosen, skipped = select_w8a8_sites(sites, quantize_lm_head=True)
    assert chosen == [sites[1]] and [s.reason for s in skipped] == [GEMV_REASON]  # r's shape is not inferred
    assert not QuantizeActivationsPass({})(model).modified


# -- end to end -----------------------------------------------------------------------------------------

_ENCODER = """<ir_version: 10, opset_import: ["" : 21]>
g (float[1, T, 32] x3) => (float[T, 32] y) {
    shape = Constant<value = int64[2] {-1, 32}>()
    x = Reshape(x3, shape)
    h = LayerNormalization<axis=-1> (x, g1, b1)
    a0 = MatMul(h, w1)
    a1 = Add(a0, c1)
    a = Relu(a1)
    f0 = MatMul(a, w3)
    f = Add(f0, c3)
    e = Gemm<transB=1> (h, w2, c2)
    s = Add(e, f)
    y = LayerNormalization<axis=-1> (s, g2, b2)
}"""


def _encoder(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    g1 = (rng.uniform(0.5, 1.5, 32)).astype(np.float32)
    g1[[2, 9, 20]] *= 60.0  # outlier channels reach the MatMuls through γ, as in real models
    inits = {
        "g1": g1, "b1": rng.standard_normal(32).astype(np.float32) * 0.1,
        "w1": rng.standard_normal((32, 64)).astype(np.float32) * 0.1, "c1": rng.standard_normal(64).astype(np.float32),
        "w3": rng.standard_normal((64, 32)).astype(np.float32) * 0.1, "c3": rng.standard_normal(32).astype(np.float32),
        "w2": rng.standard_normal((32, 32)).astype(np.float32) * 0.1, "c2": rng.standard_normal(32).astype(np.float32),
        "g2": np.ones(32, np.float32), "b2": np.zeros(32, np.float32),
    }
    src = save(model_from_text(_ENCODER, inits), tmp_path / "encoder.onnx")
    x = rng.standard_normal((6, 40, 32)).astype(np.float32)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x3=x)
    return src, npz, x


def _loads_and_runs(path: Path, feeds: dict) -> list[np.ndarray]:
    outs = run_optimized(path, feeds)
    for a, b in zip(outs, run(path, feeds, "disable")):
        assert np.all(np.isfinite(a)) and _rel(a, b) < 1e-2
    return outs


def test_encoder_layernorm_gemm_end_to_end(tmp_path):
    src, npz, x = _encoder(tmp_path)
    feeds = {"x3": x[:1]}
    ref = run(src, feeds, "disable")[0]
    errs = {}
    for name, cfg in {"rtn": _w8a8("rtn"), "sq": _w8a8(), "auto": _w8a8(alpha="auto"),
                      "ort": _w8a8(target="ort-cpu", calib_range="percentile", percentile=99.9)}.items():
        rep = compile_model(src, tmp_path / f"{name}.onnx", cfg, calibration=CalibConfig(npz=npz))
        assert len(rep.quantized) == 3 and not rep.skipped  # MatMul+Add, MatMul+Add after Relu, Gemm
        out = _loads_and_runs(rep.output_path, feeds)[0]
        errs[name] = _rel(out, ref)
        m = onnx.load(str(rep.output_path))
        qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
        assert len(qs) == 2  # h (shared by the MatMul and the Gemm) and relu(a)
        zp_types = {i.data_type for i in m.graph.initializer if i.name.endswith("_act_zero_point")}
        assert zp_types == {onnx.TensorProto.UINT8 if name == "ort" else onnx.TensorProto.INT8}
        if name != "rtn":
            assert rep.summary(ScalesSummary, "smoothquant").folded
    assert errs["sq"] < 0.5 * errs["rtn"] and errs["auto"] <= errs["sq"] * 1.05, errs


def test_encoder_dynamic_and_mixed_activation_scales(tmp_path):
    """--act-scales dynamic: every layer MatMulNBits int8 (Gemm's bias kept), no activation QDQ; --dynamic-layers
    (by weight name): that layer dynamic, the rest static QDQ; both more accurate here than all static."""
    src, npz, x = _encoder(tmp_path)
    feeds = {"x3": x[:1]}
    ref = run(src, feeds, "disable")[0]
    errs = {}
    for name, kw in {"static": {}, "dynamic": dict(act_scales="dynamic"), "mixed": dict(dynamic_layers=("w3",)),
                     "auto": dict(act_scales="dynamic")}.items():
        cfg = _w8a8(target="ort-cpu", alpha="auto" if name == "auto" else 0.5, **kw)
        rep = compile_model(src, tmp_path / f"{name}.onnx", cfg, calibration=CalibConfig(npz=npz))
        assert len(rep.quantized) == 3 and not rep.skipped
        errs[name] = _rel(_loads_and_runs(rep.output_path, feeds)[0], ref)
        nodes = onnx.load(str(rep.output_path)).graph.node
        ops = [n.op_type for n in nodes]
        n_dyn = {"static": 0, "mixed": 1}.get(name, 3)
        assert ops.count("MatMulNBits") == n_dyn and ops.count("QuantizeLinear") == {0: 2, 1: 1, 3: 0}[n_dyn]
        for n in nodes:
            if n.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in n.attribute}
                assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4
        if name == "dynamic":
            assert any(n.op_type == "MatMulNBits" and len(n.input) == 6 and n.input[5] == "c2" for n in nodes)
    assert errs["dynamic"] < errs["static"] and errs["mixed"] < errs["static"] and errs["auto"] <= 1.05 * errs["dynamic"]
    # --exclude by weight-name pattern keeps that layer in float
    cfg = _w8a8(target="ort-cpu", exclude=("w[3]",))
    rep = compile_model(src, tmp_path / "ex.onnx", cfg, calibration=CalibConfig(npz=npz))
    assert len(rep.quantized) == 2 and [s.reason for s in rep.skipped] == ["excluded: matches an exclude pattern"]
    errs["excluded"] = _rel(_loads_and_runs(rep.output_path, feeds)[0], ref)
    assert errs["excluded"] < errs["static"], errs
    with pytest.raises(UserError, match="'nope\\*' matches no W8A8 layer"):
        compile_model(src, tmp_path / "x.onnx", _w8a8(target="ort-cpu", dynamic_layers=("nope*",)),
                      calibration=CalibConfig(npz=npz))


def test_folded_graph_mismatch_refuses_before_quantizing(tmp_path, monkeypatch):
    from ptqonnx.passes.fold_scales import FoldScalesPass

    src, npz, _ = _encoder(tmp_path)
    original = FoldScalesPass._scale_const  # a fold that is 1 % off must be caught, and nothing written
    monkeypatch.setattr(FoldScalesPass, "_scale_const",
                        lambda self, graph, ref, factor: original(self, graph, ref, factor * 1.01))
    with pytest.raises(RuntimeError, match="float model changed"):
        compile_model(src, tmp_path / "q.onnx", _w8a8(), calibration=CalibConfig(npz=npz))
    assert not (tmp_path / "q.onnx").exists()


def _tiny_calib_and_ids(tmp_path: Path, export: Path) -> tuple[CalibConfig, np.ndarray]:
    """4 calibration windows of 32 tokens and one held-out window for a tiny LLaMA export."""
    from ptqonnx.models.tiny import tiny_corpus
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_corpus(600, seed=3)))
    ids = np.array(list(eval_windows(tokenize(" ".join(tiny_corpus(200, seed=77)), load_tokenizer(export)),
                                     32, 1))[0])[None]
    return CalibConfig(text=text, samples=4, seq_len=32), ids


def test_tiny_llama_smoothquant_w8a8(tmp_path, tiny_export):
    calib, ids = _tiny_calib_and_ids(tmp_path, tiny_export)
    src = tiny_export / "model.onnx"
    ref = run(src, {"input_ids": ids})[0]
    mse = {}
    configs = {"bmm": _w8a8(quantize_bmm=True), "rtn": _w8a8("rtn"), "auto": _w8a8(alpha="auto"),
               "ort": _w8a8(target="ort-cpu"), "dynamic": _w8a8(target="ort-cpu", act_scales="dynamic"),
               "mixed": _w8a8(target="ort-cpu", dynamic_layers=("*down_proj*",))}
    for name, cfg in configs.items():
        rep = compile_model(src, tmp_path / f"{name}.onnx", cfg, calibration=calib)
        assert LM_HEAD_REASON in {s.reason for s in rep.skipped} and len(rep.quantized) == 14  # 15 less the LM head
        out = _loads_and_runs(rep.output_path, {"input_ids": ids})[0]
        assert out.shape == ref.shape and _rel(out, ref) < 0.2
        mse[name] = float(np.mean((out - ref) ** 2))
        ops = [n.op_type for n in onnx.load(str(rep.output_path)).graph.node]
        # per layer: ln1 (q/k/v), attention output, ln2 (gate/up), down input; + QKᵀ and PV inputs with bmm;
        # dynamic layers read no QuantizeLinear (MatMulNBits quantizes inside)
        n_q = {"bmm": 8, "dynamic": 0, "mixed": 3}.get(name, 4)
        assert ops.count("QuantizeLinear") == 2 * n_q and ops.count("MatMulNBits") == {"dynamic": 14, "mixed": 2}.get(
            name, 0), (name, ops.count("QuantizeLinear"))
    assert mse["dynamic"] <= mse["ort"] and mse["mixed"] <= 1.05 * mse["ort"], mse
    assert mse["auto"] <= 1.05 * mse["rtn"], mse  # no planted outliers here: auto must at least not hurt
    # uint8 activations: ORT's CPU EP turns all 14 layers (q/k/v and gate/up share a Q) into MatMulIntegerToFloat
    assert _optimized_ops(tmp_path / "ort.onnx", tmp_path).count("MatMulIntegerToFloat") == 14


def _pv_input_scales(path: Path) -> list[tuple[float, float]]:
    """(K's, V's) activation scale per layer: the second inputs of QKᵀ and P·V, as QDQ reads them."""
    dqs = [n.inputs[1].producer() for n in find_bmm_nodes(ir.load(str(path)))]  # weights' DQs too: skipped
    scales = [float(dq.inputs[1].const_value.numpy()) for dq in dqs if dq.inputs[0].const_value is None]
    return list(zip(scales[0::2], scales[1::2]))


def test_tiny_llama_without_gqa_smooths_o_proj_through_v_proj(tmp_path, tiny_mha_export, caplog):
    """kv_heads == heads: o_proj's group is smoothed too (v_proj's columns absorb 1/s): 8 groups, all folded;
    with quantize_bmm, P·V's V holds v / s and is measured again after folding (K is not: same grid as rtn)."""
    calib, ids = _tiny_calib_and_ids(tmp_path, tiny_mha_export)
    src = tiny_mha_export / "model.onnx"
    ref = run(src, {"input_ids": ids})[0]
    bmm_scales = {}
    # the bound was 0.2 when this ran on ORT's signed weight grid (measured 0.186 / 0.095 for smooth / rtn);
    # --target tensorrt now refuses that grid (TensorRT: "Scale coefficients must all be positive"), and the
    # positive grid it writes, one level fewer on some rows, measures 0.209 / 0.096 on this tiny model (which
    # amplifies any change): the bound is re-based on the grid TensorRT runs, 0.25
    grid = dict(target="tensorrt")
    for name, cfg in {"smooth": _w8a8(quantize_bmm=True, **grid),
                      "rtn": _w8a8("rtn", quantize_bmm=True, **grid)}.items():
        with caplog.at_level(logging.INFO, logger="ptqonnx.methods"):
            rep = compile_model(src, tmp_path / f"{name}.onnx", cfg, calibration=calib)
        assert len(rep.quantized) == 14 and _rel(_loads_and_runs(rep.output_path, {"input_ids": ids})[0], ref) < 0.25
        bmm_scales[name] = _pv_input_scales(rep.output_path)
    assert "smoothquant: 8 groups (8 folded, 0 with an inserted Mul)" in caplog.text
    for (k_s, v_s), (k_r, v_r) in zip(bmm_scales["smooth"], bmm_scales["rtn"], strict=True):
        assert abs(k_s / k_r - 1) < 1e-4 and abs(v_s / v_r - 1) > 0.1, (k_s, k_r, v_s, v_r)


# -- configuration --------------------------------------------------------------------------------------

def test_config_validation():
    with pytest.raises(ConfigError, match="smoothquant emits W8A8; add a w8a8 stage"):
        Recipe((SmoothQuantConfig(),))
    with pytest.raises(ConfigError, match="INT8 symmetric per output channel"):
        Recipe((RtnConfig(), W8A8Config()))
    assert Recipe((GptqConfig(bits=8, group_size=None), W8A8Config())).weights.stage == "gptq"  # GPTQ W8 weights
    with pytest.raises(ConfigError, match="target must be one of"):
        Recipe((W8A8Config(),), target="gpu")
    with pytest.raises(ConfigError, match="calib_range must be one of"):
        W8A8Config(calib_range="entropy")
    with pytest.raises(ConfigError, match="percentile"):
        W8A8Config(calib_range="percentile", percentile=101)
    with pytest.raises(ConfigError, match="percentile applies to w8a8.calib_range percentile"):
        W8A8Config(percentile=99.0)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha="best")
    assert _w8a8().needs_calibration and _w8a8("rtn").needs_calibration
    with pytest.raises(ConfigError, match="act_scales must be one of static, dynamic"):
        W8A8Config(act_scales="per-token")
    for kw in (dict(act_scales="dynamic"), dict(dynamic_layers=("*down_proj*",))):  # TensorRT: static only
        with pytest.raises(ConfigError, match="set target ort-cpu"):
            Recipe((W8A8Config(**kw),))
    for kw, msg in ((dict(dynamic_layers=("x",)), "drop one of them"), (dict(quantize_bmm=True), "quantize_bmm"),
                    (dict(calib_range="percentile"), "calib_range")):
        with pytest.raises(ConfigError, match=msg):
            W8A8Config(act_scales="dynamic", **kw)
    mixed = W8A8Config(dynamic_layers=("*down_proj*", "node_linear_3"))
    assert mixed.dynamic("node_linear_6", "model.layers.0.mlp.down_proj.weight") and mixed.dynamic("node_linear_3")
    assert not mixed.dynamic("node_linear_5", "model.layers.0.mlp.up_proj.weight")
    assert W8A8Config(act_scales="dynamic").dynamic("anything")


def test_cli_smoothquant_needs_w8a8(tmp_path, capsys):
    from ptqonnx.cli import main

    src, npz, _ = _encoder(tmp_path)
    assert main(["compile", str(src), "--method", "smoothquant"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ptqonnx compile: error: smoothquant emits W8A8; add --w8a8"]
    assert main(["compile", str(src), "--method", "smoothquant", "--w8a8", "--alpha", "2"]) == 2
    assert main(["compile", str(src), "--method", "smoothquant", "--w8a8", "--alpha", "auto",
                 "--calib-npz", str(npz), "-o", str(tmp_path / "q.onnx")]) == 0
    assert (tmp_path / "q.onnx").is_file()
    capsys.readouterr()
    assert main(["compile", str(src), "--w8a8", "--act-scales", "dynamic", "--calib-npz", str(npz)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT INT8 takes static per-tensor scales" in err[0], err
    assert main(["compile", str(src), "--method", "smoothquant", "--w8a8", "--target", "ort-cpu", "--act-scales",
                 "dynamic", "--calib-npz", str(npz), "-o", str(tmp_path / "d.onnx")]) == 0
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node}


@pytest.mark.slow
def test_smollm2_smoothquant_w8a8(smollm2_export, tmp_path):
    """On the real model: smoothing beats unsmoothed static W8A8 by far (the paper's point), and dynamic
    activation scales on ORT's CPU stay within 2 % of the float perplexity (the issue's target)."""
    from ptqonnx.runtime.perplexity import perplexity

    src = smollm2_export.model_path
    calib = CalibConfig(text=CALIB_TEXT, samples=8)
    windows = real_windows(smollm2_export, 3)
    ppl = {"fp32": perplexity(src, windows).ppl}
    configs = {"plain": _w8a8("rtn"), "smooth": _w8a8(), "dynamic": _w8a8(target="ort-cpu", act_scales="dynamic")}
    for name, cfg in configs.items():
        rep = compile_model(src, tmp_path / f"{name}.onnx", cfg, calibration=calib)
        ppl[name] = perplexity(rep.output_path, windows).ppl
    assert ppl["smooth"] < 0.8 * ppl["plain"], ppl
    assert ppl["dynamic"] <= 1.02 * ppl["fp32"], ppl


# -- --min-levels: layers whose range a few tokens set keep float activations -------------------------------

_SINK = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, S, 32] x) => (float[B, S, 16] y, float[B, S, 16] z) {
    a = MatMul(x, w1) y = Relu(a) t = Tanh(x) b = MatMul(t, w2) z = Relu(b) }"""


def test_token_levels_is_the_median_tokens_share_of_the_grid():
    from ptqonnx.calibration.observers import Stat, TensorObserver
    from ptqonnx.methods.w8a8 import token_levels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[5] *= 300.0  # one sink token
    obs = TensorObserver({Stat.ROW_ABSMAX})
    obs.update(x[:20])
    obs.update(x[20:])
    rows = np.abs(x).max(1)
    assert np.array_equal(obs.finalize().row_absmax, rows)
    assert token_levels(obs.finalize()) == pytest.approx(127 * np.median(rows) / rows.max(), rel=1e-6)


def test_min_levels_keeps_float_activations_where_a_few_tokens_set_the_range(tmp_path):
    """x carries a token 300x the others (the median token would get < 1 level of a per-tensor grid); tanh(x)
    does not. --min-levels 16 keeps the first layer's activation float (INT8 weights), quantizes the second,
    reports it; the default (0) quantizes both."""
    rng = np.random.default_rng(0)
    src = save(model_from_text(_SINK, {"w1": rng.standard_normal((32, 16)).astype(np.float32),
                                       "w2": rng.standard_normal((32, 16)).astype(np.float32)}), tmp_path / "m.onnx")
    x = rng.standard_normal((4, 24, 32)).astype(np.float32)
    x[:, 0] *= 300.0
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibConfig(npz=str(tmp_path / "c.npz"))
    counts = {}
    for levels in (0, 16):
        rep = compile_model(src, tmp_path / f"o{levels}.onnx", _w8a8("rtn", min_levels=levels), calibration=calib)
        ops = [n.op_type for n in onnx.load(str(rep.output_path)).graph.node]
        counts[levels] = ops.count("QuantizeLinear")
        w8a8 = next(s for s in rep.stages if s.stage == "w8a8")
        assert len(rep.quantized) == 2 and ops.count("DequantizeLinear") == 2 + counts[levels]
        if levels:
            assert list(w8a8.token_outliers) == [rep.quantized[0]] and w8a8.token_outliers[rep.quantized[0]] < 1
            assert w8a8.static_layers == 1 and any("--min-levels 0" in line for line in rep.lines())
        else:
            assert not w8a8.token_outliers and w8a8.static_layers == 2
    assert counts == {0: 2, 16: 1}
    with pytest.raises(ConfigError, match="min_levels must be in"):
        _w8a8("rtn", min_levels=200)
    with pytest.raises(ConfigError, match="min_levels picks layers out of static"):
        _w8a8("rtn", min_levels=16, target="ort-cpu", act_scales="dynamic")
