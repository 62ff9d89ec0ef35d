"""Text -> token windows, shared by calibration and perplexity evaluation.

Perplexity follows the GPTQ paper's protocol: the text is read whole, tokenized once, and cut into non-overlapping windows of `seq_len` tokens from the start. Calibration
draws `n` windows at seeded random offsets of the same token stream (GPTQ's `get_wikitext2`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ptqonnx.errors import UserError

__all__ = [
    "TOKENIZER_FILE",
    "load_tokenizer",
    "read_text",
    "tokenize",
    "eval_windows",
    "calibration_windows",
]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(directory: str | Path):
    """Load the `tokenizer.json` saved beside an exported model (fast `tokenizers` backend)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"no {TOKENIZER_FILE} in {directory}; pass --tokenizer DIR pointing at the folder "
            "`ptqonnx export` wrote (it saves the tokenizer beside the model)"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("the `tokenizers` package is missing; pip install 'ptqonnx[export]'") from None
    return Tokenizer.from_file(str(path))


def read_text(path: str | Path) -> str:
    """Read a text file whole, line ends normalized to "\n" (Python's universal newlines).

    The shared WikiText-2 copy is stored with CRLF line ends; upstream WikiText uses LF, and the published
    SmolLM2 FP32 reference (28.7387 on 40 x 512 windows) is measured on LF text. Keeping the "\r" changes
    the token stream (28.6170 on the same windows).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {p}; pass an existing file")
    try:
        with open(p, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a UTF-8 text file") from None


def tokenize(text: str, tokenizer) -> np.ndarray:
    """Tokenize the whole text once; returns int64 token ids [T]."""
    ids = tokenizer.encode(text).ids
    return np.asarray(ids, dtype=np.int64)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows from the start: int64 [n, seq_len]."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(
            f"the text has {len(tokens)} tokens, shorter than one window of {seq_len}; "
            "pass a longer text or a smaller --seq-len"
        )
    return tokens[: n * seq_len].reshape(n, seq_len).copy()


def calibration_windows(tokens: np.ndarray, seq_len: int, n: int, seed: int = 0) -> np.ndarray:
    """`n` windows of `seq_len` tokens at seeded random offsets: int64 [n, seq_len]."""
    if n < 1:
        raise UserError(f"--calib-samples must be at least 1, got {n}")
    if len(tokens) <= seq_len:
        raise UserError(
            f"the calibration text has {len(tokens)} tokens, not more than one window of {seq_len}; "
            "pass a longer text or a smaller --calib-seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=n)
    return np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64)
