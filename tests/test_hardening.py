"""Bad or unusual inputs, one test per category: exit code 2, one line without a traceback naming the problem
and the fix, no stray files, the input unchanged — and never an exit 0 with a silently broken model.
(Load/save, external data, output paths and signals: tests/test_io.py.)"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from graphs import SkewedSession, linear_model, model_from_text, run, save
from ptqonnx.cli import main

_HDR = '<ir_version: 10, opset_import: ["" : 21]>'


def _tree(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(capsys, folder, argv, needle):
    """Run the CLI; assert exit 2, one line containing `needle`, no traceback, files in `folder` unchanged."""
    before = _tree(folder)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    errors = [line for line in err.strip().splitlines() if ": error: " in line]  # progress lines may precede it
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert needle in errors[0] and "Traceback" not in err, err
    assert _tree(folder) == before
    return errors[0]


def _two_layer(tmp_path, k=64, n=48):
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> Neg -> y, float input [B, S, K]."""
    rng = np.random.default_rng(0)
    text = f"""{_HDR} g (float[B, S, {k}] x) => (float[B, S, 32] y) {{
        h = MatMul(x, w1)
        r = Relu(h)
        z = MatMul(r, w2)
        y = Neg(z)
    }}"""
    model = model_from_text(text, {"w1": rng.standard_normal((k, n)).astype(np.float32),
                                   "w2": rng.standard_normal((n, 32)).astype(np.float32)})
    return save(model, tmp_path / "m.onnx")


def _npz(tmp_path, name="c.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("method", [["--method", "gptq"], ["--method", "smoothquant", "--w8a8"], ["--method", "awq"]])
@pytest.mark.parametrize("bad,needle", [
    (lambda x: x.astype(np.float64), "is float64, the model takes float32"),
    (lambda x: x[:, 0], "has rank 2 (shape [1, 64]), the model takes rank 3 [B, S, 64]"),
    (lambda x: x[..., :32], "has size 32 on axis 2, the model fixes it at 64"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32), "holds NaN/Inf"),
])
def test_bad_calibration_arrays_are_refused_before_any_run(tmp_path, capsys, method, bad, needle):
    src = _two_layer(tmp_path)
    x = np.random.default_rng(1).standard_normal((4, 8, 64)).astype(np.float32)
    npz = _npz(tmp_path, x=bad(x))
    _refused(capsys, tmp_path, ["compile", src, *method, "--calib-npz", npz], needle)


def test_token_ids_past_the_vocabulary_are_refused(tmp_path, capsys, tiny_export):
    ids = np.random.default_rng(0).integers(0, 300, size=(3, 16)).astype(np.int64)
    ids[2, 5] = 100_000
    npz = _npz(tmp_path, input_ids=ids)
    line = _refused(capsys, tmp_path, ["compile", tiny_export / "model.onnx", "--method", "gptq", "--calib-npz", npz,
                                       "-o", tmp_path / "q.onnx"], "holds token id 100000, outside the embedding's")
    assert "sample 2" in line and "tokenize with the model's own tokenizer" in line


def test_nan_inside_the_model_names_the_node_that_made_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    text = f"""{_HDR} g (float[B, S, 16] x) => (float[B, S, 8] y) {{
        l = Log(x)
        m = MatMul(l, w)
        y = Neg(m)
    }}"""
    src = save(model_from_text(text, {"w": rng.standard_normal((16, 8)).astype(np.float32)}), tmp_path / "m.onnx")
    x = np.abs(rng.standard_normal((3, 4, 16))).astype(np.float32)
    x[1, 0, 0] = -1.0  # log of a negative number: NaN from a finite input
    npz = _npz(tmp_path, x=x)
    line = _refused(capsys, tmp_path, ["compile", src, "--method", "smoothquant", "--w8a8", "--calib-npz", npz],
                    "calibration sample 1: node")
    assert "(Log) produced NaN/Inf from finite inputs" in line


def test_all_zero_calibration_data_is_refused_not_zeroed(tmp_path, capsys):
    """GPTQ on all-zero inputs used to zero every weight (exit 0, a model that outputs zeros)."""
    src = _two_layer(tmp_path)
    npz = _npz(tmp_path, x=np.zeros((4, 8, 64), np.float32))
    for method in (["--method", "gptq"], ["--method", "awq"], ["--method", "gptq", "--one-shot"], ["--w8a8"]):
        _refused(capsys, tmp_path, ["compile", src, *method, "--calib-npz", npz], "gives no signal to 2 of 2 layers")


def test_a_layer_without_signal_falls_back_to_rtn_and_is_reported(tmp_path, capsys):
    """The second layer reads Relu(-|x| W1)... here: a Relu of negative pre-activations, all zero; it gets RTN
    (not GPTQ's zeroed weights) and the summary says so; the first layer is still GPTQ'd."""
    rng = np.random.default_rng(0)
    text = f"""{_HDR} g (float[B, S, 64] x) => (float[B, S, 32] y, float[B, S, 48] hh) {{
        a = Abs(x)
        h = MatMul(a, w1)
        hh = Neg(h)
        r = Relu(hh)
        z = MatMul(r, w2)
        y = Neg(z)
    }}"""
    w1 = np.abs(rng.standard_normal((64, 48))).astype(np.float32)  # |x| W1 >= 0, so Relu(-(|x| W1)) = 0
    w2 = rng.standard_normal((48, 32)).astype(np.float32)
    src = save(model_from_text(text, {"w1": w1, "w2": w2}), tmp_path / "m.onnx")
    npz = _npz(tmp_path, x=rng.standard_normal((4, 8, 64)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code = main(["compile", str(src), "--method", "gptq", "--one-shot", "--group-size", "16", "--calib-npz", str(npz),
                 "-o", str(out)])
    text_out = capsys.readouterr()
    assert code == 0, text_out.err
    assert "1 layers fell back to RTN (calibration input all zero)" in text_out.out
    from ptqonnx.numerics.quant import dequantize_weight, quantize_weight

    q = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    from ptqonnx.numerics.packing import unpack_bits

    packed = q["w2_Q4"]  # [N, k_blocks, blob]
    codes = unpack_bits(packed, 4).reshape(32, -1)[:, :48]
    rtn = quantize_weight(w2.T, 4, 16, True)
    assert np.array_equal(codes, rtn.q) and np.array_equal(q["w2_scales"], rtn.scale)
    assert np.abs(dequantize_weight(rtn)).max() > 0


def test_already_quantized_models_say_by_what(tmp_path, capsys):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx")]) == 0
    capsys.readouterr()
    _refused(capsys, tmp_path, ["compile", tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx"],
             "the model is already quantized (1 linear layer as MatMulNBits (4-bit)); there is nothing left")
    # partly quantized: the float layers on request only
    src2 = _two_layer(tmp_path)
    half = tmp_path / "half.onnx"
    assert main(["compile", str(src2), "--exclude", "w2", "-o", str(half)]) == 0  # by weight name
    capsys.readouterr()
    _refused(capsys, tmp_path, ["compile", half, "-o", tmp_path / "x.onnx"],
             "pass --only-float-layers (only_float_layers) to quantize its 1 float layers")
    assert main(["compile", str(half), "--only-float-layers", "-o", str(tmp_path / "full.onnx")]) == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "full.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2


def test_nonfinite_weights_are_refused_with_the_tensor_name_or_kept_float(tmp_path, capsys, caplog):
    model, w = linear_model(64, 16)
    w = w.copy()
    w[3, 4] = np.inf
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    src = save(model, tmp_path / "m.onnx")
    _refused(capsys, tmp_path, ["compile", src], "weight w of node holds NaN/Inf values; fix the model, or pass "
             "--nonfinite-weights keep-float")
    # one good and one bad layer: keep-float leaves the bad one float, with a warning
    src2 = _two_layer(tmp_path)
    m = onnx.load(str(src2))
    w2 = onnx.numpy_helper.to_array(m.graph.initializer[1]).copy()
    w2[0, 0] = np.nan
    m.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w2, "w2"))
    onnx.save(m, str(src2))
    out = tmp_path / "k.onnx"
    assert main(["compile", str(src2), "--nonfinite-weights", "keep-float", "-o", str(out)]) == 0
    res = capsys.readouterr()
    assert "weight holds NaN/Inf values; kept in float" in res.out and "NaN/Inf weights and stay in float" in caplog.text
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1


def test_a_compile_that_would_quantize_nothing_is_an_error_for_every_method(tmp_path, capsys):
    """W8A8 leaves the LM head float: on a model whose only linear layer is the LM head it used to write an
    output with 0 layers quantized and exit 0."""
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")  # y = x W feeds the graph output: an LM head
    npz = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((2, 4, 64)).astype(np.float32))
    for argv in (["--w8a8"], ["--method", "smoothquant", "--w8a8"]):
        _refused(capsys, tmp_path, ["compile", src, *argv, "--calib-npz", npz], "no quantizable MatMul/Gemm")
    _refused(capsys, tmp_path, ["compile", src, "--keep-lm-head"], "no quantizable MatMul/Gemm")
    _refused(capsys, tmp_path, ["compile", src, "--exclude", "*"], "no quantizable MatMul/Gemm")


def test_output_path_problems_are_found_before_the_compute(tmp_path, capsys):
    src = _two_layer(tmp_path)
    (tmp_path / "adir").mkdir()
    _refused(capsys, tmp_path, ["compile", src, "-o", tmp_path / "adir"], "is a folder; pass a file path")
    _refused(capsys, tmp_path, ["compile", src, "-o", src], "is the input file")
    out = tmp_path / "q.onnx"
    assert main(["compile", str(src), "-o", str(out)]) == 0
    capsys.readouterr()
    _refused(capsys, tmp_path, ["compile", src, "-o", out], "already exists; pass --force to replace it")
    assert main(["compile", str(src), "-o", str(out), "--force"]) == 0


def test_outputs_gate_catches_an_optimized_graph_that_computes_otherwise(tmp_path, capsys, monkeypatch):
    """ORT fusions have miscomputed silently before: the gate compares ORT_ENABLE_ALL with ORT_DISABLE_ALL on
    probe inputs; a (simulated) fusion that changes the outputs is refused and nothing is written."""
    import ptqonnx.runtime.ort as ort_mod

    src = _two_layer(tmp_path)
    real = ort_mod.make_session

    def session(model, *, opt_level="all", **kw):
        s = real(model, opt_level=opt_level, **kw)
        return SkewedSession(s) if opt_level == "all" else s

    monkeypatch.setattr(ort_mod, "make_session", session)
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ONNX Runtime's optimized graph computes other outputs" in err[0]
    assert "-vv shows the traceback" in err[0]
    assert not (tmp_path / "q.onnx").exists()
    monkeypatch.setattr(ort_mod, "make_session", real)
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx")]) == 0
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    assert np.isfinite(run(tmp_path / "q.onnx", {"x": x})[0]).all()


def test_conv_layers_are_reported_not_passed_over(tmp_path, capsys):
    """A small CNN (Conv -> Relu -> Flatten -> Gemm classifier): the Gemm and the Conv are quantized and the
    summary counts both (tests/test_conv.py checks the Conv's numbers); messages call the classifier the
    "output layer"; with --keep-conv a graph of convolutions only is one line saying why nothing is quantized."""
    rng = np.random.default_rng(0)
    text = f"""{_HDR} g (float[N, 3, 8, 8] x) => (float[N, 10] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
        r = Relu(c)
        f = Flatten(r)
        y = Gemm <transB = 1> (f, wg, bg)
    }}"""
    inits = {"wc": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "bc": np.zeros(4, np.float32),
             "wg": rng.standard_normal((10, 256)).astype(np.float32), "bg": np.zeros(10, np.float32)}
    src = save(model_from_text(text, inits), tmp_path / "cnn.onnx")
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "quantized 1 linear layers, 1 Conv layers; skipped 0" in out, out
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref, got = run(src, {"x": x})[0], run(tmp_path / "q.onnx", {"x": x})[0]
    assert np.abs(got - ref).max() <= 0.2 * np.abs(ref).max()  # INT4 classifier, INT8 Conv

    # a classifier is not an "LM head" (its output is not logits)
    _refused(capsys, tmp_path, ["compile", src, "-o", tmp_path / "k.onnx", "--keep-lm-head", "--keep-conv"],
             "output layer kept in float")

    conv_only = f"""{_HDR} g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {{
        y = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
    }}"""
    only = save(model_from_text(conv_only, {k: inits[k] for k in ("wc", "bc")}), tmp_path / "conv.onnx")
    _refused(capsys, tmp_path, ["compile", only, "-o", tmp_path / "q2.onnx", "--keep-conv"],
             "Conv layer kept in float (keep_conv)")
    assert main(["compile", str(only), "-o", str(tmp_path / "q3.onnx")]) == 0
    assert "quantized 0 linear layers, 1 Conv layers" in capsys.readouterr().out
