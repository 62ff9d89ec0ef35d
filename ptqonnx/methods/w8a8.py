"""The W8A8 step of a compile (`--w8a8`, with `--method smoothquant` or `rtn`): calibrate, smooth, check, plan.

1. one ORT run on the float model: per-channel |x| max of every group's activation; |x| max, min/max (and a
   bounded row sample for `alpha auto`, `percentile` or smoothed `ort-cpu` grids) of every quantized input;
2. SmoothQuant only: s per scaling group (`numerics.smoothquant`), folded by `FoldScalesPass`; the folded
   float graph is run against the original on two calibration feeds and must agree to a max relative error
   of 1e-4 per output, else nothing is quantized (RuntimeError: an internal folding bug, never user error);
3. statistics of each smoothed activation x / s (`TensorStats.scaled`: per-channel maxima and the sample are
   exact; the per-tensor min/max are not, so a symmetric range is max_j absmax_j / s_j and an asymmetric one
   comes from the rescaled sample); with `quantize_bmm`, the attention MatMuls' inputs are measured again
   after folding when a scale passed into V (o_proj's, folded into v_proj's columns);
4. returns the lowering passes: `LowerToQdqPass` (INT8 symmetric per-channel weights, re-read after folding)
   and `QuantizeActivationsPass` (per-tensor static activation grids) for the layers with static activation
   scales; `LowerToMatMulNBitsPass` (bits 8, accuracy_level 4) for those with dynamic ones (`act_scales
   dynamic`, or matched by `dynamic_layers`): ORT's int8 kernel then quantizes each row of the activation
   per block of K at run time (`fake_quantize_activation_dynamic`), so these layers need no activation
   statistics but their group's per-channel maxima (for s) and, with `alpha auto`, its sampled rows.

Per-tensor static scales cannot follow LLM activations whose range changes from token to token (SmolLM2's
down_proj inputs: a few channels reach thousands on some tokens only); dynamic scales are the ORT CPU answer,
mixed (`dynamic_layers`) keeps the faster static QDQ everywhere else.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ptqonnx.calibration.observers import TensorStats
from ptqonnx.errors import UserError
from ptqonnx.graph import LinearSite, Skip, find_linear_sites
from ptqonnx.numerics.smoothquant import (
    ActivationQParams, ActivationQuantizer, activation_scale, auto_alpha, fake_quantize_activation_dynamic,
    percentile_absmax, percentile_range, smooth_scales,
)
from ptqonnx.config import CompileConfig, W8A8Config, matches_any

__all__ = ["SAMPLE_ROWS", "DYNAMIC_ACCURACY_LEVEL", "prepare_w8a8", "activation_grid"]

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 1024
DYNAMIC_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations quantized per row and block inside the kernel


def activation_grid(stats: TensorStats, cfg: W8A8Config) -> ActivationQParams:
    """The per-tensor grid of one (maybe rescaled) activation from its statistics."""
    if cfg.calib_range == "percentile":
        if cfg.symmetric:
            a = percentile_absmax(stats.sample, cfg.percentile)
            return activation_scale(-a, a, True)
        return activation_scale(*percentile_range(stats.sample, cfg.percentile), False)
    if cfg.symmetric:
        a = float(stats.absmax.max())
        return activation_scale(-a, a, True)
    if stats.min is not None:
        return activation_scale(stats.min, stats.max, False)
    return activation_scale(float(stats.sample.min()), float(stats.sample.max()), False)


def prepare_w8a8(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report) -> tuple[
        list, list[LinearSite], list[Skip]]:
    """Calibrate, smooth (SmoothQuant) and plan `model` in place; returns (lowering passes, quantized sites, skips)."""
    from ptqonnx.methods.folding import fold_scales_checked
    from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
    from ptqonnx.passes.qdq import LowerToQdqPass
    from ptqonnx.passes.w8a8 import QuantizeActivationsPass, find_bmm_nodes, select_w8a8_sites
    from ptqonnx.plan import plan_weights, rtn_solver
    from ptqonnx.runtime.collect import collect_statistics
    from ptqonnx.graph.scaling import find_scaling_groups

    wcfg, sq = cfg.w8a8, cfg.smoothquant
    assert wcfg is not None
    sites, skipped = select_w8a8_sites(sites, quantize_lm_head=wcfg.quantize_lm_head)
    dynamic = {s.name for s in sites if wcfg.dynamic(s.name, s.weight_name)}
    for pattern in wcfg.dynamic_layers:
        if not any(matches_any((pattern,), s.name, s.weight_name) for s in sites):
            eg = f" (e.g. {sites[0].name} or {sites[0].weight_name})" if sites else ""
            raise UserError(f"--dynamic-layers {pattern!r} matches no W8A8 layer; pass node or weight names{eg}, "
                            "'*' allowed")
    smooth = cfg.method == "smoothquant"
    groups, group_skips = find_scaling_groups(model, sites) if smooth else ([], [])
    for s in group_skips:
        logger.info("%s: not smoothed (%s); quantized W8A8 without smoothing", s.node, s.reason)
    bmm = find_bmm_nodes(model) if wcfg.quantize_bmm else []

    auto = smooth and sq.alpha == "auto"
    need_sample = auto or wcfg.calib_range == "percentile" or (smooth and not wcfg.symmetric)
    kinds = {"absmax", "minmax"} | ({"sample"} if need_sample else set())
    requests: dict[str, set[str]] = {}
    for s in sites:  # a dynamic layer needs only its group's per-channel maxima (and rows for auto alpha)
        dyn_kinds = ({"absmax"} if smooth else set()) | ({"sample"} if auto else set())
        requests.setdefault(s.activation.name, set()).update(dyn_kinds if s.name in dynamic else kinds)
    bmm_requests = {v.name: set(kinds) for n in bmm for v in n.inputs[:2]}
    requests.update(bmm_requests)
    stats = collect_statistics(model, feeds, requests, sample_rows=SAMPLE_ROWS)

    scales: dict[str, np.ndarray] = {}
    alphas: list[float] = []
    for g in groups:
        st = stats[g.name]
        weights = [s.weight_nk() for s in g.sites]
        if auto:
            alpha, s, _ = auto_alpha(st.sample, weights, st.absmax,
                                     _searched_quantizer(st, wcfg, all(x.name in dynamic for x in g.sites)))
        else:
            alpha, s = float(sq.alpha), smooth_scales(st.absmax, weights, float(sq.alpha))
        alphas.append(alpha)
        logger.debug("smoothquant %s: alpha %.2f, s in [%.3g, %.3g]", g.name, alpha, s.min(), s.max())
        scales[g.name] = s
    if scales:
        fold = fold_scales_checked(model, groups, scales, feeds[:2], stats=stats, what="SmoothQuant scales")
        stats, err = fold.stats, fold.max_rel_err
        if bmm and any(g.through is not None and g.name in fold.folded for g in groups):  # V now holds v / s
            stats = stats.merged(collect_statistics(model, feeds, bmm_requests, sample_rows=SAMPLE_ROWS))
        logger.info("smoothquant: %d groups (%d folded, %d with an inserted Mul), alpha %s; folded graph max "
                    "relative error %.2g", len(groups), len(fold.folded), len(fold.inserted),
                    f"auto (mean {np.mean(alphas):.2f})" if auto else sq.alpha, err)
        report.calibration = (f"{len(feeds)} samples; smoothquant alpha {'auto' if auto else sq.alpha} on "
                              f"{len(groups)} groups; folded graph max rel. error {err:.2g}")
    else:
        report.calibration = f"{len(feeds)} samples"

    # sites are re-read after folding: a folded weight may now live in a private copy, and a site behind an
    # inserted Mul reads a new activation (whose statistics were carried over under that name)
    current = {s.name: s for s in find_linear_sites(model).sites}
    sites = [current[s.name] for s in sites]
    static = [s for s in sites if s.name not in dynamic]
    act_plan: dict[str, dict[int, ActivationQParams]] = {}
    for s in static:
        act_plan[s.name] = {0: activation_grid(stats[s.activation.name], wcfg)}
    for n in bmm:
        act_plan[n.name] = {i: activation_grid(stats[n.inputs[i].name], wcfg) for i in (0, 1)}
    solver = rtn_solver(cfg.weights)
    passes: list = []
    if static or bmm:
        passes += [LowerToQdqPass(plan_weights(static, solver)), QuantizeActivationsPass(act_plan)]
    if dynamic:
        passes.append(LowerToMatMulNBitsPass(plan_weights([s for s in sites if s.name in dynamic], solver),
                                             DYNAMIC_ACCURACY_LEVEL))
    logger.info("W8A8 activations: %d layers static per tensor (QDQ), %d dynamic per row and block "
                "(MatMulNBits int8)", len(static), len(dynamic))
    report.calibration += (f"; activations {len(static)} layers static, {len(dynamic)} dynamic" if dynamic
                           else "")
    return passes, sites, skipped


def _view(st: TensorStats, absmax: np.ndarray, sample: np.ndarray) -> TensorStats:
    """`st` as it would be after smoothing (for auto alpha's candidate grids)."""
    import dataclasses

    return dataclasses.replace(st, absmax=absmax, sample=sample, min=None, max=None, minmax_stale=True)


def _searched_quantizer(st: TensorStats, wcfg: W8A8Config, dynamic: bool):
    """auto alpha's (absmax / s, rows / s) -> activation quantizer: the emitted static grid, or, when every
    layer of the group has dynamic scales, the kernel's per-row-and-block int8 at the block it will use."""
    from ptqonnx.passes.matmul_nbits import per_channel_block

    def quantizer(amax: np.ndarray, sample: np.ndarray) -> ActivationQuantizer:
        if dynamic:
            return lambda x: fake_quantize_activation_dynamic(x, per_channel_block(x.shape[-1]))
        return activation_grid(_view(st, amax, sample), wcfg)

    return quantizer
