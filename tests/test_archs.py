"""Models as users bring them: eleven architectures from transformers configs through export and compile.

Each tiny random model (`ptqonnx.models.tiny.build_tiny`, hidden 64, 2 layers) is exported once per session
and checked for: the graph signature and ORT == torch logits; the KV-cache graph (prefill + decode == the
full-sequence graph; slow); which scaling groups AWQ / SmoothQuant get (folded into a norm's γ/β or a linear
layer's columns, an inserted Mul, or skipped and why: the "what models it takes" table) and that folding
random scales leaves the float model unchanged; and the CLI's rtn, gptq, awq and smoothquant --w8a8 outputs
(I/O names, dtypes and ranks kept; logits close to the float model's).

Error bounds (relative Frobenius error of the logits on held-out windows of the tiny corpus):
* RTN INT4 sym g128 (K <= 128 here: one block per row, step = max|w| / 8): a Gaussian row of 64-128 has
  max|w| ~ 2.4-2.7 σ, so the rounding error is ~ max|w| / (8 √12) ~ 0.1 σ per weight (numpy on Gaussian
  rows: 9.5 % at K = 64, 10.4 % at K = 128), ~10 % per layer; the logits sit behind 9 quantized layers in
  series (2 blocks x 4 stages + LM head): √9 x 10 % ~ 30 % at unit gain. Measured 0.17-0.38 over the
  eleven archs; bound 0.5. RTN is also checked exactly against the float graph with numpy-dequantized
  weights, so the bound is about the grid, not the lowering.
* GPTQ / AWQ minimise each layer's output error on the calibration set and include RTN's solution (AWQ's
  alpha = 0), so on held-out text they stay near RTN's error or below: measured ratio 0.55-1.02; bound
  1.1 x RTN's error on the same windows (and the INT4 bound).
* SmoothQuant W8A8 (8-bit weights per channel: 0.6 % each on Gaussian rows; 8-bit static per-tensor
  activations, whose step is set by the largest |x| of the whole tensor, a few % each): measured
  0.027-0.091; bound 0.15.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from ptqonnx.graph import find_linear_sites, find_scaling_groups, trace_const
from ptqonnx.models.tiny import TINY_ARCHS
from ptqonnx.runtime.ort import make_session
from graphs import compile_cli, held_out_ids, model_from_text, rel_error, run, run_optimized

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

# One arch per structural form runs every method in the fast suite; the rest (same forms again) are slow.
FAST = ("qwen2", "phi3", "gemma", "gpt2", "opt")
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}  # tiny config: 4 heads, 2 KV heads
INT4_BOUND, W8A8_BOUND, VS_RTN = 0.5, 0.15, 1.1
CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]
METHODS = {"gptq": ["--method", "gptq"], "awq": ["--method", "awq", "--awq-grid", "5"],
           "smoothquant": ["--method", "smoothquant", "--w8a8"]}


def _arch_params(archs=TINY_ARCHS, fast=FAST):
    return [pytest.param(a, marks=() if a in fast else pytest.mark.slow) for a in archs]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """arch, kv -> (HF folder, ExportResult); built and exported once per session (a KV export serves both)."""
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.models.tiny import build_tiny

    cache: dict = {}

    def get(arch: str, kv: bool = False):
        for key in ((arch, True), (arch, False))[: 1 if kv else 2]:
            if key in cache:
                return cache[key]
        hf = cache.get(arch) or build_tiny(arch, tmp_path_factory.mktemp(f"{arch}_hf"))
        cache[arch] = hf
        cache[arch, kv] = (hf, export_causal_lm(str(hf), tmp_path_factory.mktemp(f"{arch}_onnx"), kv_cache=kv))
        return cache[arch, kv]

    return get


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """At ORT's default level; for a W8A8 model on a CPU where ORT's int8 GEMM saturates, as on one where it
    does not (`graphs.run_optimized`)."""
    names = [o.name for o in make_session(path).get_outputs()]
    return run_optimized(path, {"input_ids": ids})[names.index("logits")]


def _prepared(path: Path) -> ir.Model:
    """The model as the compile sees it before quantizing (constants lifted, names fixed, sorted)."""
    from ptqonnx.io import load_model
    from ptqonnx.passes import run_passes

    model = load_model(path)
    run_passes([common_passes.LiftConstantsToInitializersPass(), common_passes.NameFixPass(),
                common_passes.TopologicalSortPass()], model)
    return model


# -- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", _arch_params(fast=()))
def test_kv_cache_graph_decodes_like_the_full_graph(arch: str, exported, tmp_path: Path) -> None:
    """model_kv.onnx for every arch: KV names and [batch, kv_heads, *, head_dim] dims; prefill 8 then 4
    single-token steps give the full graph's logits, in float and after RTN (which keeps the signature)."""
    _, res = exported(arch, kv=True)
    kv_heads = 2 if arch in GQA else 4
    assert (res.num_layers, res.num_kv_heads, res.head_dim) == (2, kv_heads, 16)
    kv = onnx.load(str(res.kv_model_path))
    names = [f"{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in kv.graph.input[3:]] == [
        (f"past_key_values.{n}", ["batch", kv_heads, "past_sequence", 16]) for n in names]
    assert [(o.name, dims(o)) for o in kv.graph.output[1:]] == [
        (f"present.{n}", ["batch", kv_heads, "total_sequence", 16]) for n in names]
    rtn_full = compile_cli(res.model_path, tmp_path / "full.onnx", "--method", "rtn")
    rtn_kv = compile_cli(res.kv_model_path, tmp_path / "kv.onnx", "--method", "rtn")
    ids = np.random.default_rng(7).integers(0, 300, size=(2, 12)).astype(np.int64)
    for full, cached in ((res.model_path, res.kv_model_path), (rtn_full, rtn_kv)):
        np.testing.assert_allclose(_decode(cached, ids, kv_heads), _logits(full, ids), atol=1e-4, rtol=0)


def _decode(path: Path, ids: np.ndarray, kv_heads: int) -> np.ndarray:
    sess = make_session(path)
    out_names = [o.name for o in sess.get_outputs()]
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, kv_heads, 0, 16), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}
    pieces, pos = [], 0
    for chunk in (ids[:, :8], *(ids[:, j : j + 1] for j in range(8, ids.shape[1]))):
        s = chunk.shape[1]
        res = dict(zip(out_names, sess.run(None, {
            "input_ids": chunk, "attention_mask": np.ones((batch, pos + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(pos, pos + s, dtype=np.int64), (batch, s)).copy(), **past})))
        pieces.append(res["logits"])
        past = {n: res["present." + n[len("past_key_values."):]] for n in past}
        pos += s
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_export_matches_torch_and_saves_a_portable_tokenizer(arch: str, exported) -> None:
    """model.onnx: input_ids -> logits with symbolic batch/sequence, ORT == torch at a shape other than the
    export's; tokenizer_config names PreTrainedTokenizerFast and encodes as tokenizer.json does."""
    from ptqonnx.text import load_tokenizer

    hf, res = exported(arch)
    m = onnx.load(str(res.model_path))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])]
    assert [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output] == [
        ("logits", onnx.TensorProto.FLOAT, ["batch", "sequence", "vocab"])]
    ids = np.random.default_rng(5).integers(0, 300, size=(3, 13)).astype(np.int64)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(_logits(res.model_path, ids), ref, atol=1e-4, rtol=0)

    config = json.loads((res.out_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"backend", "is_local", "local_files_only"} & set(config)
    text = "The red model runs quickly, and \u00e9 is a byte pair.<|endoftext|>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(res.out_dir))
    assert hf_tok(text).input_ids == load_tokenizer(res.out_dir).encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"


def _without_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_folder_without_tokenizer_exports_without_one(exported, tmp_path: Path, caplog) -> None:
    """qwen2 (transformers would make a 1-entry tokenizer) and llama (it would refuse unclearly): one warning,
    no tokenizer written, the graph exported."""
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.models.smollm2 import load_hf_causal_lm

    qwen2 = _without_tokenizer(exported("qwen2")[0], tmp_path / "qwen2")
    with caplog.at_level(logging.WARNING, logger="ptqonnx"):
        res = export_causal_lm(str(qwen2), tmp_path / "out", kv_cache=False, verify=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ptqonnx")]
    assert len(warnings) == 1 and "has no tokenizer files" in warnings[0] and "--tokenizer" in warnings[0]
    assert res.tokenizer_path is None and res.model_path.is_file()
    assert not [p.name for p in res.out_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    model, tokenizer = load_hf_causal_lm(_without_tokenizer(exported("llama")[0], tmp_path / "llama"))
    assert tokenizer is None and type(model).__name__ == "LlamaForCausalLM"


def test_kv_export_refuses_a_cache_that_is_not_key_value_pairs(tmp_path: Path) -> None:
    """Mamba's cache holds convolution / recurrent states, not per-layer keys and values: one line, nothing
    written (before any graph is exported)."""
    from ptqonnx.errors import UserError
    from ptqonnx.models.export import export_causal_lm

    cfg = transformers.MambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, state_size=4)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "mamba"))
    with pytest.raises(UserError, match=r"^mamba: its cache .* pass --no-kv-cache$"):
        export_causal_lm(str(tmp_path / "mamba"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- scaling groups: the "what models it takes" table ---------------------------------------------------------

_RMS = "folded: Mul γ"
_LN = "folded: LayerNormalization γ, β"
_LLAMA = [("self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", _RMS), ("mlp.gate_proj+mlp.up_proj", _RMS),
          ("mlp.down_proj", "folded: mlp.up_proj columns"), ("self_attn.o_proj", "skipped: grouped-query attention")]
EXPECTED_GROUPS = {  # per decoder layer (both layers alike), then the LM head
    **{a: _LLAMA for a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": [("self_attn.qkv_proj", _RMS),
             ("self_attn.o_proj", "folded: self_attn.qkv_proj columns (its part) through P·V"),
             ("mlp.gate_up_proj", _RMS), ("mlp.down_proj", "folded: mlp.gate_up_proj columns (its part)")],
    "phi": [("self_attn.q_proj+self_attn.k_proj+self_attn.v_proj+mlp.fc1", _LN),
            ("self_attn.dense", "folded: self_attn.v_proj columns through P·V"), ("mlp.fc2", "inserted Mul")],
    "gpt2": [("attn.c_attn", _LN), ("attn.c_proj", "folded: attn.c_attn columns (its part) through P·V"),
             ("mlp.c_fc", _LN), ("mlp.c_proj", "inserted Mul")],
    "opt": [("self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", _LN),
            ("self_attn.out_proj", "folded: self_attn.v_proj columns through P·V"), ("fc1", _LN),
            ("fc2", "folded: fc1 columns")],
    "gpt_neox": [("attention.query_key_value", _LN),
                 ("attention.dense", "folded: attention.query_key_value columns (its part) through P·V"),
                 ("mlp.dense_h_to_4h", _LN), ("mlp.dense_4h_to_h", "inserted Mul")],
}
LM_HEAD = {a: [("lm_head", _LN if a in ("phi", "gpt2", "opt", "gpt_neox") else _RMS)] for a in TINY_ARCHS}


def _short(weight: str) -> str:
    parts = [p for p in weight.split(".") if p != "weight"]
    return ".".join(p for p in parts[-2:] if not p.isdigit())


def _table(model: ir.Model) -> dict[int | None, list[tuple[str, str]]]:
    """layer (None: outside the blocks) -> [(sites, how their scale is absorbed)] in graph order."""
    sites = find_linear_sites(model).sites
    by_node = {id(s.node): s for s in sites}
    groups, skipped = find_scaling_groups(model, sites)
    rows: dict[int | None, list[tuple[str, str]]] = {}

    def add(weight: str, row: tuple[str, str]) -> None:
        layer = re.search(r"\.(\d+)\.", weight)
        rows.setdefault(int(layer.group(1)) if layer else None, []).append(row)

    for g in groups:
        if g.kind == "norm_gamma":
            how = f"folded: {g.producer.op_type} " + ("γ, β" if len(g.absorb) > 1 else "γ")
        elif g.kind == "linear_columns":
            how = (f"folded: {_short(by_node[id(g.producer)].weight_name)} columns" + (" (its part)" if g.width else "")
                   + (" through P·V" if g.through is not None else ""))
        else:
            how = "inserted Mul"
        add(g.sites[0].weight_name, ("+".join(_short(s.weight_name) for s in g.sites), how))
    for s in skipped:
        site = next(x for x in sites if x.name == s.node)
        add(site.weight_name, (_short(site.weight_name), "skipped: " + s.reason.split(": ", 1)[1].split(" (")[0]))
    return rows


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scaling_groups_per_arch_and_exact_folds(arch: str, exported, tmp_path: Path) -> None:
    """Which groups each arch gets (EXPECTED_GROUPS), and folding random s in [1e-2, 1e2] into all of them
    leaves the float model's logits unchanged (ORT, optimizations off)."""
    from ptqonnx.passes.fold_scales import FoldScalesPass

    _, res = exported(arch)
    model = _prepared(res.model_path)
    rows = _table(model)
    assert rows == {0: EXPECTED_GROUPS[arch], 1: EXPECTED_GROUPS[arch], None: LM_HEAD[arch]}
    ids = np.random.default_rng(0).integers(0, 300, (2, 9), dtype=np.int64)
    before = tmp_path / "before.onnx"
    ir.save(model, str(before))
    groups, _ = find_scaling_groups(model, find_linear_sites(model).sites)
    rng = np.random.default_rng(1)
    scales = {g.name: np.exp(rng.uniform(np.log(1e-2), np.log(1e2), g.K)).astype(np.float32) for g in groups}
    fold = FoldScalesPass(scales, groups)
    assert fold(model).modified and len(fold.folded) + len(fold.inserted) == len(groups)
    after = tmp_path / "after.onnx"
    ir.save(model, str(after))
    onnx.checker.check_model(str(after))
    ref = run(before, {"input_ids": ids}, "disable")[0]
    assert rel_error(run(after, {"input_ids": ids}, "disable")[0], ref) < 1e-5


def test_gemma_norms_fold_into_the_one_plus_gamma_constant(exported) -> None:
    """Gemma's RMSNorm computes x̂ (1 + γ): the constant each norm group divides is the exported 1 + γ, not γ."""
    from safetensors.numpy import load_file

    hf, res = exported("gemma")
    gammas = load_file(str(hf / "model.safetensors"))
    model = _prepared(res.model_path)
    groups, _ = find_scaling_groups(model, find_linear_sites(model).sites)
    norms = [g for g in groups if g.kind == "norm_gamma"]
    expected = [f"model.layers.{i}.{n}.weight" for i in range(2)
                for n in ("input_layernorm", "post_attention_layernorm")]
    assert len(norms) == len(expected) + 1  # and the final norm before the LM head
    for g, name in zip(norms, expected + ["model.norm.weight"]):
        (ref,) = g.absorb
        const = trace_const(ref.node.inputs[ref.index]).initializer.const_value.numpy()
        np.testing.assert_array_equal(const, (1.0 + gammas[name]).astype(np.float32))


def test_pooler_gemm_bias_through_identity_is_quantized(tmp_path: Path) -> None:
    """A BERT pooler: tanh(Gemm(h[:, 0], W, Identity(b)), transB=1): a linear site (it was skipped: "bias not
    constant"); RTN equals the float graph with numpy-dequantized W; AWQ and SmoothQuant (calibrated from
    an .npz) scale it through an inserted Mul (h is a graph input) and stay close."""
    from ptqonnx.numerics.quant import dequantize_weight, quantize_weight

    k = 32
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[B, S, {k}] h) => (float[B, {k}] pooled) {{
        first = Gather<axis=1>(h, zero)
        bias = Identity(b)
        dense = Gemm<transB=1>(first, w, bias)
        pooled = Tanh(dense)
    }}"""
    rng = np.random.default_rng(3)
    w, b = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    proto = model_from_text(text, {"w": w, "b": b, "zero": np.array(0, np.int64)})
    (site,) = find_linear_sites(ir.from_proto(proto)).sites
    assert site.bias is not None and trace_const(site.bias).initializer.name == "b" and (site.N, site.K) == (k, k)
    src = tmp_path / "pooler.onnx"
    onnx.save(proto, str(src))
    h = rng.standard_normal((16, 4, k)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", h=h)
    feeds = {"h": h[:4]}
    ref = run(src, feeds, "disable")[0]
    rtn = compile_cli(src, tmp_path / "rtn.onnx", "--method", "rtn", "--group-size", "32")
    w_hat = dequantize_weight(quantize_weight(w, 4, 32, True))  # [N, K], as the Gemm reads it
    np.testing.assert_allclose(run(rtn, feeds)[0], np.tanh(h[:4, 0] @ w_hat.T + b), atol=2e-5)
    rtn_err = rel_error(run(rtn, feeds)[0], ref)
    npz = ["--calib-npz", str(tmp_path / "calib.npz"), "--calib-samples", "16"]
    awq = compile_cli(src, tmp_path / "awq.onnx", "--method", "awq", "--group-size", "32", *npz)
    assert rel_error(run(awq, feeds)[0], ref) <= VS_RTN * rtn_err
    sq = compile_cli(src, tmp_path / "sq.onnx", "--method", "smoothquant", "--w8a8", *npz)
    assert rel_error(run(sq, feeds)[0], ref) < W8A8_BOUND


# -- quantization through the CLI -----------------------------------------------------------------------------


def _dequantized_reference(src: Path, dst: Path) -> Path:
    """The float graph with every linear weight replaced by its RTN INT4 g128 sym dequantization (numpy)."""
    from ptqonnx.numerics.quant import dequantize_weight, quantize_weight

    model = _prepared(src)
    for i, site in enumerate(find_linear_sites(model).sites):
        w_hat = dequantize_weight(quantize_weight(site.weight_nk(), 4, 128, True))  # [N, K]
        n_major = site.node.op_type == "Gemm" and bool(site.node.attributes.get_int("transB", 0))
        value = ir.val(f"ref_weight_{i}", const_value=ir.tensor(w_hat if n_major else w_hat.T.copy()))
        model.graph.register_initializer(value)
        site.node.replace_input_with(1, value)  # bypasses any Transpose/Cast (a tied table keeps its Gather)
    ir.save(model, str(dst))
    return dst


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rtn_is_the_dequantized_float_graph(arch: str, exported, tmp_path: Path) -> None:
    _, res = exported(arch)
    ids = held_out_ids(res.out_dir)
    out = compile_cli(res.model_path, tmp_path / "rtn.onnx", "--method", "rtn")
    got, ref = _logits(out, ids), _logits(res.model_path, ids)
    expected = _logits(_dequantized_reference(res.model_path, tmp_path / "ref.onnx"), ids)
    assert rel_error(got, expected) < 1e-5
    assert rel_error(got, ref) < INT4_BOUND


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", _arch_params())
def test_calibrated_methods_per_arch(arch: str, method: str, exported, calib_text: Path, tmp_path: Path) -> None:
    """gptq, awq (the fold check inside verifies the float model unchanged), smoothquant --w8a8: the output
    keeps the signature and its logits stay within the bounds of the module docstring."""
    _, res = exported(arch)
    ids = held_out_ids(res.out_dir)
    ref = _logits(res.model_path, ids)
    out = compile_cli(res.model_path, tmp_path / f"{method}.onnx", *METHODS[method], "--calib-text", str(calib_text),
                   *CALIB)
    err = rel_error(_logits(out, ids), ref)
    if method == "smoothquant":
        assert err < W8A8_BOUND
    else:
        rtn = compile_cli(res.model_path, tmp_path / "rtn.onnx", "--method", "rtn")
        assert err < INT4_BOUND and err <= VS_RTN * rel_error(_logits(rtn, ids), ref), err
