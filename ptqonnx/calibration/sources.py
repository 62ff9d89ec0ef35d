"""Calibration data sources -> a list of ORT feeds.

Priority: `--calib-npz` (arrays by input name, first axis = samples), `--calib-text`, the environment
variable `PTQONNX_CALIB_TEXT`, then WikiText-2 train through `datasets` (GPTQ's default: the split joined
with blank lines). Text is tokenized once and cut into `samples` windows of `seq_len` tokens at seeded
random offsets (`ptqonnx.text.calibration_windows`); each window is one feed `{"input_ids": int64 [1, L]}`.

A KV-cache graph (optimum's with-past export, `ptqonnx export`'s model_kv.onnx) is calibrated through its
prefill: every cache input gets an empty (past length 0) cache of its own dtype and head shape, read from
the graph (`ptqonnx.kvcache`), for text and for an npz that leaves the cache out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqonnx.config import CalibConfig
from ptqonnx.errors import UserError
from ptqonnx.kvcache import empty_past, head_dims, is_past
from ptqonnx.text import calibration_windows, load_tokenizer, read_text, tokenize

__all__ = ["CALIB_TEXT_ENV", "CalibConfig", "calibration_batches", "probe_feeds", "text_feeds"]

logger = logging.getLogger(__name__)

CALIB_TEXT_ENV = "PTQONNX_CALIB_TEXT"

# Inputs a text source can fill besides input_ids: name -> builder(input_ids [1, L]) -> array.
_DERIVED_INPUTS = {
    "attention_mask": lambda ids: np.ones_like(ids, dtype=np.int64),
    "position_ids": lambda ids: np.arange(ids.shape[1], dtype=np.int64)[None, :].repeat(ids.shape[0], 0),
    "token_type_ids": lambda ids: np.zeros_like(ids, dtype=np.int64),  # one segment (BERT-family encoders)
}


def calibration_batches(
    cfg: CalibConfig,
    model_dir: str | Path | None = None,
    inputs: Sequence[str | ir.Value] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Feeds for the calibration run, one per sample.

    `model_dir` is the exported model's folder (or the model file; its folder is used) and is where the
    tokenizer is looked for unless `cfg.tokenizer_dir` is set. `inputs` are the model's graph inputs (values,
    or names); when given, feeds are checked against them (text sources also fill `attention_mask` with ones
    and `position_ids` with 0..L-1 when the model takes them, and KV-cache inputs given as values with an
    empty cache; any other input is an error).
    """
    input_names = None if inputs is None else [v if isinstance(v, str) else v.name for v in inputs]
    cache = _empty_cache(inputs or ())
    if cfg.npz is not None:
        feeds = _npz_feeds(cfg, input_names, set(cache))
        return [{**{k: v for k, v in cache.items() if k not in f}, **f} for f in feeds]
    if input_names is not None:
        _check_text_inputs(input_names, set(cache))
    if cfg.text is not None:
        text, origin = read_text(cfg.text), str(cfg.text)
    elif os.environ.get(CALIB_TEXT_ENV):
        text, origin = read_text(os.environ[CALIB_TEXT_ENV]), f"${CALIB_TEXT_ENV}={os.environ[CALIB_TEXT_ENV]}"
    else:
        text, origin = _wikitext2_train(), "WikiText-2 train"
    tok_dir = cfg.tokenizer_dir
    if tok_dir is None:
        if model_dir is None:
            raise UserError("no tokenizer for the calibration text; pass --tokenizer DIR")
        md = Path(model_dir)
        tok_dir = md.parent if md.is_file() or md.suffix == ".onnx" else md
    tokenizer = load_tokenizer(tok_dir)
    feeds = [{**f, **cache} for f in text_feeds(tokenize(text, tokenizer), cfg, input_names)]
    logger.info(
        "calibration: %d windows of %d tokens from %s (seed %d)", len(feeds), cfg.seq_len, origin, cfg.seed
    )
    return feeds


def text_feeds(
    tokens: np.ndarray, cfg: CalibConfig, input_names: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Seeded windows of a token stream as feeds `{"input_ids": int64 [1, L], ...}`."""
    windows = calibration_windows(tokens, cfg.seq_len, cfg.samples, cfg.seed)  # [n, L]
    extra = [n for n in (input_names or ()) if n in _DERIVED_INPUTS]
    feeds = []
    for w in windows:
        ids = w[None, :]  # [1, L]
        feed = {"input_ids": ids}
        for n in extra:
            feed[n] = _DERIVED_INPUTS[n](ids)
        feeds.append(feed)
    return feeds


def _empty_cache(inputs: Sequence[str | ir.Value]) -> dict[str, np.ndarray]:
    """An empty cache for each KV-cache input given as a value (its dtype and head shape from the graph)."""
    cache = {}
    for v in inputs:
        if isinstance(v, str) or not is_past(v.name) or v.const_value is not None:
            continue
        if v.dtype is None or not np.issubdtype(v.dtype.numpy(), np.floating):
            raise UserError(f"KV-cache input {v.name} has type {v.dtype}, not a float type; pass --calib-npz FILE "
                            "with arrays for every input")
        dims = None if v.shape is None else [d if isinstance(d, int) else d.value for d in v.shape]
        cache[v.name] = empty_past(v.name, dims, v.dtype.numpy(), heads=head_dims(v))
    return cache


def _check_text_inputs(input_names: Sequence[str], cache: set[str] = frozenset()) -> None:
    names = [n for n in input_names if n not in cache]
    if "input_ids" not in names:
        raise UserError(
            f"text calibration feeds input_ids but the model's inputs are {names}; "
            "pass --calib-npz FILE with arrays named after the model inputs"
        )
    other = [n for n in names if n != "input_ids" and n not in _DERIVED_INPUTS]
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(
            f"text calibration can only feed input_ids, attention_mask, position_ids, token_type_ids and a KV cache "
            f"(past_key_values.{{i}}.key/.value or past_{{i}}), but the model also needs {shown}; "
            "pass --calib-npz FILE with arrays named after the model inputs"
        )


def _npz_feeds(cfg: CalibConfig, input_names: Sequence[str] | None,
               optional: set[str] = frozenset()) -> list[dict[str, np.ndarray]]:
    """One feed per sample of the npz; inputs in `optional` (KV-cache inputs, which get an empty cache) may be
    left out."""
    path = cfg.npz
    if not path.is_file():
        raise UserError(f"calibration npz not found: {path}; pass an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise UserError(f"cannot read calibration npz {path} ({exc}); pass a file written by numpy.savez") from None
    if not arrays:
        raise UserError(f"calibration npz {path} holds no arrays; save one array per model input")
    if input_names is not None:
        names = list(input_names)
        unknown = sorted(set(arrays) - set(names))
        missing = [n for n in names if n not in arrays and n not in optional]
        if unknown or missing:
            problems = ([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
            raise UserError(
                f"calibration npz {path.name} does not match the model inputs {names} "
                f"({', '.join(problems)}); save one array per model input, keyed by input name"
            )
    counts = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise UserError(
            f"calibration npz arrays need the same non-empty first (sample) axis, got {counts}; "
            "stack the samples along axis 0"
        )
    n_avail = next(iter(counts.values()))
    n = min(n_avail, cfg.samples)
    if n < cfg.samples:
        logger.warning("calibration npz has %d samples, fewer than the %d requested", n_avail, cfg.samples)
    logger.info("calibration: %d samples from %s (inputs %s)", n, path, sorted(arrays))
    return [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in arrays.items()} for i in range(n)]


def _wikitext2_train() -> str:
    """WikiText-2 raw train split joined as in GPTQ (`"\\n\\n".join(text)`), or one clear UserError."""
    hint = (
        "no calibration data: pass --calib-text FILE or --calib-npz FILE (or set "
        f"{CALIB_TEXT_ENV}); the WikiText-2 download failed: "
    )
    try:
        import datasets
    except ImportError:
        raise UserError(hint + "the `datasets` package is not installed") from None
    try:
        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as exc:  # offline, hub errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(hint + first) from None
    return "\n\n".join(data["text"])


# symbolic dims whose name contains a key get that size, others `seq_len` (a KV cache is empty, so a
# `past_sequence_length + sequence_length` mask is `seq_len` long too)
_PROBE_DIMS = {"batch": 1}


def probe_feeds(model, n: int = 2, seq_len: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` synthetic feeds for checking that a float rewrite did not change the model (no calibration data
    needed): token ids below the embedding table's rows for integer `input_ids`-like inputs, ones for
    `attention_mask`, 0..L-1 for `position_ids`, zeros for other integer inputs, N(0, 1) for float inputs; a
    symbolic dim named like batch gets 1, any other `seq_len`; a KV-cache input an empty cache."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    rows = {}  # input name -> rows of an embedding table it indexes
    for node in graph:
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None and node.inputs[1] is not None:
            rows.setdefault(node.inputs[1].name, int(node.inputs[0].const_value.shape[0]))
    cache = _empty_cache(list(graph.inputs))
    feeds = []
    for _ in range(n):
        feed = dict(cache)
        for v in graph.inputs:
            if v.const_value is not None or v.name in cache:
                continue  # an initializer listed as an input (IR < 4): it has a value; a KV cache: empty
            shape = []
            for d in (v.shape or []):
                if isinstance(d, int):
                    shape.append(d)
                else:
                    name = (d.value or "").lower()
                    shape.append(next((s for k, s in _PROBE_DIMS.items() if k in name), seq_len))
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
                feed[v.name] = rng.standard_normal(shape).astype(dtype)
            elif v.name in _DERIVED_INPUTS and len(shape) == 2:
                feed[v.name] = _DERIVED_INPUTS[v.name](np.zeros(shape, np.int64)).astype(dtype)
            elif v.name in rows:
                feed[v.name] = rng.integers(0, rows[v.name], size=shape).astype(dtype)
            else:
                feed[v.name] = np.zeros(shape, dtype)
        feeds.append(feed)
    return feeds
