"""Perplexity of an ONNX causal LM over token windows (the GPTQ paper's protocol).

Each window of `seq` tokens is run alone (batch 1, positions 0..seq-1). Token t+1 is predicted from
the logits at position t, so a window contributes seq-1 predictions:

    nll(w) = sum_{t=0}^{seq-2} [ logsumexp(logits[t, :]) - logits[t, w[t+1]] ]      (float64)
    ppl    = exp( sum_w nll(w) / (n * (seq-1)) )

The log-softmax runs in float64 so the reduction over a 49k vocabulary adds no rounding of its own;
the logits themselves are whatever precision the model produced. Any graph with an `input_ids`
input and a `logits` output works (float, QDQ, MatMulNBits), with or without a KV cache: a KV-cache
model (`attention_mask`, `position_ids`, `past_key_values.*`) runs each window as a prefill after an
empty cache, past length 0 with the dtype and [batch, kv_heads, 0, head_dim] read from its inputs
(`ptqonnx.runtime.bench.ModelFeeds`), which is the same computation as the no-cache graph.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqonnx.errors import UserError
from ptqonnx.progress import progress_task
from ptqonnx.runtime.bench import ModelFeeds
from ptqonnx.runtime.ort import make_session

__all__ = ["PerplexityResult", "perplexity", "window_nll"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float  # mean negative log-likelihood per predicted token (nats)
    tokens_evaluated: int  # n * (seq - 1)
    windows: int
    seconds: float


def window_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Summed NLL (float64) of tokens[1:] under logits[:-1]; logits [seq, vocab], tokens [seq]."""
    x = np.asarray(logits[:-1], dtype=np.float64)  # [seq-1, vocab]
    target = np.asarray(tokens[1:], dtype=np.int64)  # [seq-1]
    peak = x.max(axis=-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    picked = x[np.arange(len(target)), target]
    return float(np.sum(lse - picked))


def perplexity(
    model_path: str | Path,
    windows: np.ndarray,
    *,
    opt_level: str = "all",
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    config: dict[str, str] | None = None,
    provider: str = "cpu",
) -> PerplexityResult:
    """exp(mean NLL) of `windows` (int64 [n, seq], e.g. from `ptqonnx.text.eval_windows`).

    `progress(done, total)` is called after each window (each also a step of a `ptqonnx.progress` task);
    `config`: ORT session options (e.g. `runtime.ort.PRECISE_INT8`); `provider`: cpu, cuda or tensorrt
    (`runtime.ort.PROVIDERS`).
    """
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2:
        raise UserError(
            f"perplexity needs token windows shaped [n >= 1, seq >= 2], got {list(w.shape)}; "
            "build them with ptqonnx.text.eval_windows"
        )
    if not np.issubdtype(w.dtype, np.integer):
        raise UserError(f"token windows must be integers, got {w.dtype}; pass token ids, not text or logits")
    w = w.astype(np.int64, copy=False)
    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"model not found: {path}; pass the model.onnx that `ptqonnx export` wrote")

    session = make_session(path, opt_level=opt_level, threads=threads, config=config, provider=provider)
    outputs = [o.name for o in session.get_outputs()]
    if "logits" not in outputs:
        raise UserError(
            f"{path.name} returns {outputs}, no logits; perplexity needs a causal LM (for an encoder, compare its "
            "outputs to the float model's: ptqonnx eval MODEL --reference FP32.onnx --text FILE)"
        )
    feeds = ModelFeeds(session)
    if int(w.max()) >= feeds.vocab:
        raise UserError(
            f"token id {int(w.max())} is outside the model's vocabulary of {feeds.vocab}; "
            "tokenize with the tokenizer saved beside this model"
        )

    n, seq = w.shape
    t0 = time.perf_counter()
    total = 0.0
    with progress_task(f"perplexity {path.name}", n) as advance:
        for i in range(n):
            (logits,) = session.run(["logits"], feeds.build(w[i : i + 1]))  # [1, seq, vocab]
            nll = window_nll(logits[0], w[i])
            if not math.isfinite(nll):
                raise UserError(f"window {i} gives a non-finite NLL; the model produced inf/NaN logits")
            total += nll
            logger.debug("window %d/%d: nll/token %.4f", i + 1, n, nll / (seq - 1))
            advance(info=f"ppl {math.exp(total / ((i + 1) * (seq - 1))):.4g}")
            if progress is not None:
                progress(i + 1, n)
    count = n * (seq - 1)
    nll_mean = total / count
    seconds = time.perf_counter() - t0
    result = PerplexityResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens_evaluated=count, windows=n, seconds=seconds
    )
    logger.debug(
        "perplexity %.4f over %d windows x %d tokens (%s, %.1f s)", result.ppl, n, seq, path.name, seconds
    )
    return result
