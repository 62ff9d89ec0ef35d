"""GPTQ planning: Hessians block by block on the partly quantized model (or one-shot), then the solver.

The linear algebra is `ptqonnx.numerics.gptq`; the sequential calibration is `ptqonnx.runtime.sequential`
on the blocks `ptqonnx.graph.blocks` finds along the residual stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

from ptqonnx.graph import LinearSite
from ptqonnx.plan import PlannedWeight, gptq_stage_solver
from ptqonnx.config import CompileConfig

__all__ = ["plan_gptq"]

logger = logging.getLogger(__name__)


def plan_gptq(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report,
               progress: Callable[[str], None] | None) -> dict[str, PlannedWeight]:
    """GPTQ plan: block by block on the partly quantized model, or one-shot Hessians when the graph has no
    residual-stream cut (or `sequential` is off)."""
    from ptqonnx.graph.blocks import find_blocks
    from ptqonnx.numerics.gptq import hessian_from_xtx
    from ptqonnx.numerics.quant import dequantize_weight

    solve = gptq_stage_solver(cfg.weights, cfg.gptq, report.losses)  # sites sharing an activation: one sweep
    blocks = find_blocks(model, sites) if cfg.gptq.sequential else []
    if len(blocks) >= 2:
        from ptqonnx.runtime.sequential import run_sequential

        plan: dict[str, PlannedWeight] = {}

        def solve_stage(block, stage, stats):
            qws = solve(stage.sites, [s.weight_nk() for s in stage.sites], hessian_from_xtx(stats.xtx, stats.count))
            plan.update((site.name, PlannedWeight(site, qw)) for site, qw in zip(stage.sites, qws))
            return {site.name: dequantize_weight(qw) for site, qw in zip(stage.sites, qws)}

        def on_stage(block, stage, seconds):
            if progress is not None:
                losses = ", ".join(f"{s.weight_name} {report.losses[s.weight_name]:.4g}" for s in stage.sites)
                progress(f"block {block.index + 1}/{len(blocks)} ({seconds:.1f} s) GPTQ loss: {losses}")

        run_sequential(model, blocks, feeds, solve_stage, progress=on_stage)
        report.calibration = f"sequential, {len(blocks)} blocks, {len(feeds)} samples"
        return plan
    if cfg.gptq.sequential:
        logger.warning("no residual-stream cut found in the graph: GPTQ falls back to one-shot Hessians "
                       "from the float model")
    from ptqonnx.runtime.collect import collect_statistics

    by_activation: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_activation.setdefault(s.activation.name, []).append(s)
    stats = collect_statistics(model, feeds, {act: {"xtx"} for act in by_activation})
    report.calibration = f"one-shot, {len(feeds)} samples"

    plan = {}
    for act, group in by_activation.items():
        st = stats[act]
        qws = solve(group, [s.weight_nk() for s in group], hessian_from_xtx(st.xtx, st.count))
        plan.update((site.name, PlannedWeight(site, qw)) for site, qw in zip(group, qws))
    return {s.name: plan[s.name] for s in sites}  # graph order
