"""Perplexity: against an independent numpy computation on a tiny graph, on the tiny LLaMA, and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptqonnx.errors import UserError
from ptqonnx.runtime.perplexity import perplexity, window_nll

VOCAB = 11


def _bigram_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """logits[b, t, :] = table[input_ids[b, t], :] (a bigram model), in ONNX text."""
    table = (np.random.default_rng(0).standard_normal((VOCAB, VOCAB)) * 3).astype(np.float32)
    model = onnx.parser.parse_model(
        f"""<ir_version: 10, opset_import: ["" : 21]>
        g (int64[batch, sequence] input_ids) => (float[batch, sequence, {VOCAB}] logits) {{
            logits = Gather<axis = 0>(table, input_ids)
        }}"""
    )
    model.graph.initializer.append(numpy_helper.from_array(table, "table"))
    onnx.checker.check_model(model)
    path = tmp_path / "bigram.onnx"
    onnx.save(model, str(path))
    return path, table


def _reference_ppl(table: np.ndarray, windows: np.ndarray) -> float:
    """Independent: softmax probabilities in float64, then the mean of -log p(next token)."""
    t = table.astype(np.float64)
    probs = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)
    nll = [-math.log(probs[w[i], w[i + 1]]) for w in windows for i in range(len(w) - 1)]
    return math.exp(sum(nll) / len(nll))


def test_perplexity_matches_numpy_reference(tmp_path: Path) -> None:
    path, table = _bigram_model(tmp_path)
    windows = np.random.default_rng(1).integers(0, VOCAB, size=(5, 17)).astype(np.int64)
    seen = []
    res = perplexity(path, windows, progress=lambda done, total: seen.append((done, total)))
    assert res.windows == 5 and res.tokens_evaluated == 5 * 16
    assert res.ppl == pytest.approx(_reference_ppl(table, windows), rel=1e-9)
    assert res.nll_mean == pytest.approx(math.log(res.ppl), rel=1e-12)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_window_nll_ignores_last_logit_and_first_token() -> None:
    logits = np.zeros((4, VOCAB), np.float32)
    logits[3] = 1e9  # the last position predicts nothing inside the window
    tokens = np.array([5, 1, 2, 3])
    assert window_nll(logits, tokens) == pytest.approx(3 * math.log(VOCAB), rel=1e-12)


def test_perplexity_of_tiny_llama_matches_torch(tiny_export: Path, tiny_hf: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ptqonnx.models.tiny import tiny_corpus
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    text = " ".join(tiny_corpus(60, seed=3))
    windows = eval_windows(tokenize(text, load_tokenizer(tiny_export)), 32, 6)
    res = perplexity(tiny_export / "model.onnx", windows, threads=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows), use_cache=False).logits.numpy()
    nll = sum(window_nll(lg, w) for lg, w in zip(logits, windows))
    assert res.ppl == pytest.approx(math.exp(nll / res.tokens_evaluated), rel=1e-5)


def test_text_shorter_than_one_window_is_user_error(tiny_export: Path) -> None:
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    tokens = tokenize("A short text.", load_tokenizer(tiny_export))
    with pytest.raises(UserError, match="shorter than one window"):
        eval_windows(tokens, 512)


def test_kv_model_is_refused(tiny_export: Path) -> None:
    with pytest.raises(UserError, match="model_kv.onnx"):
        perplexity(tiny_export / "model_kv.onnx", np.zeros((1, 8), np.int64))


@pytest.mark.parametrize(
    "windows, match",
    [
        (np.zeros((0, 8), np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros((2, 1), np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros(8, np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros((1, 8), np.float32), "must be integers"),
        (np.full((1, 8), VOCAB, np.int64), "outside the model's vocabulary"),
    ],
)
def test_bad_windows_are_user_errors(tmp_path: Path, windows: np.ndarray, match: str) -> None:
    path, _ = _bigram_model(tmp_path)
    with pytest.raises(UserError, match=match):
        perplexity(path, windows)


def test_missing_model_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model not found"):
        perplexity(tmp_path / "missing.onnx", np.zeros((1, 8), np.int64))
