"""Rotation passes (γ fold, R1, R2, R4): ORT computes the same outputs before and after, the intermediate
activations are really rotated (x Q against numpy), refusals and skips say why, bad configs are rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes import PreconditionError

from graphs import run
from rotation_graphs import decoder, feeds as text_feeds
from ptqonnx.errors import UserError
from ptqonnx.graph import find_linear_sites
from ptqonnx.graph.residual import find_residual_stream
from ptqonnx.graph.value_heads import find_value_heads
from ptqonnx.numerics.rotation import block_diagonal, hadamard, rotation_matrix
from ptqonnx.passes import run_passes
from ptqonnx.passes.rotate_fold_gamma import FoldNormGammaPass
from ptqonnx.passes.rotate_heads import RotateValueHeadsPass
from ptqonnx.passes.rotate_online import OnlineHadamardPass
from ptqonnx.passes.rotate_residual import RotateResidualPass

TOL = 1e-5  # max |after - before| / max |before|, fp32
EXPORTS = ["tiny_export", "tiny_mha_export", "tiny_untied_export"]


@pytest.fixture(scope="module")
def tiny_untied_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.models.tiny import build_tiny_llama

    hf = build_tiny_llama(tmp_path_factory.mktemp("untied_hf"), seed=0, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("untied_onnx")
    export_causal_lm(str(hf), out, kv_cache=False)
    return out


def _save(model: ir.Model, path: Path) -> Path:
    ir.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def _probe(path: Path, feeds: dict, extra: tuple[str, ...] = (), level: str = "all") -> dict[str, np.ndarray]:
    """All graph outputs plus the values named in `extra`, computed by ORT."""
    model = ir.load(str(path))
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name in extra:
        if not values[name].is_graph_output():
            model.graph.outputs.append(values[name])
    probe = path.with_name(path.stem + "_probe.onnx")
    ir.save(model, str(probe))
    names = [v.name for v in model.graph.outputs]
    return dict(zip(names, run(probe, feeds, level)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _assert_same_outputs(before: Path, after: Path, feeds: dict) -> None:
    for level in ("all", "disable"):
        ref, got = _probe(before, feeds, level=level), _probe(after, feeds, level=level)
        for name in ref:
            assert _rel(ref[name], got[name]) <= TOL, (level, name, _rel(ref[name], got[name]))


def _ids(export: Path, seed: int = 0) -> dict[str, np.ndarray]:
    vocab = ir.load(str(export / "model.onnx")).graph.outputs[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 300
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, size=(2, 13)).astype(np.int64)}


def _apply(src: Path, dst: Path, *passes) -> tuple[ir.Model, list]:
    model = ir.load(str(src))
    results = [p(model) for p in passes]
    _save(model, dst)
    return model, results


# -- structure --------------------------------------------------------------------------------------------


def test_residual_stream_is_found_structurally(tiny_export: Path, tiny_untied_export: Path) -> None:
    stream = find_residual_stream(ir.load(str(tiny_export / "model.onnx")))
    assert stream and stream.hidden == 64 and stream.tied
    assert [len(n.readers) for n in stream.norms] == [3, 2, 3, 2, 1]  # q/k/v, gate/up (x2), LM head
    assert len(stream.writers) == 4 and len(stream.values) == 5 and stream.head.is_lm_head
    assert not find_residual_stream(ir.load(str(tiny_untied_export / "model.onnx"))).tied
    for norm in ("rms", "rms_div", "nogamma", "fused"):
        found = find_residual_stream(ir.from_proto(decoder(norm)))
        assert found and len(found.norms) == 3 and len(found.writers) == 2, norm


# -- exactness on the tiny LLaMA exports ------------------------------------------------------------------


@pytest.mark.parametrize("export", EXPORTS)
def test_fold_gamma_is_exact(export: str, request, tmp_path: Path) -> None:
    src = request.getfixturevalue(export)
    fold = FoldNormGammaPass()
    model, (res,) = _apply(src / "model.onnx", tmp_path / "fold.onnx", fold)
    assert res.modified and len(fold.folded) == 5 and fold.refusal is None
    stream = find_residual_stream(model)
    assert all(np.all(n.gamma.node.inputs[n.gamma.index].const_value.numpy() == 1) for n in stream.norms)
    table = ir.load(str(src / "model.onnx")).graph.initializers[stream.embedding.inputs[0].name]
    assert np.array_equal(stream.embedding.inputs[0].const_value.numpy(), table.const_value.numpy())  # Gather's table
    assert fold.untied_bytes == (table.const_value.nbytes if export != "tiny_untied_export" else 0)
    assert not stream.tied
    _assert_same_outputs(src / "model.onnx", tmp_path / "fold.onnx", _ids(src))


@pytest.mark.parametrize("kind", ["random_hadamard", "random_orthogonal"])
@pytest.mark.parametrize("export", EXPORTS)
def test_rotate_residual_is_exact_and_rotates_the_stream(export: str, kind: str, request, tmp_path: Path) -> None:
    src = request.getfixturevalue(export)
    folded, _ = _apply(src / "model.onnx", tmp_path / "fold.onnx", FoldNormGammaPass())
    rot = RotateResidualPass(kind, seed=3)
    model, (res,) = _apply(tmp_path / "fold.onnx", tmp_path / "rot.onnx", rot)
    assert res.modified and rot.refusal is None
    stream = find_residual_stream(model)
    q = rotation_matrix(64, kind, 3)
    acts = tuple(n.output.name for n in stream.norms) + tuple(v.name for v in stream.values)
    ref, got = _probe(tmp_path / "fold.onnx", _ids(src), acts), _probe(tmp_path / "rot.onnx", _ids(src), acts)
    for name in acts:  # every stream value and norm output is x Q
        assert _rel(ref[name] @ q, got[name]) <= TOL, name
    assert _rel(ref["logits"], got["logits"]) <= TOL
    _assert_same_outputs(src / "model.onnx", tmp_path / "rot.onnx", _ids(src, seed=1))


def test_rotate_value_heads_is_exact_with_and_without_gqa(tiny_export: Path, tiny_mha_export: Path,
                                                           tmp_path: Path) -> None:
    for src, groups in ((tiny_export, (0, 0, 1, 1)), (tiny_mha_export, (0, 1, 2, 3))):
        pairs, skipped = find_value_heads(ir.load(str(src / "model.onnx")))
        assert [p.groups for p in pairs] == [groups, groups] and not skipped and pairs[0].head_dim == 16
        r2 = RotateValueHeadsPass("random_hadamard", seed=5)
        model, (res,) = _apply(src / "model.onnx", tmp_path / "r2.onnx", r2)
        assert res.modified and len(r2.rotated) == 2
        o_inputs = tuple(p.o.activation.name for p in pairs)
        ref, got = _probe(src / "model.onnx", _ids(src), o_inputs), _probe(tmp_path / "r2.onnx", _ids(src), o_inputs)
        rot = block_diagonal(rotation_matrix(16, "random_hadamard", 5), 4)
        for name in o_inputs:  # o_proj's input is X blockdiag(R)
            assert _rel(ref[name] @ rot, got[name]) <= TOL
        _assert_same_outputs(src / "model.onnx", tmp_path / "r2.onnx", _ids(src))


def test_rotate_value_heads_rotates_a_v_bias(tiny_mha_export: Path, tmp_path: Path) -> None:
    model = ir.load(str(tiny_mha_export / "model.onnx"))
    rng = np.random.default_rng(0)
    for pair in find_value_heads(model)[0]:  # v_proj(Z) + b: the new float reference
        out = pair.v.node.outputs[0]
        b = ir.val(f"{pair.v.name}_b", const_value=ir.tensor(rng.standard_normal(pair.v.N).astype(np.float32)))
        model.graph.register_initializer(b)
        biased = ir.Value(name=f"{out.name}_biased", type=out.type, shape=ir.Shape(out.shape))
        for node, idx in list(out.uses()):
            node.replace_input_with(idx, biased)
        model.graph.insert_after(pair.v.node, [ir.node("Add", [out, b], outputs=[biased])])
    _save(model, tmp_path / "src.onnx")
    pairs, _ = find_value_heads(ir.load(str(tmp_path / "src.onnx")))
    assert len(pairs) == 2 and all(p.v_bias is not None for p in pairs)
    _, (res,) = _apply(tmp_path / "src.onnx", tmp_path / "r2.onnx", RotateValueHeadsPass(seed=1))
    assert res.modified
    _assert_same_outputs(tmp_path / "src.onnx", tmp_path / "r2.onnx", _ids(tiny_mha_export))


@pytest.mark.parametrize("export", EXPORTS)
def test_online_hadamard_is_exact_and_not_a_linear_layer(export: str, request, tmp_path: Path) -> None:
    src = request.getfixturevalue(export)
    sites_before = len(find_linear_sites(ir.load(str(src / "model.onnx"))).sites)
    r4 = OnlineHadamardPass()
    model, (res,) = _apply(src / "model.onnx", tmp_path / "r4.onnx", r4)
    assert res.modified and len(r4.rotated) == 2 and not r4.skipped
    assert len(find_linear_sites(model).sites) == sites_before  # the inserted MatMuls are not quantizable sites
    downs = [s for s in find_linear_sites(ir.load(str(src / "model.onnx"))).sites if s.name in r4.rotated]
    new_inputs = {s.name: s.activation.name for s in find_linear_sites(model).sites if s.name in r4.rotated}
    ref = _probe(src / "model.onnx", _ids(src), tuple(s.activation.name for s in downs))
    got = _probe(tmp_path / "r4.onnx", _ids(src), tuple(new_inputs.values()))
    for s in downs:
        assert _rel(ref[s.activation.name] @ hadamard(128), got[new_inputs[s.name]]) <= TOL
    _assert_same_outputs(src / "model.onnx", tmp_path / "r4.onnx", _ids(src))
    again = OnlineHadamardPass()
    assert not again(model).modified and len(again.skipped) == 2 and "already" in again.skipped[0].reason


def test_all_rotations_compose(tiny_export: Path, tmp_path: Path) -> None:
    passes = [FoldNormGammaPass(), RotateResidualPass(), RotateValueHeadsPass(), OnlineHadamardPass()]
    _, results = _apply(tiny_export / "model.onnx", tmp_path / "all.onnx", *passes)
    assert all(r.modified for r in results)
    _assert_same_outputs(tiny_export / "model.onnx", tmp_path / "all.onnx", _ids(tiny_export, seed=2))


def test_kv_cache_model_rotates_the_stream_but_not_cached_values(tiny_export: Path, tmp_path: Path) -> None:
    passes = [FoldNormGammaPass(), RotateResidualPass(), RotateValueHeadsPass(), OnlineHadamardPass()]
    _, results = _apply(tiny_export / "model_kv.onnx", tmp_path / "kv.onnx", *passes)
    assert [r.modified for r in results] == [True, True, False, True]
    assert len(passes[2].skipped) == 2 and all("KV cache" in s.reason for s in passes[2].skipped)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 250, size=(2, 3)).astype(np.int64),
             "attention_mask": np.ones((2, 7), np.int64), "position_ids": np.tile(np.arange(4, 7), (2, 1))}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
    _assert_same_outputs(tiny_export / "model_kv.onnx", tmp_path / "kv.onnx", feeds)  # logits and present.*


# -- text graphs: every accepted form, Paley sizes, tied heads kept tied ----------------------------------


@pytest.mark.parametrize("norm", ["rms", "rms_div", "fused"])
@pytest.mark.parametrize("head", ["tied_transpose", "tied_gemm", "untied"])
def test_text_decoders_rotate_exactly(norm: str, head: str, tmp_path: Path) -> None:
    # hidden 20 (Paley I, q = 19), intermediate 36 (Paley II, q = 17); Gemm writers with C, Add biases
    src = tmp_path / "src.onnx"
    onnx.save(decoder(norm, head=head), str(src))
    passes = [FoldNormGammaPass(), RotateResidualPass(seed=1), OnlineHadamardPass()]
    _, results = _apply(src, tmp_path / "rot.onnx", *passes)
    assert all(r.modified for r in results) and passes[2].rotated and not passes[2].skipped
    _assert_same_outputs(src, tmp_path / "rot.onnx", text_feeds())


@pytest.mark.parametrize("head", ["tied_transpose", "tied_gemm"])
def test_a_tied_head_without_gamma_stays_tied(head: str, tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    onnx.save(decoder("nogamma", head=head), str(src))
    fold, rot = FoldNormGammaPass(), RotateResidualPass(matrix=hadamard(20))
    model, results = _apply(src, tmp_path / "rot.onnx", fold, rot)
    assert [r.modified for r in results] == [False, True] and fold.refusal is None  # no γ: nothing to fold
    assert find_residual_stream(model).tied  # one table, rotated once for the Gather and the head
    assert len(model.graph.initializers) == len(ir.load(str(src)).graph.initializers)
    e = np.asarray(ir.load(str(src)).graph.initializers["E"].const_value.numpy(), np.float64)
    assert np.allclose(model.graph.initializers["E"].const_value.numpy(), e @ hadamard(20), atol=1e-6)
    _assert_same_outputs(src, tmp_path / "rot.onnx", text_feeds())


# -- refusals, skips, validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, reason", [
    (dict(norm="layer"), "SliceGPT"), (dict(norm="layer_decomposed"), "SliceGPT"),
    (dict(stream_relu=True), "neither an RMSNorm nor a residual Add"),
    (dict(gamma_input=True), "γ of the norm is not a constant vector"),
])
def test_unprovable_streams_are_refused_with_the_reason(kw: dict, reason: str) -> None:
    for p in (FoldNormGammaPass(), RotateResidualPass(), OnlineHadamardPass()):
        model = ir.from_proto(decoder(**kw))
        assert not p(model).modified and reason in p.refusal.reason
    assert not RotateValueHeadsPass()(ir.from_proto(decoder(**kw))).modified  # no attention at all


def test_sizes_without_a_hadamard_are_skipped() -> None:
    r4 = OnlineHadamardPass()
    assert not r4(ir.from_proto(decoder("rms", inter=52))).modified
    assert [s.reason for s in r4.skipped] == ["no Hadamard construction for K=52"] * 2 and r4.refusal is None


def test_rotate_residual_requires_folded_gamma(tiny_export: Path) -> None:
    with pytest.raises(PreconditionError, match="FoldNormGammaPass"):
        RotateResidualPass()(ir.load(str(tiny_export / "model.onnx")))
    with pytest.raises(UserError, match="γ folded first"):
        run_passes([RotateResidualPass()], ir.load(str(tiny_export / "model.onnx")))
    model = ir.from_proto(decoder("nogamma"))
    with pytest.raises(PreconditionError, match="20 wide"):
        RotateResidualPass(matrix=hadamard(64))(model)


def test_configs_are_validated(tiny_export: Path) -> None:
    for cls in (RotateResidualPass, RotateValueHeadsPass):
        with pytest.raises(ValueError, match="unknown rotation kind 'givens'"):
            cls("givens")
        with pytest.raises(ValueError, match="orthogonal"):
            cls(matrix=np.ones((4, 4)))
    r2 = RotateValueHeadsPass(matrix=hadamard(8))  # head_dim of the tiny model is 16
    assert not r2(ir.load(str(tiny_export / "model.onnx"))).modified
    assert [s.reason for s in r2.skipped] == ["rotation matrix is 8 wide, head_dim is 16"] * 2
