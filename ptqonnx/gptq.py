"""GPTQ planning: Hessians block by block on the partly quantized model (or one-shot), then the solver.

The linear algebra is `ptqonnx.numerics.gptq`; the sequential calibration is `ptqonnx.runtime.sequential`
on the blocks `ptqonnx.blocks` finds along the residual stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

from ptqonnx.graph import LinearSite
from ptqonnx.plan import PlannedWeight, gptq_solver, plan_weights
from ptqonnx.recipe import CompileConfig

__all__ = ["plan_gptq"]

logger = logging.getLogger(__name__)


def plan_gptq(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report,
               progress: Callable[[str], None] | None,
               weight_of: Callable[[LinearSite], object] | None = None) -> dict[str, PlannedWeight]:
    """GPTQ plan: block by block on the partly quantized model, or one-shot Hessians when the graph has no
    residual-stream cut (or `sequential` is off). `weight_of(site)` is the W [N, K] GPTQ starts from
    (default: the graph's weight; AWQ passes the clipped one)."""
    from ptqonnx.blocks import find_blocks
    from ptqonnx.numerics.gptq import hessian_from_xtx
    from ptqonnx.numerics.quant import dequantize_weight

    weight_of = weight_of or LinearSite.weight_nk
    blocks = find_blocks(model, sites) if cfg.gptq.sequential else []
    if len(blocks) >= 2:
        from ptqonnx.runtime.sequential import run_sequential

        plan: dict[str, PlannedWeight] = {}
        hessians: dict[str, object] = {}
        solve = gptq_solver(cfg.weights, cfg.gptq, lambda site: hessians[site.activation.name], report.losses)

        def solve_stage(block, stage, stats):
            hessians[stage.activation] = hessian_from_xtx(stats.xtx, stats.count)
            updates = {}
            for site in stage.sites:
                qw = solve(site, weight_of(site))
                plan[site.name] = PlannedWeight(site, qw)
                updates[site.name] = dequantize_weight(qw)
            del hessians[stage.activation]
            return updates

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

    stats = collect_statistics(model, feeds, {s.activation.name: {"xtx"} for s in sites})
    report.calibration = f"one-shot, {len(feeds)} samples"

    def hessian_of(site):
        st = stats[site.activation.name]
        return hessian_from_xtx(st.xtx, st.count)

    solve = gptq_solver(cfg.weights, cfg.gptq, hessian_of, report.losses)
    return plan_weights(sites, lambda site, _: solve(site, weight_of(site)))
