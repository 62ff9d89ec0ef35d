"""Scaling groups for other architectures' graph forms, in ONNX text: fused projections (a Split / Slice of one
linear layer's columns: Phi-3's gate_up_proj and qkv_proj, GPT-2's c_attn), Relu between two linear layers
(OPT), a last-axis Reshape before a Gemm (GPT-2's Conv1D), Gemma's unfolded (1 + γ). Each folds random
scales (1e-2..1e2) and ORT must compute the same outputs (`_fold_and_compare` from test_scaling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ptqonnx.graph import find_linear_sites, find_scaling_groups
from graphs import ATTENTION, model_from_text
from test_scaling import HDR, K, _fold_and_compare, _w, _x

INT64_MAX = np.iinfo(np.int64).max


def _by_weight(groups) -> dict[str, object]:
    return {g.sites[0].weight_name: g for g in groups}


def _mlp(split: str) -> onnx.ModelProto:
    """h = x γ; [gate | up] = h W_gu [K, 64] split by `split`; y = (up * SiLU(gate)) W_d (Phi-3's MLP)."""
    text = HDR + f"""
    g (float[2, 3, {K}] x) => (float[2, 3, {K}] y) {{
        h = Mul(x, gamma)
        gu = MatMul(h, wgu)
        {split}
        sg = Sigmoid(gate)
        act = Mul(gate, sg)
        m = Mul(up, act)
        y = MatMul(m, wd)
    }}"""
    rng = np.random.default_rng(4)
    inits = {"gamma": _w(rng, K), "wgu": _w(rng, K, 64), "wd": _w(rng, 32, K),
             "s0": np.array([24]), "e0": np.array([56]), "s1": np.array([32]), "e1": np.array([64]),
             "ax": np.array([-1])}
    return onnx.shape_inference.infer_shapes(model_from_text(text, inits))


_SPLIT = "gate, up = Split<axis=-1, num_outputs=2>(gu)"


def test_fused_gate_up_down_proj_folds_into_the_up_columns(tmp_path: Path) -> None:
    groups, skipped, fold, _ = _fold_and_compare(tmp_path, _mlp(_SPLIT), {"x": _x()})
    down = _by_weight(groups)["wd"]
    assert not skipped and down.kind == "linear_columns" and down.producer.inputs[1].name == "wgu"
    assert down.channels == tuple(range(32, 64)) and down.width == 64  # gate's columns keep scale 1
    assert down.name in fold.folded


def test_overlapping_slices_of_one_projection_get_an_inserted_mul(tmp_path: Path) -> None:
    """gate = columns 24..55, up = 32..63: gate would see up's scale, so no column fold (still exact)."""
    split = "gate = Slice(gu, s0, e0, ax)\n        up = Slice(gu, s1, e1, ax)"
    groups, _, fold, _ = _fold_and_compare(tmp_path, _mlp(split), {"x": _x()})
    assert _by_weight(groups)["wd"].kind == "mul_insert" and _by_weight(groups)["wd"].name in fold.inserted


def _fused_attention(select: str) -> onnx.ModelProto:
    """Two-head attention whose q, k, v are parts of one projection qkv = x W [K, 3K] (+ b), taken by `select`."""
    text = HDR + f"""
    g (float[2, 3, {K}] x) => (float[2, 3, 8] y) {{
        qkv0 = MatMul(x, wqkv)
        qkv = Add(qkv0, bqkv)
        {select}
        {ATTENTION}
        at = Transpose<perm=[0, 2, 1, 3]>(a)
        am = Reshape(at, merged)
        y = MatMul(am, wo)
    }}"""
    rng = np.random.default_rng(8)
    inits = {"wqkv": _w(rng, K, 3 * K), "bqkv": _w(rng, 3 * K), "wo": _w(rng, K, 8),
             "heads": np.array([2, 3, 2, K // 2]), "merged": np.array([2, 3, K]), "ax": np.array([2]),
             "s0": np.array([0]), "s1": np.array([K]), "s2": np.array([2 * K]), "e2": np.array([INT64_MAX])}
    return onnx.shape_inference.infer_shapes(model_from_text(text, inits))


@pytest.mark.parametrize("select", [
    "q, k, v = Split<axis=2, num_outputs=3>(qkv)",  # GPT-2's c_attn
    "q = Slice(qkv, s0, s1, ax)\n        k = Slice(qkv, s1, s2, ax)\n        v = Slice(qkv, s2, e2, ax)",  # Phi-3
])
def test_fused_qkv_o_proj_folds_into_the_v_columns_through_pv(tmp_path: Path, select: str) -> None:
    groups, skipped, fold, _ = _fold_and_compare(tmp_path, _fused_attention(select), {"x": _x(0, (2, 3, K))})
    o = _by_weight(groups)["wo"]
    assert not skipped and o.kind == "linear_columns" and o.producer.inputs[1].name == "wqkv"
    assert o.channels == tuple(range(2 * K, 3 * K)) and o.width == 3 * K and o.through is not None
    assert sorted((r.node.op_type, r.index) for r in o.absorb) == [("Add", 1), ("MatMul", 1)]  # W_v and b_v
    assert o.name in fold.folded


def test_layernorm_reshape_gemm_relu_gemm(tmp_path: Path) -> None:
    """OPT / GPT-2: LayerNorm -> Reshape [-1, K] -> Gemm (fc1, bias) -> Relu -> Gemm (fc2): γ, β take fc1's
    scale through the Reshape; fc1's columns and bias take fc2's through the Relu."""
    text = HDR + f"""
    g (float[2, 3, {K}] x) => (float[6, 8] y) {{
        n = LayerNormalization<axis=-1>(x, g, b)
        f = Reshape(n, flat)
        h = Gemm(f, w1, c1)
        r = Relu(h)
        y = Gemm<transB=1>(r, w2, c2)
    }}"""
    rng = np.random.default_rng(5)
    inits = {"g": _w(rng, K), "b": _w(rng, K), "flat": np.array([-1, K]), "w1": _w(rng, K, 32), "c1": _w(rng, 32),
             "w2": _w(rng, 8, 32), "c2": _w(rng, 8)}
    proto = onnx.shape_inference.infer_shapes(model_from_text(text, inits))
    groups, _, fold, _ = _fold_and_compare(tmp_path, proto, {"x": _x()})
    by = _by_weight(groups)
    assert (by["w1"].kind, by["w1"].producer.op_type) == ("norm_gamma", "LayerNormalization")
    assert (by["w2"].kind, by["w2"].producer.inputs[1].name) == ("linear_columns", "w1")
    assert len(by["w2"].absorb) == 2 and set(fold.folded) == {g.name for g in groups}


def test_gemma_unfolded_one_plus_gamma_gets_an_inserted_mul() -> None:
    """x̂ (1 + γ) left as Add(1, γ) (an exporter without constant folding): 1/s cannot go into γ alone, and the
    scalar 1 has no channel axis to take it, so the group gets an exact inserted Mul. (torch.onnx.export
    folds 1 + γ into one constant, which `norm_gamma` divides: tests/test_archs.py, gemma.)"""
    text = HDR + f"""
    g (float[2, 3, {K}] x) => (float[2, 3, 8] y) {{
        sq = Mul(x, x)
        m = ReduceMean(sq, axes)
        e = Add(m, eps)
        r = Sqrt(e)
        nx = Div(x, r)
        scale = Add(one, gamma)
        h = Mul(nx, scale)
        y = MatMul(h, w)
    }}"""
    rng = np.random.default_rng(6)
    inits = {"axes": np.array([-1]), "eps": np.array(1e-6, np.float32), "one": np.array(1.0, np.float32),
             "gamma": _w(rng, K), "w": _w(rng, K, 8)}
    model = ir.from_proto(model_from_text(text, inits))
    (group,), _ = find_scaling_groups(model, find_linear_sites(model).sites)
    assert group.kind == "mul_insert"
