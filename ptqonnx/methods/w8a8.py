"""The w8a8 stage: INT8 activations for the INT8 per-channel weights of the weights stage.

1. `select_w8a8`: the LM head and GEMV-shaped layers stay float (unless asked); `dynamic_layers` patterns
   must match a W8A8 layer;
2. statistics (requested up front, one ORT run on the float model with the other stages' requests): |x|
   max and min/max (and a bounded row sample for `percentile` ranges or smoothed `ort-cpu` grids) of every
   input quantized with static scales; with `quantize_bmm`, attention's activation x activation MatMul
   inputs too (measured again after a smoothquant fold that passed a scale into V);
3. the activation plan: a per-tensor static grid per static layer (QDQ, `QuantizeActivationsPass`) from the
   statistics as the earlier stages left them (exactly rescaled by smoothquant's fold); the layers with
   dynamic scales (`act_scales dynamic`, or matched by `dynamic_layers`) are lowered by the pipeline to
   MatMulNBits bits 8 with accuracy_level 4: ORT's int8 kernel quantizes each activation row per block of K
   at run time (`fake_quantize_activation_dynamic`), so they need no activation statistics.

Per-tensor static scales cannot follow LLM activations whose range changes from token to token (SmolLM2's
down_proj inputs: a few channels reach thousands on some tokens only); dynamic scales are the ORT CPU answer,
mixed (`dynamic_layers`) keeps the faster static QDQ everywhere else.
"""

from __future__ import annotations

import logging

import numpy as np

from ptqonnx.calibration.observers import Stat, TensorStats
from ptqonnx.calibration.validate import check_signal
from ptqonnx.config import SmoothQuantConfig, W8A8Config, matches_any
from ptqonnx.errors import UserError
from ptqonnx.graph import LinearSite, Skip
from ptqonnx.methods.base import ActivationResult, MethodContext, MethodResult
from ptqonnx.numerics.smoothquant import ActivationQParams, activation_scale, activation_scale_fp8, percentile_absmax, \
    percentile_range
from ptqonnx.registry import register_method
from ptqonnx.report import W8A8Summary

__all__ = ["SAMPLE_ROWS", "DYNAMIC_ACCURACY_LEVEL", "activation_grid", "dynamic_sites", "run_w8a8"]

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 1024
DYNAMIC_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations quantized per row and block inside the kernel


def activation_grid(stats: TensorStats, cfg: W8A8Config, symmetric: bool) -> ActivationQParams:
    """The per-tensor grid of one (maybe rescaled) activation from its statistics."""
    if cfg.qtype == "fp8":  # symmetric by nature: the range's larger end at ±448
        a = percentile_absmax(stats.sample, cfg.percentile) if cfg.calib_range == "percentile" \
            else float(stats.absmax.max())
        return activation_scale_fp8(a)
    if cfg.calib_range == "percentile":
        if symmetric:
            a = percentile_absmax(stats.sample, cfg.percentile)
            return activation_scale(-a, a, True)
        return activation_scale(*percentile_range(stats.sample, cfg.percentile), False)
    if symmetric:
        a = float(stats.absmax.max())
        return activation_scale(-a, a, True)
    if stats.min is not None:
        return activation_scale(stats.min, stats.max, False)
    return activation_scale(float(stats.sample.min()), float(stats.sample.max()), False)


def dynamic_sites(sites: list[LinearSite], cfg: W8A8Config) -> set[str]:
    """Names of the sites that get dynamic activation scales."""
    return {s.name for s in sites if cfg.dynamic(s.name, s.weight_name)}


def static_convs(ctx: MethodContext, cfg: W8A8Config) -> list[LinearSite]:
    """The Conv layers with static activations: all but those dynamic scales were asked for (a Conv has no
    dynamic-activation form here: those keep float activations on their INT8 weights)."""
    return [c for c in ctx.convs if not cfg.dynamic(c.name, c.weight_name)]


def select_w8a8(ctx: MethodContext, cfg: W8A8Config, sites: list[LinearSite]) -> tuple[list[LinearSite], list[Skip]]:
    from ptqonnx.passes.w8a8 import select_w8a8_sites

    kept, skipped = select_w8a8_sites(sites, quantize_lm_head=cfg.quantize_lm_head)
    layers = kept + ctx.convs  # a Conv matched by dynamic_layers keeps float activations (static_convs)
    for pattern in cfg.dynamic_layers:
        if not any(matches_any((pattern,), s.name, s.weight_name) for s in layers):
            eg = f" (e.g. {layers[0].name} or {layers[0].weight_name})" if layers else ""
            raise UserError(f"w8a8 dynamic_layers {pattern!r} matches no W8A8 layer; pass node or weight names{eg}, "
                            "'*' allowed")
    return kept, skipped


def _kinds(ctx: MethodContext, cfg: W8A8Config) -> set[Stat]:
    sq = ctx.recipe.stage_of(SmoothQuantConfig)
    smooth = sq is not None
    need_sample = (smooth and sq.alpha == "auto") or cfg.calib_range == "percentile" or \
        (smooth and not ctx.recipe.symmetric_activations)
    return {Stat.ABSMAX, Stat.MINMAX} | ({Stat.SAMPLE} if need_sample else set())


def token_levels(st: TensorStats) -> float:
    """The INT8 levels the median token (row) gets under a per-tensor symmetric grid set by the largest one:
    127 · median_r max|x_r| / max_r max|x_r| (per-tensor scales are as good as their worst token allows)."""
    r = st.row_absmax
    top = float(r.max()) if r is not None and r.size else 0.0
    return 127.0 * float(np.median(r)) / top if top > 0 else 0.0


def _bmm_requests(ctx: MethodContext, cfg: W8A8Config) -> dict[str, set[Stat]]:
    from ptqonnx.passes.w8a8 import find_bmm_nodes

    if not cfg.quantize_bmm:
        return {}
    return {v.name: _kinds(ctx, cfg) for n in find_bmm_nodes(ctx.model) for v in n.inputs[:2]}


def w8a8_requests(ctx: MethodContext, cfg: W8A8Config) -> dict[str, set[Stat]]:
    """Static layers need their input's range; dynamic layers none (their group's maxima are smoothquant's)."""
    dynamic = dynamic_sites(ctx.sites, cfg)
    base = _kinds(ctx, cfg)
    kinds = base | ({Stat.ROW_ABSMAX} if cfg.min_levels else set())
    out = {s.activation.name: set(kinds) for s in ctx.sites if s.name not in dynamic}
    for c in static_convs(ctx, cfg):  # rows of an NCHW input are not tokens: no token-outlier rule
        out.setdefault(c.activation.name, set()).update(base)
    for name, kinds in _bmm_requests(ctx, cfg).items():
        out.setdefault(name, set()).update(kinds)
    return out


@register_method(W8A8Config, select=select_w8a8, requests=w8a8_requests)
def run_w8a8(ctx: MethodContext, cfg: W8A8Config) -> MethodResult:
    from ptqonnx.passes.w8a8 import find_bmm_nodes
    from ptqonnx.runtime.collect import collect_statistics

    symmetric = ctx.recipe.symmetric_activations
    stats = ctx.stats
    bmm = find_bmm_nodes(ctx.model) if cfg.quantize_bmm else []
    if bmm and any(f.through is not None for f in ctx.folds):  # V now holds v / s: measure P·V's inputs again
        stats = stats.merged(collect_statistics(ctx.model, ctx.feeds(), _bmm_requests(ctx, cfg),
                                                sample_rows=SAMPLE_ROWS, provider=ctx.calibration.provider))
    dynamic = dynamic_sites(ctx.sites, cfg)
    convs = static_convs(ctx, cfg)
    static = [s for s in ctx.sites if s.name not in dynamic] + convs
    grids: dict[str, dict[int, ActivationQParams]] = {}
    fallback: dict[str, str] = {}
    outliers: dict[str, float] = {}
    for s in static:
        st = stats[s.activation.name]
        if st.absmax is not None and not float(st.absmax.max()) > 0:  # no range to set a scale from
            fallback[s.name] = "all zero"
            continue
        if cfg.min_levels and not s.is_conv and st.row_absmax is not None and token_levels(st) < cfg.min_levels:
            outliers[s.name] = token_levels(st)
            continue
        grids[s.name] = {0: activation_grid(st, cfg, symmetric)}
    check_signal(fallback, len(static))
    if outliers:
        logger.info("W8A8: %d layers keep float activations (token outliers: the median token would get "
                    "%s INT8 levels): %s", len(outliers), ", ".join(f"{v:.1f}" for v in outliers.values()),
                    ", ".join(outliers))
    for n in bmm:
        grids[n.name] = {i: activation_grid(stats[n.inputs[i].name], cfg, symmetric) for i in (0, 1)}
    logger.info("W8A8 activations: %d layers static per tensor (QDQ; %d of them Conv), %d dynamic per row and "
                "block (MatMulNBits int8)", len(static), len(convs), len(dynamic))
    if len(convs) < len(ctx.convs):
        logger.info("W8A8: %d Conv layers keep float activations (no dynamic-activation Conv form; their weights are "
                    "INT8)", len(ctx.convs) - len(convs))
    summary = W8A8Summary(cfg.stage, target=ctx.recipe.target or "", qtype=cfg.qtype,
                          static_layers=len(static) - len(fallback) - len(outliers), dynamic_layers=len(dynamic),
                          bmm_nodes=len(bmm), calibration=ctx.stats_origin, weight_only=tuple(fallback),
                          token_outliers=outliers)
    return MethodResult(summary, activations=ActivationResult(grids, frozenset(dynamic), DYNAMIC_ACCURACY_LEVEL))
