"""Latency benchmarks: prefill (one forward over `seq_len` tokens) and KV-cache decode (ms per token).

Load on a shared machine swings single numbers by ±20 %, so compare models with `interleaved`: it runs
the contenders in rotating order, round after round, and reports each one's median and the median of its
per-round ratio to a baseline (paired, so slow rounds cancel out).

Feeds are built from the session's input metadata by `ModelFeeds` (also what `perplexity` and the cosine
comparison feed): `input_ids` (seeded random tokens below the vocab size, read from the `logits` output shape
or from a one-token run), `attention_mask` (ones), `position_ids` (positions after the past),
`token_type_ids` (zeros), and optimum-style `past_key_values.{i}.key/.value` [batch, heads, past, head_dim]
fed back from `present.{i}.key/.value`.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from ptqonnx.errors import UserError
from ptqonnx.kvcache import cache_head_dims, empty_past
from ptqonnx.progress import progress_task
from ptqonnx.runtime.ort import make_session, session_threads

__all__ = [
    "BenchResult",
    "InterleavedResult",
    "ModelFeeds",
    "PAST_PREFIX",
    "PRESENT_PREFIX",
    "TOKEN_INPUTS",
    "feeds_problem",
    "bench_decode",
    "bench_prefill",
    "decode_runner",
    "interleaved",
    "prefill_runner",
    "summarize",
]

logger = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def feeds_problem(inputs: Sequence[str], outputs: Collection[str] | None = None) -> str | None:
    """Why `ModelFeeds` cannot build feeds for a graph with these input names (and, given its `outputs`, feed
    its cache back: a `present.*` output for each `past_key_values.*` input), in one line; None when it can."""
    if "input_ids" not in inputs:
        return (f"the model has no input_ids input (inputs: {list(inputs)}); feeds can only be built for token "
                "models (pass model inputs as an .npz where the command takes one)")
    other = [n for n in inputs if n not in TOKEN_INPUTS and not n.startswith(PAST_PREFIX)]
    if other:
        return (f"cannot build feeds for inputs {other}; supported: {', '.join(TOKEN_INPUTS)} and "
                f"{PAST_PREFIX}{{i}}.key/.value")
    for name in inputs if outputs is not None else ():
        present = PRESENT_PREFIX + name[len(PAST_PREFIX):]
        if name.startswith(PAST_PREFIX) and present not in outputs:
            return f"the model has input {name} but no output {present}; expected optimum naming"
    return None
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Latency in milliseconds: median and 10th/90th percentiles over `runs` (each run's ms)."""

    median_ms: float
    p10: float
    p90: float
    threads: int
    runs: tuple[float, ...]

    def describe(self, unit: str = "ms") -> str:
        """`median X ms (p10 Y, p90 Z) over N runs, T threads`."""
        digits = 2 if self.median_ms < 100 else 1
        f = lambda v: f"{v:.{digits}f}"  # noqa: E731
        return (f"median {f(self.median_ms)} {unit} (p10 {f(self.p10)}, p90 {f(self.p90)}) over {len(self.runs)} runs, "
                f"{self.threads} threads")


@dataclasses.dataclass(frozen=True)
class InterleavedResult:
    """Per label: median ms, median of per-round ratios to `baseline`, and the raw ms per round."""

    baseline: str
    medians: dict[str, float]
    ratios: dict[str, float]
    samples: dict[str, tuple[float, ...]]


def summarize(runs_ms: list[float], threads: int) -> BenchResult:
    a = np.asarray(runs_ms, np.float64)
    if a.size == 0:
        raise ValueError("no timings")
    return BenchResult(
        median_ms=float(np.median(a)),
        p10=float(np.percentile(a, 10)),
        p90=float(np.percentile(a, 90)),
        threads=threads,
        runs=tuple(float(x) for x in a),
    )


class ModelFeeds:
    """Feeds for a transformer session, built from its input metadata.

    `input_ids` (seeded random tokens below the vocabulary read from the `logits` output, or token 0 for a
    model without logits, e.g. an encoder: its vocabulary is not in its interface), `attention_mask` (ones
    over past + new), `position_ids` (positions after the past), `token_type_ids` (zeros), and
    optimum-style `past_key_values.{i}.key/.value` [batch, kv_heads, past, head_dim]: empty (past 0, dtype
    and head shape from the input's metadata) for a prefill, or fed back from `present.{i}.key/.value`.
    """

    def __init__(self, sess, batch: int = 1, seed: int = 0) -> None:
        self.sess = sess
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        self.inputs = {i.name: i for i in sess.get_inputs()}
        problem = feeds_problem(list(self.inputs))
        if problem:
            raise UserError(problem)
        self.past = sorted(n for n in self.inputs if n.startswith(PAST_PREFIX))
        self.outputs = [o.name for o in sess.get_outputs()]
        self.heads = self._cache_heads(getattr(sess, "_model_path", None))  # ORT keeps a path session's file
        self.vocab = self._vocab()

    def _cache_heads(self, model_path) -> dict[str, tuple[int, int]]:
        """(kv_heads, head_dim) from the graph for cache inputs whose metadata leaves them symbolic
        (onnxruntime-genai's `kv_cache_dim`); read only where needed."""
        symbolic = [n for n in self.past if not all(isinstance(d, int) for d in self.inputs[n].shape[-3::2])]
        return cache_head_dims(model_path) if symbolic and model_path else {}

    def _vocab(self) -> int | None:
        logits = next((o for o in self.sess.get_outputs() if o.name == "logits"), None)
        if logits is None:
            return None
        last = logits.shape[-1] if logits.shape else None
        if isinstance(last, int) and last > 0:
            return last
        probe = self.build(np.zeros((self.batch, 1), np.int64), self.empty_past())
        return int(self.sess.run([logits.name], probe)[0].shape[-1])

    def tokens(self, n: int) -> np.ndarray:
        if self.vocab is None:
            return np.zeros((self.batch, n), np.int64)
        return self.rng.integers(0, self.vocab, size=(self.batch, n), dtype=np.int64)

    def empty_past(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self.past:
            meta = self.inputs[name]
            dtype = _ORT_DTYPES.get(meta.type)
            if dtype is None or not np.issubdtype(dtype, np.floating):
                raise UserError(f"{name} has type {meta.type}; only float32/float16 caches are supported")
            out[name] = empty_past(name, meta.shape, dtype, self.batch, self.heads.get(name))
        return out

    def build(self, ids: np.ndarray, past: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The feed for tokens `ids` [batch, n] after `past` (default: an empty cache)."""
        past = self.empty_past() if past is None else past
        b, n = ids.shape
        past_len = next(iter(past.values())).shape[2] if past else 0
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((b, past_len + n), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + n, dtype=np.int64), (b, n)).copy()
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros((b, n), np.int64)
        feed.update(past)
        return feed

    def presents_as_past(self, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        by_name = dict(zip(self.outputs, outs))
        problem = feeds_problem(list(self.inputs), by_name)
        if problem:
            raise UserError(problem)
        return {name: by_name[PRESENT_PREFIX + name[len(PAST_PREFIX):]] for name in self.past}


def prefill_runner(
    model_path: str | Path,
    *,
    seq_len: int = 512,
    batch: int = 1,
    threads: int | None = None,
    opt_level: str = "all",
    seed: int = 0,
    config: dict[str, str] | None = None,
    provider: str = "cpu",
) -> tuple[Callable[[], float], int]:
    """A zero-argument callable running one prefill and returning its ms, and the session's thread count
    (`config`: more ORT session options; `provider`: cpu, cuda or tensorrt)."""
    sess = make_session(model_path, opt_level=opt_level, threads=threads, config=config, provider=provider)
    feeds = ModelFeeds(sess, batch, seed)
    feed = feeds.build(feeds.tokens(seq_len), feeds.empty_past())
    fetch = [feeds.outputs[0]] if not feeds.past else None  # a KV model must still produce its presents

    def run() -> float:
        t0 = time.perf_counter()
        sess.run(fetch, feed)
        return (time.perf_counter() - t0) * 1e3

    return run, session_threads(sess)


def decode_runner(
    model_kv_path: str | Path,
    *,
    past_len: int = 512,
    new_tokens: int = 32,
    batch: int = 1,
    threads: int | None = None,
    opt_level: str = "all",
    seed: int = 0,
    provider: str = "cpu",
) -> tuple[Callable[[], float], int]:
    """A callable decoding `new_tokens` after a `past_len`-token prefill (done once, up front), returning the
    median ms per decoded token; and the session's thread count."""
    sess = make_session(model_kv_path, opt_level=opt_level, threads=threads, provider=provider)
    feeds = ModelFeeds(sess, batch, seed)
    if not feeds.past:
        raise UserError(
            f"{Path(model_kv_path).name} has no past_key_values.* inputs; decode needs a KV-cache export"
        )
    if past_len < 1 or new_tokens < 1:
        raise UserError("past_len and new_tokens must be at least 1")
    prefill = feeds.presents_as_past(sess.run(None, feeds.build(feeds.tokens(past_len), feeds.empty_past())))
    steps = [feeds.tokens(1) for _ in range(new_tokens)]

    def run() -> float:
        past = prefill
        per_token = []
        for ids in steps:
            feed = feeds.build(ids, past)
            t0 = time.perf_counter()
            outs = sess.run(None, feed)
            per_token.append((time.perf_counter() - t0) * 1e3)
            past = feeds.presents_as_past(outs)
        return float(np.median(per_token))

    return run, session_threads(sess)


def bench_prefill(
    model_path: str | Path,
    *,
    seq_len: int = 512,
    batch: int = 1,
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    opt_level: str = "all",
    seed: int = 0,
    provider: str = "cpu",
) -> BenchResult:
    """Prefill latency of a model taking `input_ids` [batch, seq_len] (ms per forward)."""
    run, n_threads = prefill_runner(
        model_path, seq_len=seq_len, batch=batch, threads=threads, opt_level=opt_level, seed=seed, provider=provider
    )
    return _repeat(run, warmup, repeats, n_threads, "prefill runs")


def bench_decode(
    model_kv_path: str | Path,
    *,
    past_len: int = 512,
    new_tokens: int = 32,
    batch: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    opt_level: str = "all",
    seed: int = 0,
    provider: str = "cpu",
) -> BenchResult:
    """Decode latency of a KV-cache model (ms per token); each run is the median over `new_tokens` steps."""
    run, n_threads = decode_runner(
        model_kv_path,
        past_len=past_len,
        new_tokens=new_tokens,
        batch=batch,
        threads=threads,
        opt_level=opt_level,
        seed=seed,
        provider=provider,
    )
    return _repeat(run, warmup, repeats, n_threads, "decode runs")


def _repeat(run: Callable[[], float], warmup: int, repeats: int, threads: int, task: str) -> BenchResult:
    if repeats < 1 or warmup < 0:
        raise UserError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        run()
    samples = []
    with progress_task(task, repeats) as advance:  # steps are logged between runs, never inside one
        for _ in range(repeats):
            samples.append(run())
            advance()
    return summarize(samples, threads)


def interleaved(
    benchmarks: Mapping[str, Callable[[], float | None]],
    rounds: int = 10,
    *,
    baseline: str | None = None,
    warmup: int = 1,
) -> InterleavedResult:
    """Time several benchmarks side by side: each round runs every callable once, in an order rotated by
    one each round. A callable returning a number reports its own ms (e.g. per-token decode); otherwise its
    wall time is measured. Ratios are medians of per-round ratios to `baseline` (default: the first label).
    """
    labels = list(benchmarks)
    if not labels:
        raise ValueError("no benchmarks given")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    baseline = labels[0] if baseline is None else baseline
    if baseline not in benchmarks:
        raise ValueError(f"baseline {baseline!r} is not one of {labels}")
    for _ in range(warmup):
        for label in labels:
            benchmarks[label]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    with progress_task("latency rounds", rounds) as advance:
        for r in range(rounds):
            k = r % len(labels)
            for label in labels[k:] + labels[:k]:
                t0 = time.perf_counter()
                got = benchmarks[label]()
                ms = float(got) if isinstance(got, (int, float)) else (time.perf_counter() - t0) * 1e3
                samples[label].append(ms)
            advance()
    base = samples[baseline]
    return InterleavedResult(
        baseline=baseline,
        medians={label: statistics.median(v) for label, v in samples.items()},
        ratios={label: statistics.median(a / b for a, b in zip(v, base)) for label, v in samples.items()},
        samples={label: tuple(v) for label, v in samples.items()},
    )
