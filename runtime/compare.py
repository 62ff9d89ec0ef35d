"""Compare models the way users run them: outputs against a reference (cosine), and several models side by side.

Cosine similarity, per output and sample, of the flattened outputs in float64:

    cos(a, b) = <a, b> / (|a| |b|)          (1 when both are all zeros, 0 when only one is)

reported as the mean and the minimum over samples. It is the quality measure for a model without logits (an
encoder: `last_hidden_state`, a pooled output), where perplexity does not apply; a causal LM can be compared
this way too (its logits, and a KV model's presents). Both models get the same feeds: token windows built
into feeds by `ModelFeeds` (input_ids, attention_mask of ones, token_type_ids of zeros, position_ids, an
empty KV cache), or arrays by input name from an .npz (first axis = samples, as `--calib-npz`).

`compare_models` builds one table for models A, B, ...: file size (model + external data), perplexity
(or, for models without logits, cosine to the first), prefill latency and, when every model has a KV cache,
per-token decode latency. Latencies are measured interleaved in one run (`interleaved`: rotating order,
ratios as the median of per-round ratios to the first model, so load swings cancel).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqonnx.errors import UserError
from ptqonnx.runtime.bench import ModelFeeds, decode_runner, interleaved, prefill_runner
from ptqonnx.runtime.ort import make_session

__all__ = [
    "CompareResult", "CompareRow", "OutputSimilarity", "SimilarityResult", "compare_models", "cosine",
    "eval_inputs", "npz_feeds", "output_similarity",
]

logger = logging.getLogger(__name__)

Feeds = Sequence[Mapping[str, np.ndarray]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays flattened, in float64."""
    x = np.asarray(a, np.float64).reshape(-1)
    y = np.asarray(b, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise UserError(f"outputs have different sizes ({x.size} vs {y.size}); compare models with the same outputs")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float(np.dot(x, y) / (nx * ny))


@dataclass(frozen=True)
class OutputSimilarity:
    name: str
    mean: float
    min: float


@dataclass(frozen=True)
class SimilarityResult:
    samples: int
    outputs: tuple[OutputSimilarity, ...]

    def lines(self) -> list[str]:
        return [f"{o.name}: cosine similarity mean {o.mean:.6f}, min {o.min:.6f} over {self.samples} samples"
                for o in self.outputs]


def npz_feeds(path: Path, max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz of arrays by input name (first axis = samples), one feed per sample."""
    from ptqonnx.calibration.sources import CalibConfig, calibration_batches

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            n = min((data[k].shape[0] if data[k].ndim else 0) for k in data.files) if data.files else 0
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read inputs npz {path} ({exc}); pass a file written by numpy.savez") from None
    n = max(1, n if max_samples is None else min(n, max_samples))
    return calibration_batches(CalibConfig(npz=path, samples=n))  # checks the arrays, one feed per sample


def eval_inputs(
    model: str | Path, *, text: Path | None = None, npz: Path | None = None, tokenizer: Path | None = None,
    seq_len: int = 512, max_windows: int | None = None,
) -> np.ndarray | list[dict[str, np.ndarray]]:
    """What `eval` feeds: token windows [n, seq_len] of `text` (tokenizer beside `model` unless given), or
    the samples of an .npz."""
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    if not Path(model).is_file():
        raise UserError(f"model file not found: {model}; pass the path of an .onnx file")
    if npz is not None:
        return npz_feeds(npz, max_windows)
    if text is None:
        raise UserError("pass --text FILE (evaluation text) or --inputs-npz FILE (model inputs by name)")
    tok = load_tokenizer(tokenizer or Path(model).parent)
    return eval_windows(tokenize(read_text(text), tok), seq_len, max_windows)


def _feeds(session, inputs: np.ndarray | Feeds) -> Feeds:
    """Token windows [n, seq] -> one ModelFeeds feed per window (batch 1); feed dicts pass through."""
    if isinstance(inputs, np.ndarray):
        feeds = ModelFeeds(session)
        return [feeds.build(inputs[i : i + 1]) for i in range(inputs.shape[0])]
    names = {i.name for i in session.get_inputs()}
    for feed in inputs[:1]:
        if set(feed) != names:
            raise UserError(f"the inputs are {sorted(feed)} but the model takes {sorted(names)}; "
                            "save one array per model input, keyed by input name")
    return inputs


def _run(session, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, dict(feed))
    except Exception as exc:  # ORT's own exception types: wrong shapes or dtypes in the inputs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime could not run the model on these inputs: {first}") from None


def output_similarity(
    model: str | Path, reference: str | Path, inputs: np.ndarray | Feeds, *, threads: int | None = None,
    provider: str = "cpu",
) -> SimilarityResult:
    """Cosine similarity of `model`'s outputs to `reference`'s on the same inputs (token windows or feeds),
    for every output name the two share; mean and min over samples."""
    sess, ref = (make_session(p, threads=threads, provider=provider) for p in (model, reference))
    names = [o.name for o in sess.get_outputs()]
    shared = [n for n in names if n in {o.name for o in ref.get_outputs()}]
    if not shared:
        raise UserError(f"{Path(model).name} and {Path(reference).name} share no output names "
                        f"({names} vs {[o.name for o in ref.get_outputs()]}); pass the float model it came from")
    feeds = _feeds(sess, inputs)
    if not feeds:
        raise UserError("no samples to compare; pass a longer text or a non-empty npz")
    ref_inputs = {i.name for i in ref.get_inputs()}
    cos: dict[str, list[float]] = {n: [] for n in shared}
    for feed in feeds:
        if set(feed) != ref_inputs:
            raise UserError(f"the reference takes {sorted(ref_inputs)}, the model {sorted(feed)}; "
                            "compare models with the same inputs")
        got, want = _run(sess, shared, feed), _run(ref, shared, feed)
        for n, a, b in zip(shared, got, want):
            cos[n].append(cosine(a, b))
    return SimilarityResult(len(feeds), tuple(OutputSimilarity(n, float(np.mean(v)), float(np.min(v)))
                                              for n, v in cos.items()))


@dataclass(frozen=True)
class CompareRow:
    label: str
    path: str
    bytes: int
    size_ratio: float
    perplexity: float | None
    cosine_mean: float | None  # to the first model's outputs (models without logits)
    cosine_min: float | None
    prefill_ms: float
    prefill_ratio: float
    decode_ms: float | None  # per token
    decode_ratio: float | None


@dataclass(frozen=True)
class CompareResult:
    rows: tuple[CompareRow, ...]
    seq_len: int
    rounds: int
    threads: int
    tokens_evaluated: int | None
    decode_note: str | None  # why decode was not measured

    def lines(self) -> list[str]:
        width = max(len(r.label) for r in self.rows) + 2
        rows = self.rows
        has_ppl = rows[0].perplexity is not None
        has_cos = rows[0].cosine_mean is not None
        has_dec = rows[0].decode_ms is not None
        head = f"{'model':<{width}}{'size':>12}{'vs first':>10}"
        head += f"{'perplexity':>12}" if has_ppl else f"{'cosine mean / min':>22}" if has_cos else ""
        head += f"{f'prefill 1x{self.seq_len}':>16}{'vs first':>10}"
        head += f"{'decode /token':>15}{'vs first':>10}" if has_dec else ""
        out = [head]
        for r in rows:
            line = f"{r.label:<{width}}{r.bytes / 2**20:>8.1f} MiB{r.size_ratio:>10.3f}"
            if has_ppl:
                line += f"{r.perplexity:>12.4f}"
            elif has_cos:
                line += f"{f'{r.cosine_mean:.6f} / {r.cosine_min:.6f}':>22}"
            line += f"{r.prefill_ms:>13.1f} ms{r.prefill_ratio:>9.2f}x"
            if has_dec:
                line += f"{r.decode_ms:>12.2f} ms{r.decode_ratio:>9.2f}x"
            out.append(line)
        notes = [f"latency: median of {self.rounds} interleaved rounds (rotating order), ratios are medians of "
                 f"per-round ratios to {rows[0].label}; {self.threads} threads"]
        if self.tokens_evaluated:
            notes.append(f"perplexity over {self.tokens_evaluated} tokens")
        if self.decode_note:
            notes.append(self.decode_note)
        return out + [f"({'; '.join(notes)})"]


def _labels(paths: Sequence[Path]) -> list[str]:
    """File names; the paths as given where names repeat; `#2`, `#3` for a path given more than once."""
    names = [p.name if len({q for q in paths if q.name == p.name}) == 1 else str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n} #{names[:i + 1].count(n)}" for i, n in enumerate(names)]


def compare_models(
    paths: Sequence[str | Path],
    *,
    windows: np.ndarray | Feeds | None = None,
    seq_len: int = 512,
    rounds: int = 10,
    threads: int | None = None,
    past_len: int = 512,
    new_tokens: int = 32,
    provider: str = "cpu",
) -> CompareResult:
    """One table for `paths` (the first is the baseline): size, quality on `windows` if given (perplexity on
    token windows when every model has logits, else cosine to the first model's outputs, e.g. encoders or
    .npz inputs), and latency measured interleaved."""
    from ptqonnx.inspect import inspect_model
    from ptqonnx.runtime.perplexity import perplexity

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise UserError("--compare needs at least two models; the first is the baseline")
    labels = _labels(paths)
    infos = [inspect_model(p) for p in paths]  # sizes and interfaces, without a session
    sizes = [info.total_bytes for info in infos]
    ppl: list[float | None] = [None] * len(paths)
    cos: list[OutputSimilarity | None] = [None] * len(paths)
    tokens = None
    if windows is not None:
        if isinstance(windows, np.ndarray) and all(any(o.name == "logits" for o in i.outputs) for i in infos):
            results = [perplexity(p, windows, threads=threads, provider=provider) for p in paths]
            ppl, tokens = [r.ppl for r in results], results[0].tokens_evaluated
        else:
            cos = [output_similarity(p, paths[0], windows, threads=threads, provider=provider).outputs[0]
                   for p in paths]
    runners, n_threads = {}, 1
    for label, p in zip(labels, paths):
        runners[label], n_threads = prefill_runner(p, seq_len=seq_len, threads=threads, provider=provider)
    pre = interleaved(runners, rounds=rounds)
    del runners
    dec, note = None, None
    no_cache = [label for label, info in zip(labels, infos)
                if info.kv_cache is None or not info.kv_cache.past[0].startswith("past_key_values.")]
    if no_cache:
        note = (f"decode not measured: no KV cache in {', '.join(no_cache)} (compare the KV-cache exports, "
                "model_kv.onnx, for decode)")
    else:
        dec = interleaved({label: decode_runner(p, past_len=past_len, new_tokens=new_tokens, threads=threads,
                                                provider=provider)[0]
                           for label, p in zip(labels, paths)}, rounds=rounds)
    rows = tuple(
        CompareRow(
            label=label, path=str(p), bytes=sizes[i], size_ratio=sizes[i] / sizes[0], perplexity=ppl[i],
            cosine_mean=cos[i].mean if cos[i] else None, cosine_min=cos[i].min if cos[i] else None,
            prefill_ms=pre.medians[label], prefill_ratio=pre.ratios[label],
            decode_ms=dec.medians[label] if dec else None, decode_ratio=dec.ratios[label] if dec else None,
        )
        for i, (label, p) in enumerate(zip(labels, paths))
    )
    return CompareResult(rows, seq_len, rounds, n_threads, tokens, note)
