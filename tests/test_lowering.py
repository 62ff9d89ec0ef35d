"""Emitted MatMulNBits / QDQ / GatherBlockQuantized nodes run in ONNX Runtime and equal a numpy
reference (dequantize, then matmul) — with graph optimizations off and fully on, at accuracy levels 0 and 4."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphs import int8_activation_bound, linear_model, model_from_text, run, save
from ptqonnx.numerics.quant import fake_quantize
from ptqonnx.pipeline import compile_model
from ptqonnx.registry import recipe_for

SHAPES = [(64, 32, 16), (100, 24, 32), (576, 40, 128), (256, 48, 64), (200, 8, 128)]


def _compile(tmp_path, model, name="q.onnx", **weights):
    src = save(model, tmp_path / "in.onnx")
    out = tmp_path / name
    report = compile_model(src, out, recipe_for("rtn", **weights))
    return out, report


@pytest.mark.parametrize("k,n,block", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_equals_numpy_reference(tmp_path, k, n, block, symmetric):
    model, w = linear_model(k, n, seed=k)
    out, report = _compile(tmp_path, model, bits=4, group_size=block, symmetric=symmetric)
    assert report.quantized == ["node"] or len(report.quantized) == 1
    ops = [nd.op_type for nd in onnx.load(out).graph.node]
    assert ops == ["MatMulNBits"]
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    w_hat = fake_quantize(w.T, 4, block, symmetric).T  # [K, N]
    ref = x @ w_hat
    for level in ("disable", "all"):
        (y,) = run(out, {"x": x}, level)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,n,block", SHAPES[:3])
@pytest.mark.parametrize("level", ["disable", "all"])
def test_matmulnbits_accuracy_level_4_within_int8_activation_bound(tmp_path, k, n, block, level):
    model, w = linear_model(k, n, seed=3)
    out, _ = _compile(tmp_path, model, bits=4, group_size=block, symmetric=False, accuracy_level=4)
    x = np.random.default_rng(2).standard_normal((1, 7, k)).astype(np.float32)
    w_hat = fake_quantize(w.T, 4, block, False).T
    (y,) = run(out, {"x": x}, level)
    err = np.abs(y - x @ w_hat)
    bound = int8_activation_bound(x, w_hat, block)
    assert np.all(err <= bound * 1.01 + 1e-4), float((err - bound).max())
    node = onnx.load(out).graph.node[0]
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4


@pytest.mark.parametrize("k,n,block", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_int4_equals_numpy_reference(tmp_path, k, n, block, symmetric):
    model, w = linear_model(k, n, seed=k + 1)
    out, _ = _compile(tmp_path, model, bits=4, group_size=block, symmetric=symmetric, format="qdq")
    g = onnx.load(out).graph
    assert [nd.op_type for nd in g.node] == ["DequantizeLinear", "MatMul"]
    inits = {i.name: i for i in g.initializer}
    q = next(i for i in inits.values() if i.name.endswith("_Q4"))
    assert q.data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
    assert any(i.name.endswith("_zero_points") for i in inits.values()) == (not symmetric)
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    w_hat = fake_quantize(w.T, 4, block, symmetric).T
    (y,) = run(out, {"x": x}, "disable")
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-4)
    # ORT_ENABLE_ALL fuses DQ+MatMul into MatMulNBits with int8 activations unless told otherwise
    (y,) = run(out, {"x": x}, "all", {"session.qdq_matmulnbits_accuracy_level": "0"})
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-4)
    (y,) = run(out, {"x": x}, "all")
    assert np.all(np.abs(y - x @ w_hat) <= int8_activation_bound(x, w_hat, block) * 1.01 + 1e-4)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_per_channel(tmp_path, fmt, symmetric):
    model, w = linear_model(96, 20, seed=5)
    out, _ = _compile(tmp_path, model, bits=8, group_size=None, symmetric=symmetric, format=fmt)
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)[None]
    ref = x @ fake_quantize(w.T, 8, None, symmetric).T
    # at ORT_ENABLE_ALL, ORT fuses an INT8 per-axis DQ+MatMul into MatMulNBits(bits=8) with int8
    # activations (accuracy level 4) unless the session says otherwise
    for level, config in (("disable", None), ("all", {"session.qdq_matmulnbits_accuracy_level": "0"})):
        (y,) = run(out, {"x": x}, level, config)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    (y,) = run(out, {"x": x}, "all")
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


GEMM = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 48] x) => (float[B, 16] y) {{ y = Gemm <transB = {tb}> (x, w, c) }}"""


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias(tmp_path, fmt, trans_b):
    rng = np.random.default_rng(9)
    w_kn = rng.standard_normal((48, 16)).astype(np.float32)
    c = rng.standard_normal(16).astype(np.float32)
    model = model_from_text(GEMM.format(tb=trans_b), {"w": w_kn.T.copy() if trans_b else w_kn, "c": c})
    out, _ = _compile(tmp_path, model, bits=4, group_size=16, symmetric=False, format=fmt)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    ref = x @ fake_quantize(w_kn.T, 4, 16, False).T + c
    (y,) = run(out, {"x": x}, "disable")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


TRANSPOSED = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 32] x) => (float[B, 24] y) {
    wt = Transpose <perm = [1, 0]> (w16)
    w = Cast <to = 1> (wt)
    y = MatMul(x, w)
}"""


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_weight_through_transpose_and_cast(tmp_path, fmt):
    w_nk = np.random.default_rng(3).standard_normal((24, 32)).astype(np.float16)
    model = model_from_text(TRANSPOSED, {"w16": w_nk})
    out, _ = _compile(tmp_path, model, bits=4, group_size=16, symmetric=True, format=fmt)
    ops = [nd.op_type for nd in onnx.load(out).graph.node]
    assert "Transpose" not in ops and "Cast" not in ops  # bypassed and removed
    x = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
    ref = x @ fake_quantize(w_nk.astype(np.float32), 4, 16, True).T
    (y,) = run(out, {"x": x}, "disable")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


TIED = """<ir_version: 10, opset_import: ["" : 21]>
g (int64[B, S] ids) => (float[B, S, 40] logits) {
    h = Gather <axis = 0> (emb, ids)
    a = MatMul(h, w1)
    r = Relu(a)
    et = Transpose <perm = [1, 0]> (emb)
    logits = MatMul(r, et)
}"""


def _tied_model():
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((40, 64)).astype(np.float32)
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    return model_from_text(TIED, {"emb": emb, "w1": w1}), emb, w1


def _tied_reference(ids, emb_table, w1_hat, head_hat_kn):
    h = emb_table[ids]
    return np.maximum(h @ w1_hat, 0) @ head_hat_kn


@pytest.mark.parametrize("symmetric", [True, False])
def test_tied_embedding_and_lm_head(tmp_path, symmetric):
    model, emb, w1 = _tied_model()
    ids = np.array([[0, 5, 39, 7]], np.int64)
    w1_hat = fake_quantize(w1.T, 4, 32, symmetric).T
    head_hat = fake_quantize(emb, 4, 32, symmetric).T

    out, rep = _compile(tmp_path, model, "a.onnx", bits=4, group_size=32, symmetric=symmetric)
    assert len(rep.quantized) == 2
    (y,) = run(out, {"ids": ids}, "all")
    np.testing.assert_allclose(y, _tied_reference(ids, emb, w1_hat, head_hat), rtol=1e-4, atol=1e-4)
    assert any(i.name == "emb" for i in onnx.load(out).graph.initializer)  # the Gather still reads it

    out, rep = _compile(tmp_path, model, "b.onnx", bits=4, group_size=32, symmetric=symmetric, keep_lm_head=True)
    assert len(rep.quantized) == 1 and any("LM head" in s.reason for s in rep.skipped)
    (y,) = run(out, {"ids": ids}, "all")
    np.testing.assert_allclose(y, _tied_reference(ids, emb, w1_hat, emb.T), rtol=1e-4, atol=1e-4)

    out, rep = _compile(tmp_path, model, "c.onnx", bits=4, group_size=32, symmetric=symmetric,
                        quantize_embeddings=True)
    assert rep.embeddings_quantized == 1
    g = onnx.load(out).graph
    assert "GatherBlockQuantized" in [nd.op_type for nd in g.node]
    assert not any(i.name == "emb" for i in g.initializer)  # float table gone
    emb_hat = fake_quantize(emb, 4, 32, symmetric)
    for level in ("disable", "all"):
        (y,) = run(out, {"ids": ids}, level)
        np.testing.assert_allclose(y, _tied_reference(ids, emb_hat, w1_hat, head_hat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [96, 300])
def test_per_channel_matmulnbits_uses_a_fast_block_with_repeated_grids(tmp_path, k):
    from ptqonnx.numerics.quant import dequantize_weight, quantize_weight
    from ptqonnx.passes.matmul_nbits import as_blockwise

    w = np.random.default_rng(k).standard_normal((20, k)).astype(np.float32)
    for sym in (True, False):
        qw = quantize_weight(w, 8, None, sym)
        np.testing.assert_array_equal(dequantize_weight(as_blockwise(qw)), dequantize_weight(qw))
    model, w_kn = linear_model(k, 20, seed=k)
    out, _ = _compile(tmp_path, model, bits=8, group_size=None, symmetric=False)
    node = onnx.load(out).graph.node[0]
    assert {a.name: a.i for a in node.attribute}["block_size"] == 128
    x = np.random.default_rng(1).standard_normal((1, 4, k)).astype(np.float32)
    (y,) = run(out, {"x": x}, "all")
    np.testing.assert_allclose(y, x @ fake_quantize(w_kn.T, 8, None, False).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w3_grid_in_4bit_containers(tmp_path, fmt, symmetric):
    """3-bit codes (0..7) stored as INT4/UINT4 or 4-bit MatMulNBits with explicit zero points."""
    k, n, block = 200, 24, 64
    model, w = linear_model(k, n, seed=11)
    out, _ = _compile(tmp_path, model, bits=3, group_size=block, symmetric=symmetric, format=fmt)
    w_hat = fake_quantize(w.T, 3, block, symmetric)
    per_block = w_hat.reshape(n, -1) if k % block == 0 else w_hat[:, : (k // block) * block]
    assert all(len(np.unique(row)) <= 8 for row in per_block.reshape(n, -1, block).reshape(-1, block))
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    (y,) = run(out, {"x": x}, "disable")
    np.testing.assert_allclose(y, x @ w_hat.T, rtol=1e-5, atol=1e-4)
    if fmt == "matmulnbits":
        node = onnx.load(out).graph.node[0]
        assert {a.name: a.i for a in node.attribute}["bits"] == 4 and len(node.input) == 4


def test_back_to_back_linear_layers_lower_in_order(tmp_path):
    """y = MatMul(MatMul(x, w1), w2): the second layer's input is the first one's lowered output (it once read
    the removed node's output and the graph lost its order)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((32, 16)).astype(np.float32)
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[S, 32] x) => (float[S, 16] y) { h = MatMul(x, w1)
        z = MatMul(h, w2)
        y = Neg(z) }"""
    src = save(model_from_text(text, {"w1": w1, "w2": w2}), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    compile_model(src, out, recipe_for("rtn", group_size=16))
    x = rng.standard_normal((4, 32)).astype(np.float32)
    ref = -(x @ fake_quantize(w1.T, 4, 16, True).T @ fake_quantize(w2.T, 4, 16, True).T)
    np.testing.assert_allclose(run(out, {"x": x}, "disable")[0], ref, rtol=1e-4, atol=1e-4)
