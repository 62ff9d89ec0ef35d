"""AWQ planning (Lin et al. 2023): scale search per scaling group, clip search, then RTN or GPTQ, streamed
block by block; the scales are folded into the graph (exactly, checked) at the end.

The search math is `ptqonnx.numerics.awq`; folding and its check are `ptqonnx.methods.folding`; the block-by-block
calibration is `ptqonnx.runtime.sequential`. Per stage (the sites reading one activation x), from XᵀX and
mean |x| over all calibration rows (never the activations themselves: memory is one stage's K x K):

    s = search_scales(XᵀX, W_i)        W_i' = W_i diag(s),  G' = diag(1/s) XᵀX diag(1/s)  (the stats of x/s)
    r_i = search_clip(G', W_i')         Q_i = RTN(W_i', r_i)  or  GPTQ(clip(W_i', r_i), H = 2/n G')

and Q_i(x) = (x/s) Q_iᵀ is written back as the float weight dequant(Q_i) diag(1/s) (the same function), so
later stages and blocks are calibrated on the quantized model, as sequential GPTQ. After the pass the
scales are folded (sites' rows × s, the producer ÷ s). A producer that is itself a planned linear site
(up_proj under down_proj's scale, v_proj under o_proj's) then has its output rows divided by s after its
codes were chosen: its grid is divided by the same s (Q(w/c) = Q(w)/c for c > 0, codes and zero points
unchanged; row-local, so clipping and GPTQ's choices stand).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ptqonnx.calibration.observers import Stat
from ptqonnx.calibration.validate import check_signal, no_signal
from ptqonnx.config import AwqConfig, GptqConfig, RtnConfig
from ptqonnx.errors import UserError
from ptqonnx.graph import find_blocks, find_scaling_groups
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.methods.folding import fold_scales_checked, through_cache
from ptqonnx.plan import PlannedWeight, block_size_for, gptq_stage_solver, rtn_solver
from ptqonnx.registry import register_method
from ptqonnx.report import ScalesSummary, WeightsSummary

__all__ = ["run_awq"]

logger = logging.getLogger(__name__)


@register_method(AwqConfig)
def run_awq(ctx: MethodContext, acfg: AwqConfig) -> MethodResult:
    """AWQ driving the recipe's weights stage: RTN on the scaled, clipped weights (`rtn`) or GPTQ on them
    (`gptq`), block by block (see the module docstring). The LM head's group is not scaled unless
    `scale_lm_head` (as llm-awq, which leaves lm_head alone); it is still clipped. The fold is checked in ORT
    on two calibration feeds (max |y' - y| / max |y| <= FOLD_TOLERANCE per output, else RuntimeError)."""
    from ptqonnx.numerics.awq import clip_weight, search_clip, search_scales
    from ptqonnx.numerics.gptq import hessian_from_xtx
    from ptqonnx.numerics.quant import dequantize_weight
    from ptqonnx.runtime.sequential import run_sequential

    model, sites, w = ctx.model, ctx.sites, ctx.recipe.weights
    if not isinstance(w, (RtnConfig, GptqConfig)):
        raise UserError(f"awq drives rtn or gptq weights, not {w.stage}; put rtn or gptq after awq")
    groups, _ = find_scaling_groups(model, sites, through_cache(model, ctx.recipe.keep_cache_values, "awq"))
    if not acfg.scale_lm_head:
        groups = [g for g in groups if not any(s.is_lm_head for s in g.sites)]
    refused = [g.name for g in groups if g.kind == "mul_insert"]
    if acfg.no_insert and refused:
        raise UserError(f"awq no_insert (--no-insert): {len(refused)} scaling groups have no producer that can absorb 1/s "
                        f"(their activation has other consumers or is a graph input) and would need an inserted "
                        f"Mul: {refused[:5]}; drop no_insert or exclude their MatMuls")
    group_of = {g.name: g for g in groups}
    blocks = find_blocks(model, sites)
    scales: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    ratios: dict[str, np.ndarray] = {}
    losses: dict[str, float] = {}
    planned: dict[str, object] = {}  # site name -> QuantizedWeight of W diag(s) (before producers' row fold)
    gptq = gptq_stage_solver(w, losses) if isinstance(w, GptqConfig) else None
    rtn = rtn_solver(w, ratios)

    fallback: dict[str, str] = {}
    searched: dict[int, list[float]] = {}  # block index -> output error / RTN's, per group searched there

    def solve_stage(block, stage, stats):
        k = stats.channels
        s = np.ones(k, np.float32)
        group = group_of.get(stage.activation)
        why = no_signal(stats.xtx, stats.count)
        if why is not None:  # nothing to search scales or clips on: plain RTN, s = 1
            fallback.update((site.name, why) for site in stage.sites)
            qws = [rtn_solver(w)(site, site.weight_nk()) for site in stage.sites]
            planned.update((site.name, qw) for site, qw in zip(stage.sites, qws))
            if group is not None:
                scales.setdefault(group.name, s)
            return {site.name: dequantize_weight(qw) for site, qw in zip(stage.sites, qws)}
        if group is not None and group.name in scales:  # a group split over two blocks: searched at its first
            s = scales[group.name]
        elif group is not None:
            res = search_scales(stats.xtx, [site.weight_nk() for site in group.sites], mean_abs=stats.mean_abs,
                                bits=w.bits, block_size=block_size_for(w, k), symmetric=w.symmetric,
                                grid=acfg.grid, device=acfg.device)
            s = scales[group.name] = res.s
            alphas[group.name] = res.alpha
            searched.setdefault(block.index, []).append(res.error / max(res.rtn_error, 1e-30))
            line = (f"AWQ block {block.index + 1}/{len(blocks)} {group.name} ({len(group.sites)} sites, "
                    f"{group.kind}): alpha={res.alpha:.2f}, output error {res.rtn_error:.4g} -> {res.error:.4g} "
                    f"({res.error / max(res.rtn_error, 1e-30):.1%})")
            logger.debug(line)
            ctx.say(line)
        inv = 1.0 / s.astype(np.float64)
        gram = stats.xtx * inv[:, None] * inv[None, :]  # XᵀX of x / s
        scaled = []
        for site in stage.sites:
            ws = site.weight_nk() * s  # float32, as FoldScalesPass writes it
            bs = block_size_for(w, site.K)
            if acfg.clip and w.for_site(site.name) is w:  # a layer raised to 8 bits is not clipped
                ratios[site.name] = search_clip(gram, ws, bits=w.bits, block_size=bs, symmetric=w.symmetric,
                                                grid=acfg.grid, device=acfg.device)
                logger.debug("AWQ clip %s: mean ratio %.3f", site.name, float(ratios[site.name].mean()))
                if gptq is not None:
                    ws = clip_weight(ws, ratios[site.name], bits=w.bits, block_size=bs, symmetric=w.symmetric)
            scaled.append(ws)
        qws = (gptq(stage.sites, scaled, hessian_from_xtx(gram, stats.count)) if gptq is not None
               else [rtn(site, ws) for site, ws in zip(stage.sites, scaled)])
        updates = {}
        for site, qw in zip(stage.sites, qws):
            planned[site.name] = qw
            updates[site.name] = (dequantize_weight(qw) / s).astype(np.float32)  # x Ŵᵀ = (x/s) Q(W s)ᵀ
        return updates

    def block_info(block) -> str:  # beside the bar / in the progress line
        errs = searched.get(block.index)
        if not errs:
            return ""
        return f"{len(errs)} group{'s' if len(errs) > 1 else ''}, output error {np.mean(errs):.1%} of RTN's"

    feeds = ctx.feeds()
    run_sequential(model, blocks, feeds, solve_stage, kinds={Stat.XTX, Stat.MEAN_ABS}, task="AWQ block",
                   block_info=block_info, provider=ctx.calibration.provider)
    calibration = f"sequential, {len(blocks)} blocks, {len(feeds)} samples"
    if ratios:
        clipped = sum(int((r < 1).sum()) for r in ratios.values())
        logger.info("AWQ clip: %d of %d blocks clipped", clipped, sum(r.size for r in ratios.values()))

    check_signal(fallback, len(sites))
    fold = fold_scales_checked(model, groups, scales, feeds[:2], no_insert=acfg.no_insert, what="AWQ scales")
    for g in groups:  # a planned producer's output rows were divided by s after its codes were chosen
        if g.name in fold.folded and g.kind == "linear_columns" and g.producer.name in planned:
            qw, rows = planned[g.producer.name], g.producer_scales(scales[g.name]).astype(np.float64)
            planned[g.producer.name] = dataclasses.replace(
                qw, scale=(qw.scale / rows[:, None]).astype(np.float32))

    sites = ctx.refresh_sites()  # weights are the scaled copies now
    assert len(sites) == len(planned), "folding changed the set of linear sites"
    summary = ScalesSummary(acfg.stage, groups=len(groups), folded=fold.folded, inserted=fold.inserted,
                            alpha=alphas, fold_max_rel_err=fold.max_rel_err, calibration=calibration,
                            scaled_cache=fold.cache_outputs)
    weights = WeightsSummary(w.stage, layers=len(planned), calibration=f"driven by awq, {calibration}",
                             losses=losses, fallback=fallback)
    return MethodResult((summary, weights), plan={s.name: PlannedWeight(s, planned[s.name]) for s in sites},
                        folds=fold.records)
