"""GPTQ: Hessians block by block on the partly quantized model (or one-shot from the float model), then the
solver.

The linear algebra is `ptqonnx.numerics.gptq`; the sequential calibration is `ptqonnx.runtime.sequential`
on the blocks `ptqonnx.graph.blocks` finds along the residual stream. One-shot Hessians (`sequential` off,
or a graph with no residual-stream cut) are XᵀX statistics the pipeline collects with the other stages'
requests in one run (so `--stats` from `ptqonnx calibrate --hessian` can supply them).
"""

from __future__ import annotations

import logging

from ptqonnx.calibration.observers import Stat
from ptqonnx.config import GptqConfig
from ptqonnx.graph import Block, LinearSite, find_blocks
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.calibration.validate import check_signal, no_signal
from ptqonnx.plan import PlannedWeight, gptq_stage_solver, rtn_solver
from ptqonnx.registry import register_method
from ptqonnx.report import WeightsSummary

__all__ = ["run_gptq", "gptq_requests"]

logger = logging.getLogger(__name__)


def _blocks(ctx: MethodContext, cfg: GptqConfig) -> list[Block]:
    return find_blocks(ctx.model, ctx.sites) if cfg.sequential else []


def _by_activation(sites: list[LinearSite]) -> dict[str, list[LinearSite]]:
    out: dict[str, list[LinearSite]] = {}
    for s in sites:
        out.setdefault(s.activation.name, []).append(s)
    return out


def gptq_requests(ctx: MethodContext, cfg: GptqConfig) -> dict[str, set[Stat]]:
    """One-shot GPTQ needs XᵀX of every activation its sites read; sequential GPTQ calibrates on its own."""
    if len(_blocks(ctx, cfg)) >= 2:
        return {}
    return {act: {Stat.XTX} for act in _by_activation(ctx.sites)}


@register_method(GptqConfig, requests=gptq_requests)
def run_gptq(ctx: MethodContext, cfg: GptqConfig) -> MethodResult:
    """GPTQ plan: block by block on the partly quantized model, or one-shot Hessians when the graph has no
    residual-stream cut (or `sequential` is off)."""
    from ptqonnx.numerics.gptq import hessian_from_xtx
    from ptqonnx.numerics.quant import dequantize_weight

    losses: dict[str, float] = {}
    fallback: dict[str, str] = {}
    gptq = gptq_stage_solver(cfg, losses)  # sites sharing an activation: one sweep
    rtn = rtn_solver(cfg)

    def solve(sites, weights, stats):
        why = no_signal(stats.xtx, stats.count)
        if why is None:
            return gptq(sites, weights, hessian_from_xtx(stats.xtx, stats.count))
        fallback.update((s.name, why) for s in sites)  # GPTQ would zero W's dead columns, fit one direction
        return [rtn(s, w) for s, w in zip(sites, weights)]
    blocks = _blocks(ctx, cfg)
    plan: dict[str, PlannedWeight] = {}
    if len(blocks) >= 2:
        from ptqonnx.runtime.sequential import run_sequential

        def solve_stage(block, stage, stats):
            qws = solve(stage.sites, [s.weight_nk() for s in stage.sites], stats)
            plan.update((site.name, PlannedWeight(site, qw)) for site, qw in zip(stage.sites, qws))
            return {site.name: dequantize_weight(qw) for site, qw in zip(stage.sites, qws)}

        def on_stage(block, stage, seconds):
            shown = ", ".join(f"{s.weight_name} {losses[s.weight_name]:.4g}" if s.weight_name in losses else
                              f"{s.weight_name} RTN ({fallback.get(s.name)})" for s in stage.sites)
            part = f", stage {block.stages.index(stage) + 1}/{len(block.stages)}" if len(block.stages) > 1 else ""
            line = f"GPTQ block {block.index + 1}/{len(blocks)}{part} ({seconds:.1f} s) loss: {shown}"
            logger.debug(line)
            ctx.say(line)

        def block_info(block):  # beside the bar / in the progress line: the block's loss, summed as the report's
            sites = [s for stage in block.stages for s in stage.sites]
            rtn_sites = sum(1 for s in sites if s.name in fallback)
            loss = sum(losses.get(s.weight_name, 0.0) for s in sites)
            return f"loss {loss:.4g}" + (f", RTN for {rtn_sites} of {len(sites)} layers" if rtn_sites else "")

        feeds = ctx.feeds()
        run_sequential(ctx.model, blocks, feeds, solve_stage, progress=on_stage, task="GPTQ block",
                       block_info=block_info, provider=ctx.calibration.provider)
        calibration = f"sequential, {len(blocks)} blocks, {len(feeds)} samples"
        plan = {s.name: plan[s.name] for s in ctx.sites}  # graph order
    else:
        if cfg.sequential:
            logger.warning("no residual-stream cut found in the graph: GPTQ falls back to one-shot Hessians "
                           "from the float model")
        for act, group in _by_activation(ctx.sites).items():
            qws = solve(group, [s.weight_nk() for s in group], ctx.stats[act])
            plan.update((site.name, PlannedWeight(site, qw)) for site, qw in zip(group, qws))
        plan = {s.name: plan[s.name] for s in ctx.sites}  # graph order
        calibration = f"one-shot, {ctx.stats_origin}"
    check_signal(fallback, len(plan))
    summary = WeightsSummary(cfg.stage, layers=len(plan), calibration=calibration, losses=losses, fallback=fallback)
    return MethodResult(summary, plan=plan)
