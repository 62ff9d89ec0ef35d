"""Tiny random causal LMs with an in-process tokenizer, for tests (no downloads, deterministic).

`build_tiny(arch, ...)` makes one of `TINY_ARCHS` from a transformers config built in code, at toy size
(hidden 64, 2 layers by default), so each export takes seconds. The architectures cover the structural
forms a quantizer meets in the wild:

| arch | what it brings |
| --- | --- |
| llama, mistral | RMSNorm γ, separate q/k/v, gate/up, grouped-query attention (SmolLM2's shape) |
| qwen2 | q/k/v with bias |
| qwen3 | per-head RMSNorm on q and k (q_norm, k_norm) |
| phi3 | fused `qkv_proj` and `gate_up_proj` (one weight, several roles) |
| gemma, gemma2 | RMSNorm computing x̂ · (1 + γ); gemma2 also pre/post norms and logit soft-capping |
| phi | LayerNorm with bias, attention and MLP in parallel on one norm, LM head with bias |
| gpt2 | LayerNorm with bias, `Conv1D` (x @ W + b) with fused c_attn, learned positions |
| opt | LayerNorm with bias, q/k/v/out with bias, ReLU MLP, learned positions (offset 2) |
| gpt_neox | fused query_key_value interleaved per head, parallel residual, partial rotary |

`build_tiny_llama` is the llama row with SmolLM2's tied embeddings (the default test model).

The tokenizer is a byte-level BPE trained on seeded generated sentences: every byte has a token, so any
text encodes without `<unk>`, and the vocabulary (256 bytes + merges + specials) is about 300 entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ptqonnx.errors import require_module

__all__ = ["TINY_ARCHS", "build_tiny", "build_tiny_llama", "tiny_corpus"]

logger = logging.getLogger(__name__)

_WORDS = (
    "the a one two three red green blue small large model token window river stone city light "
    "quantize weight scale zero point layer graph tensor runs reads writes holds keeps under over "
    "near far quickly slowly and or but with from into"
).split()
_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def tiny_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Seeded generated sentences (a few words each), used to train the tiny tokenizer and in tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sentences):
        k = int(rng.integers(4, 12))
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=k)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def _train_tokenizer(vocab_size: int, seed: int):
    tokenizers = require_module("tokenizers", "export")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    return tok


# Config kwargs per architecture from (hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta),
# in each config's own vocabulary. Token ids and tying are added by `build_tiny`.
def _rope(d: dict) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(d["rope_theta"])}}


def _llama_like(d: dict) -> dict[str, Any]:
    return dict(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                max_position_embeddings=2048, **_rope(d))


def _with(base: Callable[[dict], dict], **extra: Any) -> Callable[[dict], dict]:
    return lambda d: {**base(d), **{k: (v(d) if callable(v) else v) for k, v in extra.items()}}


_head_dim = lambda d: d["hidden"] // d["heads"]  # noqa: E731  (gemma/qwen3/mistral default to a fixed head_dim)

_ARCHS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "llama": ("LlamaConfig", _with(_llama_like, rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", _with(_llama_like, head_dim=_head_dim, sliding_window=5)),
    "qwen2": ("Qwen2Config", _llama_like),
    "qwen3": ("Qwen3Config", _with(_llama_like, head_dim=_head_dim)),
    "phi3": ("Phi3Config", _with(_llama_like, num_key_value_heads=lambda d: d["heads"])),
    "gemma": ("GemmaConfig", _with(_llama_like, head_dim=_head_dim)),
    "gemma2": ("Gemma2Config", _with(_llama_like, head_dim=_head_dim, query_pre_attn_scalar=_head_dim,
                                     sliding_window=5)),
    "phi": ("PhiConfig", _with(_llama_like, num_key_value_heads=lambda d: d["heads"])),
    "gpt2": ("GPT2Config", lambda d: dict(vocab_size=d["vocab"], n_embd=d["hidden"], n_layer=d["layers"],
                                           n_head=d["heads"], n_inner=d["intermediate"], n_positions=2048)),
    "opt": ("OPTConfig", lambda d: dict(vocab_size=d["vocab"], hidden_size=d["hidden"], ffn_dim=d["intermediate"],
                                         num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                                         word_embed_proj_dim=d["hidden"], max_position_embeddings=2048)),
    "gpt_neox": ("GPTNeoXConfig", lambda d: dict(vocab_size=d["vocab"], hidden_size=d["hidden"],
                                                 intermediate_size=d["intermediate"], num_hidden_layers=d["layers"],
                                                 num_attention_heads=d["heads"], max_position_embeddings=2048,
                                                 rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25,
                                                                  "rope_theta": float(d["rope_theta"])})),
}
TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)


def _is_norm(module) -> bool:
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) or name == "LayerNorm"


def _randomize(model, seed: int) -> None:
    """Replace the default init (std 0.02, near-uniform logits) by a larger scale, so that the outputs depend
    visibly on every layer: norm weights get 0.1 N(0, 1) added to their init (γ = 1 + ..., Gemma's offset
    form 0 + ...), norm biases 0.1 N(0, 1), everything else N(0, 1) / sqrt(last dim)."""
    torch = require_module("torch", "export")
    norm_params = {f"{name}.{p}" if name else p for name, m in model.named_modules() if _is_norm(m)
                   for p, _ in m.named_parameters(recurse=False)}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in norm_params:
                p.copy_(p + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))


def build_tiny(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 300,
    tie_word_embeddings: bool | None = None,
    rope_theta: float = 100000.0,
) -> Path:
    """Save a random `arch` causal LM (one of `TINY_ARCHS`) + tokenizer as a Hugging Face folder; returns it.

    `kv_heads` applies to the archs with grouped-query attention (llama, mistral, qwen2, qwen3, gemma,
    gemma2); the others have one K/V head per head. `tie_word_embeddings` None keeps the config's default.
    Same arguments give byte-identical weights and the same tokenizer.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {', '.join(TINY_ARCHS)}")
    torch = require_module("torch", "export")
    transformers = require_module("transformers", "export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tokenizer(vocab, seed)
    eos = backend.token_to_id(_SPECIALS[0])
    pad = backend.token_to_id(_SPECIALS[1])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=_SPECIALS[0], bos_token=_SPECIALS[0], pad_token=_SPECIALS[1]
    )
    config_class, kwargs_of = _ARCHS[arch]
    dims = dict(hidden=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                vocab=backend.get_vocab_size(), rope_theta=rope_theta)
    kwargs = kwargs_of(dims)
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    config = getattr(transformers, config_class)(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        _randomize(model, seed)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    logger.info("tiny %s (%d layers, hidden %d, vocab %d) saved to %s", arch, layers, hidden_size,
                config.vocab_size, out)
    return out


def build_tiny_llama(out_dir: str | Path, **kwargs) -> Path:
    """Save a random `LlamaForCausalLM` (SmolLM2's structure: GQA, tied embeddings) + tokenizer; returns the
    folder. `kwargs` as `build_tiny`'s; same arguments give byte-identical weights and the same tokenizer."""
    return build_tiny("llama", out_dir, **{"tie_word_embeddings": True, **kwargs})
