"""ptqonnx.check: one tiny graph per rule, each breaking exactly that rule, and compliant graphs that break none.

`CASES` also records what TensorRT-RTX 1.7 does with each TensorRT graph (`trt`); tests/test_tensorrt.py
runs the real parser/builder on them where tensorrt_rtx is installed. For the ONNX Runtime rules the
reference is ONNX Runtime itself: every graph with an `ort-cpu` error is refused by an ORT CPU session.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from graphs import model_from_text
from ptqonnx.check import TARGETS, Finding, check_model, errors, format_findings

RNG = np.random.default_rng(0)


def _codes(shape, dtype, lo=-8, hi=8):
    return RNG.integers(lo, hi, shape).astype(dtype)


def _scales(shape, dtype=np.float32):
    return ((RNG.random(shape) + 0.1) * 0.01).astype(dtype)


def linear(K, N, w, ws, *, dq="<axis = 1>", wz=None, act=None, dtype="float", opset=21, ir_version=10):
    """x [B, S, K] (optionally through an activation Q/DQ pair `act` = (scale, zero point)) @ DQ(w) -> y."""
    winputs = "w, ws, wz" if wz is not None else "w, ws"
    pair = "[x_q] xq = QuantizeLinear(x, xs, xz)\n  [x_dq] xd = DequantizeLinear(xq, xs, xz)" if act else ""
    text = f"""<ir_version: {ir_version}, opset_import: ["" : {opset}]>
    g ({dtype}[B, S, {K}] x) => ({dtype}[B, S, {N}] y) {{
      {pair}
      [w_dq] wd = DequantizeLinear {dq} ({winputs})
      [mm] y = MatMul({'xd' if act else 'x'}, wd)
    }}"""
    inits = {"w": w, "ws": ws, **({"wz": wz} if wz is not None else {})}
    if act:
        inits.update(xs=act[0], xz=act[1])
    return text, inits


ACT8 = (np.array(0.05, np.float32), np.array(0, np.int8))
W8 = _codes((64, 32), np.int8, -127, 128)
S8 = _scales(32)
W4 = _codes((256, 32), ml_dtypes.int4)
S4 = _scales((2, 32))  # block 128 along K


@dataclass(frozen=True)
class Case:
    id: str
    graph: tuple[str, dict]
    expect: list[tuple[str, str, str]]  # (rule, severity, node), in order
    target: str = "tensorrt"
    trt: str = "builds"  # TensorRT-RTX 1.7.1.116: "builds", "parse-error: <text>" or "build-error: <text>"
    ort_refusal: str | None = None  # ort-cpu cases: the error an ORT CPU session gives (None: it runs)


def _neg(s):
    s = s.copy()
    s[::2] *= -1
    return s


def _edit(graph, old, new):
    return graph[0].replace(old, new), graph[1]


def _with(s, i, v):
    s = s.copy()
    s.flat[i] = v
    return s


MNB_TEXT = """<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>
g ({t}[B, S, {K}] x) => ({t}[B, S, {N}] y) {{
  [mnb] y = com.microsoft.MatMulNBits <{attrs}> ({inputs})
}}"""


def mnb(*, K=64, N=32, bits=4, bs=32, t="float", attrs=None, b=None, scales=None, zp=None):
    kb = -(-K // bs)
    attrs = attrs if attrs is not None else f"K = {K}, N = {N}, bits = {bits}, block_size = {bs}"
    st = np.float16 if t == "float16" else np.float32
    inits = {"b": b if b is not None else _codes((N, kb, bs * bits // 8), np.uint8, 0, 256),
             "sc": scales if scales is not None else _scales((N, kb), st)}
    if zp is not None:
        inits["zp"] = zp
    inputs = "x, b, sc" + (", zp" if zp is not None else "")
    return MNB_TEXT.format(t=t, K=K, N=N, attrs=attrs, inputs=inputs), inits


FP16_W8 = linear(64, 32, W8, S8.astype(np.float16), dtype="float16")
CASES = [
    # ---- TensorRT
    Case("opset", linear(64, 32, W8, S8, act=ACT8, opset=25), [("trt-opset", "warning", "<model>")]),
    Case("domain", mnb(), [("trt-domain", "error", "mnb")], trt="parse-error: input tensor A must be FP16"),
    Case("fp32-graph", ("""<ir_version: 10, opset_import: ["" : 21]>
         g (float[B, S, 64] x) => (float[B, S, 32] y) { [mm] y = MatMul(x, w) }""",
                        {"w": RNG.standard_normal((64, 32)).astype(np.float32)}),
         [("trt-fp32-graph", "warning", "<model>")]),
    Case("qdq-type-uint4", linear(256, 32, _codes((256, 32), ml_dtypes.uint4, 0, 16), S4,
                                  dq="<axis = 0, block_size = 128>"),
         [("trt-qdq-type", "error", "w_dq")], trt="parse-error: Failed to import initializer"),
    Case("qdq-type-uint8-act", linear(64, 32, W8, S8, act=(ACT8[0], np.array(0, np.uint8))),
         [("trt-qdq-type", "error", "x_q"), ("trt-qdq-type", "error", "x_dq")]),
    Case("zero-point", linear(64, 32, W8, S8, wz=np.full(32, 2, np.int8)),
         [("trt-zero-point", "error", "w_dq")], trt="parse-error: Non-zero zero point is not supported"),
    Case("sub-byte-odd", linear(3, 5, _codes((3, 5), ml_dtypes.float4_e2m1fn, -2, 2), np.array(0.5, np.float32),
                                dq="", opset=23, ir_version=11),
         [("trt-sub-byte-odd", "error", "w_dq")], trt="build-error: odd tensor volume"),
    Case("int4-activation", ("""<ir_version: 10, opset_import: ["" : 21]>
         g (float[1, 4, 64] x) => (float[1, 4, 64] y) {
           [x_q] xq = QuantizeLinear <axis = 2, block_size = 64, output_dtype = 22> (x, xs)
           [x_dq] y = DequantizeLinear <axis = 2, block_size = 64> (xq, xs)
         }""", {"xs": _scales((1, 4, 1))}),
         [("trt-int4-weight-only", "error", "x_q")]),
    Case("int4-w4a8", linear(256, 32, W4, S4, dq="<axis = 0, block_size = 128>", act=ACT8),
         [("trt-int4-weight-only", "error", "mm")], trt="build-error: CHECK(is_constant()) failed"),
    Case("scale-computed", ("""<ir_version: 10, opset_import: ["" : 21]>
         g (float[B, S, 64] x, float xs) => (float[B, S, 32] y) {
           [x_q] xq = QuantizeLinear(x, xs, xz)
           [x_dq] xd = DequantizeLinear(xq, xs, xz)
           [mm] y = MatMul(xd, w)
         }""", {"xz": ACT8[1], "w": RNG.standard_normal((64, 32)).astype(np.float32)}),
         [("trt-scale-constant", "error", "x_q"), ("trt-scale-constant", "error", "x_dq")]),
    Case("scale-negative", linear(64, 32, W8, _neg(S8), act=ACT8), [("trt-scale-positive", "error", "w_dq")],
         trt="parse-error: Scale coefficients must all be positive"),
    Case("scale-zero", linear(64, 32, W8, _with(S8, 3, 0.0), act=ACT8), [("trt-scale-positive", "error", "w_dq")],
         trt="parse-error: Scale coefficients must all be positive"),
    Case("scale-nan", linear(64, 32, W8, _with(S8, 3, np.nan), act=ACT8), [("trt-scale-positive", "error", "w_dq")],
         trt="parse-error: Scale coefficients must all be positive"),
    Case("scale-inf", linear(64, 32, W8, _with(S8, 3, np.inf), act=ACT8), [("trt-scale-positive", "error", "w_dq")]),
    Case("scale-negative-int4", linear(256, 32, W4, _neg(S4), dq="<axis = 0, block_size = 128>"),
         [("trt-scale-positive", "error", "w_dq")]),  # the 1.7 parser lets INT4 through (allowNegativeScale)
    Case("dq-output-dtype-int4", linear(256, 32, W4, S4, dq="<axis = 0, block_size = 128, output_dtype = 10>",
                                        dtype="float16", opset=23),
         [("trt-dq-output-dtype", "error", "w_dq")], trt="build-error: No matching rules found"),
    Case("dq-output-dtype-int8", linear(64, 32, W8, S8, dq="<axis = 1, output_dtype = 10>", dtype="float16", opset=23),
         [("trt-dq-output-dtype", "warning", "w_dq")]),
    Case("per-channel-axis", linear(64, 32, W8, _scales(16)), [("trt-per-channel-axis", "error", "w_dq")],
         trt="parse-error: The number of scales is not equal to the number of output channels"),
    Case("per-channel-activation", ("""<ir_version: 10, opset_import: ["" : 21]>
         g (float[B, S, 64] x) => (float[B, S, 32] y) {
           [x_q] xq = QuantizeLinear <axis = 2> (x, xs, xz)
           [x_dq] xd = DequantizeLinear <axis = 2> (xq, xs, xz)
           [w_dq] wd = DequantizeLinear <axis = 1> (w, ws)
           [mm] y = MatMul(xd, wd)
         }""", {"xs": _scales(64), "xz": np.zeros(64, np.int8), "w": W8, "ws": S8}),
         [("trt-per-channel-activation", "warning", "x_q")]),
    Case("int4-per-channel", linear(256, 32, W4, S8), [("trt-int4-granularity", "warning", "w_dq")]),
    Case("block-int8", linear(64, 32, W8, _scales((2, 32)), dq="<axis = 0, block_size = 32>"),
         [("trt-block-int8", "warning", "w_dq")]),
    Case("block-axis", ("""<ir_version: 10, opset_import: ["" : 21]>
         g (float[2, S, 64] x) => (float[2, S, 32] y) {
           [w_dq] wd = DequantizeLinear <axis = 0, block_size = 2> (w, ws)
           [mm] y = MatMul(x, wd)
         }""", {"w": RNG.standard_normal((2, 64, 32)).astype(ml_dtypes.float8_e4m3fn), "ws": _scales((1, 64, 32))}),
         [("trt-block-axis", "error", "w_dq")], trt="parse-error: The blocking dimension must be the last or second"),
    Case("block-ragged", linear(192, 32, _codes((192, 32), ml_dtypes.int4), _scales((2, 32)),
                                dq="<axis = 0, block_size = 128>"),
         [("trt-block-ragged", "error", "w_dq")]),  # builds: TensorRT reads it as block 192/2 = 96, a miscompute
    Case("block-ragged-refused", linear(320, 32, _codes((320, 32), ml_dtypes.int4), _scales((3, 32)),
                                        dq="<axis = 0, block_size = 128>"),
         [("trt-block-ragged", "error", "w_dq")], trt="parse-error: must divide into whole blocks"),
    Case("int4-block-size", linear(64, 32, _codes((64, 32), ml_dtypes.int4), _scales((2, 32)),
                                   dq="<axis = 0, block_size = 32>"),
         [("trt-int4-block-size", "warning", "w_dq")]),
    Case("dq-dtype-vs-consumer", linear(64, 32, W8, S8.astype(np.float16)), [("qdq-scale-dtype", "error", "w_dq")],
         trt="parse-error: IMatrixMultiplyLayer must have same input types"),
    Case("q-dtype-vs-x", linear(64, 32, W8, S8, act=(ACT8[0].astype(np.float16), ACT8[1])),
         [("qdq-scale-dtype", "error", "x_q"), ("qdq-scale-dtype", "error", "x_dq")],
         trt="parse-error: IMatrixMultiplyLayer must have same input types"),
    # ---- ONNX Runtime (CPU and CUDA)
    Case("ort-domain", ("""<ir_version: 10, opset_import: ["" : 21, "my.ops" : 1]>
         g (float[4] x) => (float[4] y) { [custom] y = my.ops.Frobnicate(x) }""", {}),
         [("ort-domain", "warning", "custom")], target="ort-cpu", ort_refusal="is not a registered function/op"),
    Case("mnb-missing-attr", mnb(attrs="K = 64, N = 32, bits = 4"), [("mnb-attributes", "error", "mnb")],
         target="ort-cpu", ort_refusal="Required attribute 'block_size' is missing"),
    Case("mnb-block-size", mnb(bs=24, b=_codes((32, 3, 12), np.uint8, 0, 256)), [("mnb-attributes", "error", "mnb")],
         target="ort-cpu", ort_refusal="Only power-of-two block sizes >= 16"),
    Case("mnb-B-shape", mnb(b=_codes((32, 2, 8), np.uint8, 0, 256)), [("mnb-shapes", "error", "mnb")],
         target="ort-cpu", ort_refusal="B initializer shape {32,2,8} does not match"),
    Case("mnb-scales-count", mnb(scales=_scales((32, 1))), [("mnb-shapes", "error", "mnb")],
         target="ort-cpu", ort_refusal="scales initializer shape {32,1} does not match"),
    Case("mnb-zero-points-count", mnb(zp=np.full((32, 2), 0x88, np.uint8)), [("mnb-shapes", "error", "mnb")],
         target="ort-cpu", ort_refusal="zero_points initializer shape {32,2} does not match"),
    Case("mnb-A-width", _edit(mnb(), "[B, S, 64] x", "[B, S, 48] x"), [("mnb-shapes", "error", "mnb")],
         target="ort-cpu", ort_refusal="Incompatible dimensions for matrix multiplication"),
    Case("mnb-scale-dtype", mnb(scales=_scales((32, 2), np.float16)), [("mnb-scale-dtype", "error", "mnb")],
         target="ort-cpu", ort_refusal="Type parameter (T1) of Optype (MatMulNBits) bound to different types"),
    Case("mnb-accuracy-level-cpu", mnb(attrs="K = 64, N = 32, bits = 4, block_size = 32, accuracy_level = 7"),
         [("mnb-accuracy-level", "warning", "mnb")], target="ort-cpu"),
    Case("mnb-accuracy-level-cuda", mnb(t="float16", attrs="K = 64, N = 32, bits = 4, block_size = 32, "
                                        "accuracy_level = 4"),
         [("mnb-accuracy-level", "warning", "mnb")], target="ort-cuda"),
    Case("mnb-cuda-fp32", mnb(), [("mnb-cuda-fp32", "warning", "mnb")], target="ort-cuda"),
    Case("ort-dq-dtype-vs-consumer", linear(64, 32, W8, S8.astype(np.float16)), [("qdq-scale-dtype", "error", "w_dq")],
         target="ort-cpu", ort_refusal="Type parameter (T) of Optype (MatMul) bound to different types"),
]

COMPLIANT = {  # graph -> the targets it must pass cleanly
    "int8 per-channel weight + per-tensor activation": (linear(64, 32, W8, S8, act=ACT8), TARGETS),
    "int4 blocked weight, K divisible by the block": (linear(256, 32, W4, S4, dq="<axis = 0, block_size = 128>"),
                                                      TARGETS),
    "float16 int8 weight-only": (FP16_W8, TARGETS),
    "fp8 per-tensor weight": (linear(64, 32, RNG.standard_normal((64, 32)).astype(ml_dtypes.float8_e4m3fn),
                                     np.array(0.02, np.float32), dq=""), TARGETS),
    "float16 MatMulNBits": (mnb(t="float16"), ("ort-cpu", "ort-cuda")),
    "MatMulNBits with packed zero points and accuracy_level 4": (
        mnb(zp=np.full((32, 1), 0x88, np.uint8), attrs="K = 64, N = 32, bits = 4, block_size = 32, accuracy_level = 4"),
        ("ort-cpu",)),
}


def to_ir(graph: tuple[str, dict]) -> ir.Model:
    text, inits = graph
    return ir.from_proto(model_from_text(text, inits))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_rule_alone(case: Case):
    findings = check_model(to_ir(case.graph), case.target)
    assert [(f.rule, f.severity, f.node) for f in findings] == case.expect, format_findings(findings)
    assert all(f.source and f.message for f in findings)


@pytest.mark.parametrize("name", list(COMPLIANT))
def test_compliant_graphs_have_no_findings(name: str):
    graph, targets = COMPLIANT[name]
    for target in targets:
        findings = check_model(to_ir(graph), target)
        assert findings == [], (target, format_findings(findings))


def _ort_error(graph) -> str | None:
    """Load and run the graph in an ORT CPU session: None when it runs, else ORT's error message."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model_from_text(*graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = sess.get_inputs()[0]
        shape = [1, 2, x.shape[-1]] if len(x.shape) == 3 else [4]
        sess.run(None, {x.name: np.ones(shape, np.float16 if "float16" in x.type else np.float32)})
    except Exception as exc:  # ORT raises its own types (InvalidGraph, Fail, NotImplemented, ...)
        return " ".join(str(exc).split())
    return None


@pytest.mark.parametrize("case", [c for c in CASES if c.target == "ort-cpu"], ids=lambda c: c.id)
def test_ort_agrees(case: Case):
    """ONNX Runtime is the reference for the ort-cpu rules: each error (and the unknown domain) is a graph
    ORT refuses, for the reason the rule names; a warning-only graph still runs."""
    err = _ort_error(case.graph)
    if case.ort_refusal is None:
        assert err is None
    else:
        assert err is not None and case.ort_refusal in err, err


@pytest.mark.parametrize("name", [n for n, (_, t) in COMPLIANT.items() if "ort-cpu" in t])
def test_ort_runs_compliant_graphs(name: str):
    assert _ort_error(COMPLIANT[name][0]) is None


def test_negative_scales_are_flagged_and_when_a_sign_flip_fixes_them():
    """A negative per-channel scale is flagged; |s| with negated codes dequantizes to the same weight and
    passes, as long as no code is -2^(b-1). ORT's symmetric grid (s = m / -2^(b-1)) puts a row's extreme
    exactly there whenever s < 0, and its negation does not fit int8: such rows need a positive grid."""
    s = _neg(S8)
    findings = check_model(to_ir(linear(64, 32, W8, s)), "tensorrt")
    assert [f.rule for f in findings] == ["trt-scale-positive"] and "16 of 32" in findings[0].message
    assert W8.min() == -127  # no grid-end code here
    flipped = np.where(s < 0, -W8.astype(np.int16), W8).astype(np.int8)
    assert np.array_equal(W8.astype(np.float32) * s, flipped.astype(np.float32) * np.abs(s))
    assert check_model(to_ir(linear(64, 32, flipped, np.abs(s))), "tensorrt") == []
    row = np.array([1.0, -0.5], np.float32)  # ORT's grid: m = 1.0, s = 1 / -128, codes -128 and 64
    s_ort = row[np.argmax(np.abs(row))] / -128.0
    codes = np.round(row / s_ort)
    assert s_ort < 0 and codes.tolist() == [-128.0, 64.0] and -codes.min() > np.iinfo(np.int8).max


def test_format_and_errors():
    findings = [Finding("r1", "error", "n1", "bad", "src"), Finding("r2", "warning", "n2", "meh", "src2")]
    assert errors(findings) == findings[:1]
    assert format_findings(findings) == ["error r1 at n1: bad [src]", "warning r2 at n2: meh [src2]"]


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target 'trt'"):
        check_model(to_ir(FP16_W8), "trt")


# -- the checker in `compile --target` and on the command line ---------------------------------------------


def _linear_file(tmp_path, k: int, n: int = 64):
    from graphs import linear_model, save

    return save(linear_model(k, n)[0], tmp_path / f"lin{k}.onnx")


def test_compile_for_tensorrt_writes_blocked_positive_int4_that_passes(tmp_path):
    """Weight-only --target tensorrt: INT4 DequantizeLinear blocked along K (block_size = K where K fits one
    block, not per channel), positive scales, no zero point; the checker finds nothing."""
    from ptqonnx.cli import main

    for k in (64, 256):
        out = tmp_path / f"q{k}.onnx"
        assert main(["-q", "compile", str(_linear_file(tmp_path, k)), "--target", "tensorrt", "-o", str(out)]) == 0
        model = ir.load(str(out))
        dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
        assert dq.attributes["block_size"].value == min(k, 128) and dq.attributes["axis"].value == 0
        assert len(dq.inputs) == 2 and (dq.inputs[1].const_value.numpy() > 0).all()
        assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
        assert check_model(model, "tensorrt") == []


def test_compile_for_tensorrt_refuses_a_k_the_block_does_not_divide(tmp_path, capsys):
    from ptqonnx.cli import main

    src = _linear_file(tmp_path, 192)  # 192 = 1.5 blocks of 128: TensorRT would read blocks of 96
    assert main(["compile", str(src), "--target", "tensorrt", "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "K not a multiple of the block 128 (e.g. node: K=192)" in err[0]
    assert "set --group-size 64" in err[0] and not (tmp_path / "q.onnx").exists()
    assert main(["-q", "compile", str(src), "--target", "tensorrt", "--group-size", "64",
                 "-o", str(tmp_path / "q.onnx")]) == 0


def test_a_broken_target_rule_refuses_the_output_and_warnings_become_notes(tmp_path, monkeypatch):
    import ptqonnx.check
    from ptqonnx.config import RtnConfig
    from ptqonnx.errors import UserError
    from ptqonnx.pipeline import compile_model

    src = _linear_file(tmp_path, 128)
    rep = compile_model(src, tmp_path / "cuda.onnx", ptqonnx.config.Recipe((RtnConfig(),), target="ort-cuda"))
    assert any("ort-cuda checker: 1 warnings (mnb-cuda-fp32)" in n for n in rep.notes), rep.notes
    broken = Finding("trt-scale-positive", "error", "w_dq", "a negative scale", "NvInfer.h")
    monkeypatch.setattr(ptqonnx.check, "check_model", lambda model, target: [broken])
    with pytest.raises(UserError, match="the output breaks a tensorrt rule: error trt-scale-positive at w_dq"):
        compile_model(src, tmp_path / "trt.onnx", ptqonnx.config.Recipe((RtnConfig(),), target="tensorrt"))
    assert not (tmp_path / "trt.onnx").exists()


def test_check_command(tmp_path, capsys):
    import json

    from ptqonnx.cli import main

    mnb = tmp_path / "mnb.onnx"
    assert main(["-q", "compile", str(_linear_file(tmp_path, 128)), "-o", str(mnb)]) == 0
    capsys.readouterr()
    assert main(["check", str(mnb), "--target", "ort-cpu"]) == 0
    assert "0 errors, 0 warnings under the ort-cpu rules" in capsys.readouterr().out
    assert main(["check", str(mnb), "--target", "tensorrt", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and [f["rule"] for f in report["findings"]] == ["trt-domain"]
    assert main(["check", str(mnb), "--target", "ort-cpu", "--build"]) == 2
    assert "--build builds a TensorRT engine" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.onnx"), "--target", "ort-cpu"]) == 2
