"""SmoothQuant (Xiao et al. 2023) as a transform stage: s per scaling group, folded into the graph exactly.

1. statistics (requested up front, one ORT run on the float model with the w8a8 stage's): per-channel |x|
   max of every W8A8 layer's activation, and a bounded row sample for `alpha auto`;
2. s = max|X_j|^alpha / max|W_j|^(1-alpha) per group (`numerics.smoothquant`), or alpha searched per group on
   the W8A8 output error with the activation quantizer the w8a8 stage will emit (static grid, or the
   dynamic kernel's per-row-and-block int8 when every layer of the group is dynamic);
3. `FoldScalesPass` folds s; the folded float graph is run against the original on two calibration feeds
   and must agree to FOLD_TOLERANCE per output, else nothing is quantized (RuntimeError: a folding bug);
4. the statistics become those of x / s (`TensorStats.scaled`: per-channel maxima and the sample are exact;
   the per-tensor min/max are not, so a symmetric range is max_j absmax_j / s_j and an asymmetric one comes
   from the rescaled sample).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ptqonnx.calibration.observers import Stat, TensorStats
from ptqonnx.config import SmoothQuantConfig, W8A8Config
from ptqonnx.graph import find_scaling_groups
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.methods.folding import fold_scales_checked, through_cache
from ptqonnx.methods.w8a8 import activation_grid, dynamic_sites
from ptqonnx.numerics.smoothquant import ActivationQuantizer, auto_alpha, fake_quantize_activation_dynamic, \
    smooth_scales
from ptqonnx.registry import register_method
from ptqonnx.report import ScalesSummary

__all__ = ["run_smoothquant", "smoothquant_requests"]

logger = logging.getLogger(__name__)


def smoothquant_requests(ctx: MethodContext, cfg: SmoothQuantConfig) -> dict[str, set[Stat]]:
    """Per-channel maxima of every layer's activation (and rows to search alpha on)."""
    kinds = {Stat.ABSMAX} | ({Stat.SAMPLE} if cfg.alpha == "auto" else set())
    return {s.activation.name: set(kinds) for s in ctx.sites}


@register_method(SmoothQuantConfig, requests=smoothquant_requests)
def run_smoothquant(ctx: MethodContext, cfg: SmoothQuantConfig) -> MethodResult:
    w8a8 = ctx.recipe.w8a8
    assert w8a8 is not None, "the recipe checks that smoothquant comes with a w8a8 stage"
    symmetric = ctx.recipe.symmetric_activations
    dynamic = dynamic_sites(ctx.sites, w8a8)
    cache = through_cache(ctx.model, ctx.recipe.keep_cache_values, "smoothquant")
    groups, not_scaled = find_scaling_groups(ctx.model, ctx.sites, cache)
    for s in not_scaled:
        logger.debug("%s: not smoothed (%s); quantized W8A8 without smoothing", s.node, s.reason)
    auto = cfg.alpha == "auto"
    stats = ctx.stats
    scales: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    for g in groups:
        st = stats[g.name]
        weights = [s.weight_nk() for s in g.sites]
        if auto:
            all_dynamic = all(x.name in dynamic for x in g.sites)
            alpha, s, _ = auto_alpha(st.sample, weights, st.absmax,
                                     _searched_quantizer(st, w8a8, symmetric, all_dynamic))
        else:
            alpha, s = float(cfg.alpha), smooth_scales(st.absmax, weights, float(cfg.alpha))
        alphas[g.name] = alpha
        logger.debug("smoothquant %s: alpha %.2f, s in [%.3g, %.3g]", g.name, alpha, s.min(), s.max())
        scales[g.name] = s
    if not scales:
        return MethodResult(ScalesSummary(cfg.stage, not_scaled=tuple(not_scaled)))
    fold = fold_scales_checked(ctx.model, groups, scales, ctx.check_feeds(), stats=stats, what="SmoothQuant scales")
    ctx.stats = fold.stats
    ctx.refresh_sites()
    logger.info("smoothquant: %d groups (%d folded, %d with an inserted Mul), alpha %s; folded graph max "
                "relative error %.2g", len(groups), len(fold.folded), len(fold.inserted),
                f"auto (mean {np.mean(list(alphas.values())):.2f})" if auto else cfg.alpha, fold.max_rel_err)
    summary = ScalesSummary(cfg.stage, groups=len(groups), folded=fold.folded, inserted=fold.inserted, alpha=alphas,
                            fold_max_rel_err=fold.max_rel_err, not_scaled=tuple(not_scaled),
                            calibration=ctx.stats_origin, scaled_cache=fold.cache_outputs)
    return MethodResult(summary, folds=fold.records)


def _view(st: TensorStats, absmax: np.ndarray, sample: np.ndarray) -> TensorStats:
    """`st` as it would be after smoothing (for auto alpha's candidate grids)."""
    return dataclasses.replace(st, absmax=absmax, sample=sample, min=None, max=None, minmax_stale=True)


def _searched_quantizer(st: TensorStats, w8a8: W8A8Config, symmetric: bool, dynamic: bool):
    """auto alpha's (absmax / s, rows / s) -> activation quantizer: the emitted static grid, or, when every
    layer of the group has dynamic scales, the kernel's per-row-and-block int8 at the block it will use."""
    from ptqonnx.passes.matmul_nbits import per_channel_block

    def quantizer(amax: np.ndarray, sample: np.ndarray) -> ActivationQuantizer:
        if dynamic:
            return lambda x: fake_quantize_activation_dynamic(x, per_channel_block(x.shape[-1]))
        return activation_grid(_view(st, amax, sample), w8a8, symmetric)

    return quantizer
