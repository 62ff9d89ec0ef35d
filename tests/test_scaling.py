"""Scaling groups and exact scale folding: after folding random s (1e-2..1e2) ORT computes the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnx_ir.passes import PreconditionError

from ptqonnx.graph import find_linear_sites
from ptqonnx.passes.fold_scales import FoldScalesPass
from ptqonnx.graph.scaling import ATTENTION_SKIP_REASON, ScalingGroup, find_scaling_groups
from graphs import ATTENTION, model_from_text, run

K = 16
HDR = '<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>'


def _w(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _scales(groups: list[ScalingGroup], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.name: np.exp(rng.uniform(np.log(1e-2), np.log(1e2), g.K)).astype(np.float32) for g in groups}


def _fold_and_compare(tmp_path: Path, proto: onnx.ModelProto, feeds: dict, *, tol: float = 1e-5,
                      checker: bool = True, **kw):
    """Find groups, fold random scales, check ORT outputs (both opt levels); returns (groups, skips, pass, model)."""
    before = tmp_path / "before.onnx"
    onnx.save(proto, str(before))
    model = ir.from_proto(proto)
    groups, skipped = find_scaling_groups(model, find_linear_sites(model).sites)
    fold = FoldScalesPass(_scales(groups), groups, **kw)
    result = fold(model)
    assert result.modified
    after = tmp_path / "after.onnx"
    ir.save(result.model, str(after))
    if checker:
        onnx.checker.check_model(str(after))
    for level in ("all", "disable"):
        for ref, out in zip(run(before, feeds, level), run(after, feeds, level)):
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err <= tol, (level, err)
    return groups, skipped, fold, result.model


def _by_sites(groups: list[ScalingGroup]) -> dict[tuple[str, ...], ScalingGroup]:
    return {tuple(sorted(s.weight_name for s in g.sites)): g for g in groups}


def _x(seed: int = 0, shape=(2, 3, K)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3


def test_rmsnorm_gamma_shared_gamma_transposed_and_cast_weights(tmp_path: Path) -> None:
    """Decomposed RMSNorm (Mul(γ, normed)); γ shared by a second norm; weights direct, via Transpose, via Cast."""
    text = HDR + f"""
    g (float[B, S, {K}] x, float[B, S, {K}] x2)
        => (float[B, S, 8] q, float[B, S, 4] k, float[B, S, 4] v, float[B, S, 8] o) {{
        p = Pow(x, two)
        m = ReduceMean(p, axes)
        e = Add(m, eps)
        r = Sqrt(e)
        ir_ = Reciprocal(r)
        nx = Mul(x, ir_)
        h = Mul(gamma, nx)
        q = MatMul(h, wq)
        wkt = Transpose<perm=[1, 0]>(wk)
        k = MatMul(h, wkt)
        wvf = Cast<to=1>(wv)
        v = MatMul(h, wvf)
        p2 = Pow(x2, two)
        m2 = ReduceMean(p2, axes)
        e2 = Add(m2, eps)
        r2 = Sqrt(e2)
        ir2 = Reciprocal(r2)
        nx2 = Mul(x2, ir2)
        h2 = Mul(nx2, gamma)
        o = MatMul(h2, wo)
    }}"""
    rng = np.random.default_rng(0)
    inits = {"two": np.array(2.0, np.float32), "axes": np.array([-1]), "eps": np.array(1e-6, np.float32),
             "gamma": rng.uniform(0.5, 1.5, K).astype(np.float32), "wq": _w(rng, K, 8), "wk": _w(rng, 4, K),
             "wv": _w(rng, K, 4, dtype=np.float16), "wo": _w(rng, K, 8)}
    proto = model_from_text(text, inits)
    groups, skipped, _, model = _fold_and_compare(tmp_path, proto, {"x": _x(0), "x2": _x(1)})
    assert not skipped
    g = _by_sites(groups)
    assert set(g) == {("wk", "wq", "wv"), ("wo",)}
    assert all(grp.kind == "norm_gamma" for grp in groups)
    # each norm now reads its own γ; the float16 weight became a float32 copy read directly
    gammas = {n.inputs[0].name if n.inputs[0].const_value is not None else n.inputs[1].name
              for n in model.graph if n.op_type == "Mul" and n.outputs[0].name in ("h", "h2")}
    assert len(gammas) == 2
    v_node = next(n for n in model.graph if n.outputs[0].name == "v")
    assert v_node.inputs[1].const_value.dtype == ir.DataType.FLOAT


def test_layernorm_with_bias_into_gemm_and_matmul(tmp_path: Path) -> None:
    text = HDR + f"""
    g (float[B, {K}] x) => (float[B, 8] y, float[B, 4] z) {{
        h = LayerNormalization<axis=-1, epsilon=1e-5>(x, gamma, beta)
        y = Gemm<transB=1>(h, wy, by)
        z = MatMul(h, wz)
    }}"""
    rng = np.random.default_rng(1)
    inits = {"gamma": rng.uniform(0.5, 1.5, K).astype(np.float32), "beta": _w(rng, K), "wy": _w(rng, 8, K),
             "by": _w(rng, 8), "wz": _w(rng, K, 4)}
    groups, _, _, _ = _fold_and_compare(tmp_path, model_from_text(text, inits), {"x": _x(0, (5, K))})
    (grp,) = groups
    assert grp.kind == "norm_gamma" and grp.producer.op_type == "LayerNormalization"
    assert sorted(r.index for r in grp.absorb) == [1, 2]


def test_simplified_layernorms(tmp_path: Path) -> None:
    """SimplifiedLayerNormalization (ORT registers it in the default domain) and
    com.microsoft SkipSimplifiedLayerNormalization whose sum output is also a graph output."""
    text = HDR + f"""
    g (float[B, S, {K}] x, float[B, S, {K}] skip) => (float[B, S, 8] y, float[B, S, 8] z, float[B, S, {K}] sum) {{
        h = SimplifiedLayerNormalization<axis=-1, epsilon=1e-5>(x, g1)
        y = MatMul(h, wy)
        h2, mean, inv, sum = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-5>(x, skip, g2)
        z = MatMul(h2, wz)
    }}"""
    rng = np.random.default_rng(2)
    proto = onnx.parser.parse_model(text)  # no onnx.checker: SimplifiedLayerNormalization is an ORT op
    for name, arr in {"g1": rng.uniform(0.5, 1.5, K), "g2": rng.uniform(0.5, 1.5, K),
                      "wy": _w(rng, K, 8), "wz": _w(rng, K, 8)}.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
    groups, _, _, _ = _fold_and_compare(tmp_path, proto, {"x": _x(0), "skip": _x(1)}, checker=False)
    kinds = {g.producer.op_type: g.kind for g in groups}
    assert kinds == {"SimplifiedLayerNormalization": "norm_gamma", "SkipSimplifiedLayerNormalization": "norm_gamma"}


def test_mlp_down_proj_folds_into_up_columns(tmp_path: Path) -> None:
    """down(SiLU(gate(x)) * (up(x) + b)): down's input absorbs 1/s in up's columns and bias;
    gate/up read a graph input, so they get an inserted Mul."""
    text = HDR + f"""
    g (float[B, S, {K}] x) => (float[B, S, {K}] y) {{
        a = MatMul(x, wg)
        sg = Sigmoid(a)
        silu = Mul(a, sg)
        u0 = MatMul(x, wu)
        u = Add(u0, bu)
        m = Mul(silu, u)
        y = MatMul(m, wd)
    }}"""
    rng = np.random.default_rng(3)
    inits = {"wg": _w(rng, K, 32), "wu": _w(rng, K, 32), "bu": _w(rng, 32), "wd": _w(rng, 32, K)}
    groups, _, fold, model = _fold_and_compare(tmp_path, model_from_text(text, inits), {"x": _x(0)})
    g = _by_sites(groups)
    assert g[("wg", "wu")].kind == "mul_insert" and fold.inserted == ["x"]
    down = g[("wd",)]
    assert down.kind == "linear_columns" and down.producer.inputs[1].name == "wu"
    assert sorted((r.node.op_type, r.index) for r in down.absorb) == [("Add", 1), ("MatMul", 1)]
    assert {n.inputs[0].name for n in model.graph if n.op_type == "MatMul"} >= {fold.renamed["x"]}


def test_plain_matmul_chain_with_shared_weight(tmp_path: Path) -> None:
    """h = x W1 + b feeds W2 (linear_columns); W1 is also read by a second MatMul: it is copied, not mutated."""
    text = HDR + f"""
    g (float[B, {K}] x) => (float[B, 8] y, float[B, {K}] t) {{
        h0 = MatMul(x, w1)
        h = Add(bh, h0)
        y = MatMul(h, w2)
        t = MatMul(x, w1)
    }}"""
    rng = np.random.default_rng(4)
    inits = {"w1": _w(rng, K, K), "bh": _w(rng, K), "w2": _w(rng, K, 8)}
    proto = model_from_text(text, inits)
    groups, _, _, model = _fold_and_compare(tmp_path, proto, {"x": _x(0, (5, K))})
    assert _by_sites(groups)[("w2",)].kind == "linear_columns"
    readers = [n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name in ("h0", "t")]
    assert len(set(readers)) == 2  # the two readers of w1 no longer share one tensor


def _insert_graph() -> onnx.ModelProto:
    text = HDR + f"""
    g (float[B, {K}] x) => (float[B, 8] y, float[B, {K}] r) {{
        r = Relu(x)
        y = MatMul(r, w)
    }}"""
    return model_from_text(text, {"w": _w(np.random.default_rng(5), K, 8)})


def test_inserted_mul_when_activation_has_other_consumers(tmp_path: Path) -> None:
    groups, _, fold, model = _fold_and_compare(tmp_path, _insert_graph(), {"x": _x(0, (5, K))})
    (grp,) = groups
    assert grp.kind == "mul_insert" and fold.inserted == ["r"]
    assert "r" in [o.name for o in model.graph.outputs]  # the graph output still reads the unscaled r


def test_no_insert_refuses_listing_groups() -> None:
    model = ir.from_proto(_insert_graph())
    groups, _ = find_scaling_groups(model, find_linear_sites(model).sites)
    with pytest.raises(PreconditionError, match=r"\['r'\]"):
        FoldScalesPass(_scales(groups), groups, no_insert=True)(model)
    assert [n.op_type for n in model.graph] == ["Relu", "MatMul"]


def test_skip_without_scales_or_unit_scales() -> None:
    model = ir.from_proto(_insert_graph())
    before = ir.to_proto(model).SerializeToString()
    groups, _ = find_scaling_groups(model, find_linear_sites(model).sites)
    assert not FoldScalesPass({}, groups)(model).modified
    assert not FoldScalesPass({"r": np.ones(K, np.float32)}, groups)(model).modified
    assert ir.to_proto(model).SerializeToString() == before


def test_scale_validation() -> None:
    model = ir.from_proto(_insert_graph())
    groups, _ = find_scaling_groups(model, find_linear_sites(model).sites)
    for bad, match in [({"r": np.ones(K - 1)}, "shape"), ({"r": -np.ones(K)}, "> 0"),
                       ({"r": np.full(K, np.nan)}, "> 0"), ({"nope": np.ones(K)}, "no scaling group")]:
        with pytest.raises(ValueError, match=match):
            FoldScalesPass(bad, groups)


def _short_names(grp: ScalingGroup) -> tuple[str, ...]:
    """The group's sites as q_proj, down_proj, ... (lm_head.weight for the head)."""
    return tuple(sorted(s.weight_name.split(".")[-2] if "layers" in s.weight_name else s.weight_name
                        for s in grp.sites))


def _tiny_groups(o_proj: bool) -> list[tuple[tuple[str, ...], str]]:
    """The tiny LLaMA's expected groups in graph order, with or without o_proj's (v→o) group."""
    expected = []
    for _layer in range(2):
        expected += [(("k_proj", "q_proj", "v_proj"), "norm_gamma")]
        expected += [(("o_proj",), "linear_columns")] if o_proj else []
        expected += [(("gate_proj", "up_proj"), "norm_gamma"), (("down_proj",), "linear_columns")]
    return expected + [(("lm_head.weight",), "norm_gamma")]


def test_tiny_llama_groups_and_exact_fold(tiny_export: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(tiny_export / "model.onnx"))
    lm_head_before = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "lm_head.weight"))
    ids = np.random.default_rng(0).integers(0, 300, (2, 9), dtype=np.int64)
    groups, skipped, _, model = _fold_and_compare(tmp_path, proto, {"input_ids": ids}, tol=1e-4)
    assert [(_short_names(g), g.kind) for g in groups] == _tiny_groups(o_proj=False)
    for g in groups:
        if g.kind == "linear_columns":
            assert g.producer.inputs[1].name.endswith("up_proj.weight")
    # grouped-query attention (4 heads, 2 kv heads): v_proj has 32 outputs, o_proj reads 64
    assert len(skipped) == 2 and all(s.reason.startswith(f"{ATTENTION_SKIP_REASON}: grouped-query attention (")
                                     and "v_proj.weight 32 outputs, this layer reads 64" in s.reason
                                     for s in skipped)
    # the tied table: the Gather still reads the original values, the LM head a scaled copy
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None)
    assert gather.inputs[0].name == "lm_head.weight"
    np.testing.assert_array_equal(gather.inputs[0].const_value.numpy(), lm_head_before)
    head = next(n for n in model.graph if n.outputs[0].name == "logits")
    assert head.inputs[1].producer().inputs[0].name == "lm_head.weight_scaled"


def test_tiny_llama_without_gqa_folds_o_proj_into_v_proj(tiny_mha_export: Path, tmp_path: Path) -> None:
    """kv_heads == heads: o_proj's scale passes through P·V into v_proj's output columns (identity map)."""
    proto = onnx.load(str(tiny_mha_export / "model.onnx"))
    ids = np.random.default_rng(0).integers(0, 300, (2, 9), dtype=np.int64)
    groups, skipped, fold, _ = _fold_and_compare(tmp_path, proto, {"input_ids": ids}, tol=1e-4)
    assert not skipped
    assert [(_short_names(g), g.kind) for g in groups] == _tiny_groups(o_proj=True)
    o_groups = [g for g in groups if _short_names(g) == ("o_proj",)]
    for g in o_groups:
        assert g.producer.inputs[1].name.endswith("v_proj.weight") and g.channels is None
        assert g.through is not None and g.through.op_type == "MatMul"
    assert {g.name for g in o_groups} <= set(fold.folded)


def _attention_graph(o_perm: str, v_op: str = "Identity") -> onnx.ModelProto:
    """Two-head attention with static shapes: v = x Wv + b (then `v_op`), heads split by Reshape/Transpose,
    P·V merged back through Transpose<perm=`o_perm`> and Reshape, read by o = MatMul(., Wo)."""
    text = HDR + f"""
    g (float[2, 3, {K}] x) => (float[2, 3, 8] y) {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v0 = MatMul(x, wv)
        v1 = Add(v0, bv)
        v = {v_op}(v1)
        {ATTENTION}
        at = Transpose<perm={o_perm}>(a)
        am = Reshape(at, merged)
        y = MatMul(am, wo)
    }}"""
    rng = np.random.default_rng(7)
    inits = {"wq": _w(rng, K, K), "wk": _w(rng, K, K), "wv": _w(rng, K, K), "bv": _w(rng, K), "wo": _w(rng, K, 8),
             "heads": np.array([2, 3, 2, K // 2]), "merged": np.array([2, 3, K])}
    return onnx.shape_inference.infer_shapes(model_from_text(text, inits))


def test_attention_heads_merged_dim_major_fold_through_a_permutation(tmp_path: Path) -> None:
    """P·V [b, h, s, d] merged as [b, s, d, h]: o's channel d*2 + h carries v's column h*8 + d (and its bias)."""
    groups, skipped, _, _ = _fold_and_compare(tmp_path, _attention_graph("[0, 2, 3, 1]"), {"x": _x(0, (2, 3, K))})
    assert not skipped
    (o,) = [g for g in groups if g.site_names and g.sites[0].weight_name == "wo"]
    assert o.kind == "linear_columns" and o.producer.inputs[1].name == "wv"
    assert sorted((r.node.op_type, r.index) for r in o.absorb) == [("Add", 1), ("MatMul", 1)]
    assert o.channels == tuple(h * (K // 2) + d for d in range(K // 2) for h in range(2))


@pytest.mark.parametrize(("o_perm", "v_op", "reason"), [
    ("[0, 2, 1, 3]", "Relu", "V is not a layout of a linear layer's output (reached Relu)"),
    ("[0, 3, 1, 2]", "Identity", "its channels are not a permutation of V's columns"),  # merges the sequence axis
])
def test_attention_outputs_that_cannot_take_v_scales_are_skipped(o_perm: str, v_op: str, reason: str) -> None:
    model = ir.from_proto(_attention_graph(o_perm, v_op))
    groups, skipped = find_scaling_groups(model, find_linear_sites(model).sites)
    assert [s.reason for s in skipped] == [f"{ATTENTION_SKIP_REASON}: {reason}"]
    assert [g.sites[0].weight_name for g in groups] == ["wq"]  # q, k, v read x: one group
