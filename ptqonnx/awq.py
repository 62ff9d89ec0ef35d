"""AWQ planning (Lin et al. 2023): scale search per scaling group, exact fold, clip search, then RTN or GPTQ.

The search math is `ptqonnx.numerics.awq`; folding and its check are `ptqonnx.folding`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ptqonnx.errors import UserError
from ptqonnx.folding import fold_scales_checked
from ptqonnx.gptq import plan_gptq
from ptqonnx.graph import LinearSite, find_linear_sites
from ptqonnx.plan import PlannedWeight, block_size_for, plan_weights, rtn_solver
from ptqonnx.recipe import CompileConfig
from ptqonnx.scaling import find_scaling_groups

__all__ = ["plan_awq"]

logger = logging.getLogger(__name__)


def plan_awq(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report,
              progress: Callable[[str], None] | None) -> tuple[list[LinearSite], dict[str, PlannedWeight]]:
    """AWQ (`ptqonnx.numerics.awq`): mean |x| and a row sample of every site's activation from one float
    calibration run; a scale search per scaling group, folded exactly (checked in ORT on two calibration
    feeds: max |y' - y| / max |y| <= FOLD_TOLERANCE per output, else RuntimeError); a clip search per site
    on the rescaled sample; then RTN with the clip ratios (`awq`) or GPTQ on the scaled weights clamped to
    their clipped ranges (`awq+gptq`). The LM head's group is not scaled unless `scale_lm_head` (as llm-awq,
    which leaves lm_head alone); it is still clipped. Returns the sites re-scanned after folding and the plan.
    """
    from ptqonnx.numerics.awq import clip_weight, search_clip, search_scales
    from ptqonnx.runtime.collect import collect_statistics

    acfg, w = cfg.awq, cfg.weights
    groups, _ = find_scaling_groups(model, sites)
    if not acfg.scale_lm_head:
        groups = [g for g in groups if not any(s.is_lm_head for s in g.sites)]
    refused = [g.name for g in groups if g.kind == "mul_insert"]
    if acfg.no_insert and refused:
        raise UserError(f"--no-insert: {len(refused)} scaling groups have no producer that can absorb 1/s "
                        f"(their activation has other consumers or is a graph input) and would need an inserted "
                        f"Mul: {refused[:5]}; drop --no-insert or --exclude their MatMuls")
    stats = collect_statistics(model, feeds, {s.activation.name: {"mean_abs", "sample"} for s in sites},
                               sample_rows=acfg.sample_rows)
    report.calibration = f"one-shot, {len(feeds)} samples"
    scales: dict[str, np.ndarray] = {}
    for i, g in enumerate(groups):
        st = stats[g.name]
        res = search_scales(st.sample, [s.weight_nk() for s in g.sites], bits=w.bits,
                            block_size=block_size_for(w, g.K), symmetric=w.symmetric, grid=acfg.grid,
                            mean_abs=st.mean_abs, device=acfg.device)
        scales[g.name] = res.s
        report.awq_alpha[g.name] = res.alpha
        line = (f"AWQ scales {i + 1}/{len(groups)} {g.name} ({len(g.sites)} sites, {g.kind}): alpha={res.alpha:.2f}, "
                f"output error {res.rtn_error:.4g} -> {res.error:.4g} ({res.error / max(res.rtn_error, 1e-30):.1%})")
        logger.info(line)
        if progress is not None:
            progress(line)
    fold = fold_scales_checked(model, groups, scales, feeds[:2], stats=stats, no_insert=acfg.no_insert,
                               what="AWQ scales")
    report.scales_folded, report.scales_inserted = list(fold.folded), list(fold.inserted)
    report.fold_max_rel_err, stats = fold.max_rel_err, fold.stats

    names = {s.name for s in sites}
    sites = [s for s in find_linear_sites(model).sites if s.name in names]  # weights are the scaled copies now
    assert len(sites) == len(names), "folding changed the set of linear sites"
    ratios: dict[str, np.ndarray] = {}
    if acfg.clip:
        for site in sites:
            ratios[site.name] = search_clip(stats[site.activation.name].sample, site.weight_nk(), bits=w.bits,
                                            block_size=block_size_for(w, site.K), symmetric=w.symmetric,
                                            grid=acfg.grid, device=acfg.device)
            logger.debug("AWQ clip %s: mean ratio %.3f", site.name, float(ratios[site.name].mean()))
        clipped = sum(int((r < 1).sum()) for r in ratios.values())
        logger.info("AWQ clip: %d of %d blocks clipped", clipped, sum(r.size for r in ratios.values()))
    if cfg.method == "awq":
        return sites, plan_weights(sites, rtn_solver(w, ratios))

    def weight_of(site: LinearSite) -> np.ndarray:
        r = ratios.get(site.name)
        return site.weight_nk() if r is None else clip_weight(site.weight_nk(), r, bits=w.bits,
                                                              block_size=block_size_for(w, site.K), symmetric=w.symmetric)

    return sites, plan_gptq(model, sites, cfg, feeds, report, progress, weight_of)
