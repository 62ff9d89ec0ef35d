"""Fold per-channel activation scales into the graph and prove the float model did not change.

Shared by AWQ and SmoothQuant: both rewrite Y = X W as Y = (X / s)(s W), with 1/s absorbed by X's
producer (`passes/fold_scales.py`). In exact arithmetic the float graph is unchanged; this step checks it on
calibration feeds (ORT, optimizations off: the float semantics) before anything is quantized, and carries
the calibration statistics over exactly (max and mean by 1/s, XᵀX by diag(1/s) . diag(1/s)).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqonnx.calibration.stats import Statistics
from ptqonnx.passes import run_passes
from ptqonnx.passes.fold_scales import FoldScalesPass
from ptqonnx.graph.scaling import ScalingGroup
from ptqonnx.methods.base import ScaleFold

__all__ = ["FOLD_TOLERANCE", "LOW_FLOAT_FACTOR", "FoldOutcome", "fold_scales_checked", "check_rewrite",
           "check_decode", "decode_outputs", "max_relative_error", "model_outputs", "rewrite_tolerance",
           "through_cache", "without"]

logger = logging.getLogger(__name__)

FOLD_TOLERANCE = 1e-4  # max over outputs of max|y' - y| / max|y| allowed after folding (fp32 models)
# fp16/bf16 models: an exact rewrite re-rounds every weight it touches, so it may move the outputs by up to this
# many times the model's own arithmetic error (its outputs against its float32 twin's). Measured on the tiny
# LLaMA in fp16: own error 1.1e-3; SmoothQuant's fold 2.2e-3, AWQ's 3.1e-3; a plumbing bug moves them by O(1).
LOW_FLOAT_FACTOR = 8.0
DECODE_CHECKS = 2  # feeds whose last token is decoded after a prefill where a rewrite transformed the cache


@dataclass(frozen=True)
class FoldOutcome:
    folded: tuple[str, ...]  # activations whose 1/s a producer absorbed
    inserted: tuple[str, ...]  # activations given an explicit Mul(x, 1/s)
    max_rel_err: float
    stats: Statistics | None  # the statistics of the activations the sites now read
    records: tuple[ScaleFold, ...] = ()  # what was folded, keyed by the sites' weight names
    cache_outputs: tuple[str, ...] = ()  # KV-cache present outputs now holding V / s


def model_outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Graph outputs on `feeds` from an unoptimized ORT session on a clone (external data handled)."""
    from ptqonnx.runtime.collect import instrumented_session

    with instrumented_session(model, [], opt_level="disable") as (sess, _):
        names = [i.name for i in sess.get_inputs()]
        return [sess.run(None, {k: f[k] for k in names}) for f in feeds]


def through_cache(model: ir.Model, keep_cache_values: bool, what: str) -> bool:
    """Whether `what` (R2, the v->o scale) may transform the values a KV cache stores: not with
    --keep-cache-values, and only where one decode step can check the result (`decode_outputs`: feeds that
    `runtime.bench.ModelFeeds` builds and reads the cache back from, float caches); else the cache values are
    kept, said once at INFO. A graph without a past is not restricted here."""
    from ptqonnx.runtime.bench import PAST_PREFIX, feeds_problem

    if keep_cache_values:
        return False
    past = [v for v in model.graph.inputs if (v.name or "").startswith(PAST_PREFIX)]
    if not past:
        return True
    why = feeds_problem([v.name or "" for v in model.graph.inputs], {v.name for v in model.graph.outputs})
    why = why or next((f"{v.name} is not a float cache" for v in past
                       if not (v.dtype and v.dtype.is_floating_point())), None)
    if why:
        logger.info("%s: the KV cache keeps the float model's values (its decode path cannot be checked: %s)", what,
                    why)
    return why is None


def without(runs: list[list[np.ndarray]], model: ir.Model, names: Collection[str]) -> list[list[np.ndarray]]:
    """`model_outputs`-style runs of `model` with the outputs called `names` left out."""
    keep = [i for i, v in enumerate(model.graph.outputs) if v.name not in names]
    return [[run[i] for i in keep] for run in runs]


def decode_outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]] | None:
    """For a KV-cache graph (optimum's `past_key_values.*` inputs; `through_cache` says which can be run): the
    outputs other than the presents (the logits) of one decode step per feed with 2+ tokens, its last token
    after a prefill of the tokens before it whose present outputs are fed back as the past (unoptimized ORT
    session on a clone); None for a graph without a past."""
    from ptqonnx.runtime.bench import PAST_PREFIX, PRESENT_PREFIX, ModelFeeds
    from ptqonnx.runtime.collect import instrumented_session

    if not any((v.name or "").startswith(PAST_PREFIX) for v in model.graph.inputs):
        return None
    with instrumented_session(model, [], opt_level="disable") as (sess, _):
        mf = ModelFeeds(sess)
        names = [o.name for o in sess.get_outputs() if not o.name.startswith(PRESENT_PREFIX)]
        out = []
        for f in feeds:
            ids = np.asarray(f["input_ids"])[:1]
            if ids.shape[1] < 2:
                continue
            prefill = sess.run(None, mf.build(ids[:, :-1]))
            out.append(sess.run(names, mf.build(ids[:, -1:], mf.presents_as_past(prefill))))
        return out


def check_decode(before: list[list[np.ndarray]] | None, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
                 tol: float, what: str) -> float:
    """After a rewrite that transformed the cached values: one decode step fed the model's own cache gives the
    outputs it gave before (`before`: `decode_outputs` of the original); 0 for a graph without a past. A
    UserError when no feed has the 2 tokens the check needs."""
    if before is None:
        return 0.0
    if not before:
        from ptqonnx.errors import UserError

        raise UserError(f"the KV cache would hold transformed values after {what}, but no calibration sample has the "
                        "2 tokens its decode check needs; pass longer samples, or --keep-cache-values")
    return check_rewrite(before, decode_outputs(model, feeds), tol, f"{what} (a decode step fed its own cache)",
                         len(before))


def rewrite_tolerance(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
                      before: list[list[np.ndarray]], base: float, what: str) -> float:
    """How far an exact rewrite of `model` may move its outputs `before` (on `feeds`): `base` for a float32
    model; for an fp16/bf16 one, at least LOW_FLOAT_FACTOR times its own arithmetic error, measured against
    its float32 twin (`ptqonnx.graph.dtype.as_float32`)."""
    from ptqonnx.graph.dtype import as_float32, low_float_type, widen_feeds

    low = low_float_type(model)
    if low is None:
        return base
    own = max_relative_error(model_outputs(as_float32(model), widen_feeds(feeds)), before)
    tol = max(base, LOW_FLOAT_FACTOR * own)
    logger.info("%s: %s model, its own arithmetic error %.2g against float32; allowing %.2g", what,
                low.name.lower(), own, tol)
    return tol


def check_rewrite(before: list[list[np.ndarray]], after: list[list[np.ndarray]], tol: float, what: str,
                  n_feeds: int) -> float:
    """The max relative error of `after` against `before`; raises when it exceeds `tol` (UserError where the
    rewrite overflowed a finite model into inf/NaN, RuntimeError otherwise: a bug)."""
    err = max_relative_error(before, after)
    if err <= tol:
        return err
    finite = all(np.isfinite(np.asarray(a, np.float64)).all() for out in before for a in out)
    if finite and not all(np.isfinite(np.asarray(a, np.float64)).all() for out in after for a in out):
        from ptqonnx.errors import UserError

        raise UserError(f"the model overflows its float type (inf/NaN outputs) after {what}; compile the float32 "
                        "model, or use a smaller --alpha")
    raise RuntimeError(f"internal error: the float model changed when {what} (max relative output error "
                       f"{err:.3g} > {tol:.3g} on {n_feeds} calibration feeds); nothing was written")


def max_relative_error(before: list[list[np.ndarray]], after: list[list[np.ndarray]]) -> float:
    """max over feeds and outputs of max|y' - y| / max|y| (float64)."""
    worst = 0.0
    for ref, out in zip(before, after):
        for a, b in zip(ref, out):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    return worst


def fold_scales_checked(
    model: ir.Model,
    groups: Sequence[ScalingGroup],
    scales: Mapping[str, np.ndarray],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    stats: Statistics | None = None,
    no_insert: bool = False,
    what: str = "scales",
) -> FoldOutcome:
    """Fold `scales` (activation name -> s [K]) into `model` in place and check the float outputs on `feeds`.

    Raises RuntimeError (nothing is written by the caller) when they moved by more than FOLD_TOLERANCE (for
    fp16/bf16 models: `rewrite_tolerance`). A group scaling V where a KV cache stores it (`cache_outputs`)
    leaves those present outputs out of the comparison (they hold V / s by design), and then one decode step
    after a prefill, fed the model's own cache, must give the logits it gave before (`decode_outputs`).
    `stats`, when given, is returned rescaled to what the sites read now (under an inserted Mul's new name).
    """
    before = model_outputs(model, feeds)
    tol = rewrite_tolerance(model, feeds, before, FOLD_TOLERANCE, what)
    cached = {n for g in groups if g.name in scales for n in g.cache_outputs}
    decoded = decode_outputs(model, feeds[:DECODE_CHECKS]) if cached else None
    fold = FoldScalesPass(dict(scales), list(groups), no_insert=no_insert)
    run_passes([fold], model)
    err = check_rewrite(without(before, model, cached), without(model_outputs(model, feeds), model, cached), tol,
                        f"{what} were folded", len(feeds))
    err = max(err, check_decode(decoded, model, feeds[:DECODE_CHECKS], tol, f"{what} were folded"))
    if stats is not None:
        for name, s in scales.items():
            if name in fold.folded or name in fold.inserted:
                stats = stats.replace(fold.renamed.get(name, name), stats[name].scaled(s))
    logger.info("%s: %d groups folded into their producer, %d with an inserted Mul; float outputs unchanged "
                "(max relative error %.2g)", what, len(fold.folded), len(fold.inserted), err)
    records = tuple(
        ScaleFold(g.name, tuple(site.weight_name for site in g.sites), np.asarray(scales[g.name], np.float32),
                  inserted=g.name in fold.inserted, through=g.through.name if g.through is not None else None)
        for g in groups if g.name in fold.folded or g.name in fold.inserted)
    return FoldOutcome(tuple(fold.folded), tuple(fold.inserted), err, stats, records, tuple(sorted(cached)))
