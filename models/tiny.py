"""A tiny random LLaMA with an in-process tokenizer, for tests (no downloads, deterministic).

The model mirrors SmolLM2's structure (LLaMA, grouped-query attention, tied embeddings) at toy
size. The tokenizer is a byte-level BPE trained on seeded generated sentences: every byte has a
token, so any text encodes without `<unk>`, and the vocabulary (256 bytes + merges + specials)
is about 300 entries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ptqonnx.errors import require_module

__all__ = ["build_tiny_llama", "tiny_corpus"]

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


def build_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 300,
    tie_word_embeddings: bool = True,
    rope_theta: float = 100000.0,
) -> Path:
    """Save a random `LlamaForCausalLM` + tokenizer as a Hugging Face folder; returns the folder.

    Same arguments give byte-identical weights and the same tokenizer.
    """
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

    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
    )
    torch.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
        # The default init (std 0.02) makes near-uniform logits; a larger scale gives a model
        # whose outputs depend visibly on every layer, which tests need.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    logger.info("tiny llama (%d layers, hidden %d, vocab %d) saved to %s", layers, hidden_size, config.vocab_size, out)
    return out
