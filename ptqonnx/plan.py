"""A weight plan: the quantized form chosen for each linear site, applied later by a lowering pass.

Solvers (RTN, AWQ's clipped RTN, GPTQ) only decide integer codes and grids; lowering passes
(`LowerToMatMulNBitsPass`, `LowerToQdqPass`) only write them into the graph. The plan is the small,
inspectable artifact between the two.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ptqonnx.graph import LinearSite
from ptqonnx.numerics.quant import QuantizedWeight, quantize_weight, quantize_weight_fp8
from ptqonnx.config import GptqConfig, WeightStage

__all__ = [
    "PlannedWeight", "WeightPlan", "WeightSolver", "rtn_solver", "gptq_stage_solver", "plan_weights",
    "block_size_for", "planned_nodes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedWeight:
    site: LinearSite
    qweight: QuantizedWeight


# node name -> planned weight, in graph order
WeightPlan = Mapping[str, PlannedWeight]
# (site, W [N, K] float32) -> quantized weight
WeightSolver = Callable[[LinearSite, np.ndarray], QuantizedWeight]


def planned_nodes(graph, plan: WeightPlan) -> list:
    """(node, planned weight) for the nodes of `graph` that `plan` rewrites, in graph order; a snapshot, so
    lowering passes may edit the graph while iterating."""
    return [(n, plan[n.name]) for n in list(graph) if n.name in plan and plan[n.name].site.node is n]


def block_size_for(cfg: WeightStage, k: int) -> int:
    """The block length used for a weight with K inputs (`None` group size = one block per row)."""
    return k if cfg.group_size is None else cfg.group_size


def rtn_solver(cfg: WeightStage, clip_ratios: Mapping[str, np.ndarray] | None = None) -> WeightSolver:
    """Round-to-nearest on the configured grid; `clip_ratios` [N, k_blocks] by site name shrink the blocks'
    ranges first (AWQ's clipping, `quantize_weight(clip_ratio=...)`)."""

    def solve(site: LinearSite, w: np.ndarray) -> QuantizedWeight:
        if cfg.fp8:
            return quantize_weight_fp8(w)
        c = cfg.for_site(site.name)
        ratio = 1.0 if clip_ratios is None or c is not cfg else clip_ratios.get(site.name, 1.0)
        return quantize_weight(w, c.bits, block_size_for(c, site.K), c.symmetric, ratio, c.positive_scales)

    return solve


def plan_weights(sites: Iterable[LinearSite], solver: WeightSolver) -> dict[str, PlannedWeight]:
    """Apply `solver` to every site's weight; keyed by node name (names are made unique beforehand)."""
    plan: dict[str, PlannedWeight] = {}
    for site in sites:
        qw = solver(site, site.weight_nk())
        plan[site.name] = PlannedWeight(site, qw)
        logger.debug("planned %s: W [%d, %d] -> %d-bit, block %d", site.name, site.N, site.K, qw.bits, qw.block_size)
    return plan


def gptq_stage_solver(cfg: GptqConfig, losses: dict[str, float] | None = None):
    """GPTQ on the configured grid for the sites of one stage (all reading the same activation, so sharing
    H = 2/n XᵀX): `solve(sites, weights [N_i, K], H)` -> one QuantizedWeight per site. The rows of all the
    weights go through one sweep (GPTQ treats rows independently given H, so this equals one sweep per
    site, with one factorization of H and one column loop instead of several). The grids GPTQ chose while
    sweeping are the ones kept (no re-derivation). Losses are recorded by weight name when `losses` is given.
    Sites on different grids (`high_bits`: 8 bits per channel) are swept apart, one sweep per grid."""

    def solve(sites: Sequence[LinearSite], weights: Sequence[np.ndarray],
              hessian: np.ndarray) -> list[QuantizedWeight]:
        grids = [cfg.for_site(site.name) for site in sites] if cfg.high_bits else [cfg] * len(sites)
        out: dict[int, QuantizedWeight] = {}
        for grid in dict.fromkeys(grids):  # frozen configs: equal grids hash alike
            idx = [i for i, g in enumerate(grids) if g == grid]
            out.update(zip(idx, sweep(grid, [sites[i] for i in idx], [weights[i] for i in idx], hessian)))
        return [out[i] for i in range(len(sites))]

    def sweep(grid: GptqConfig, sites: Sequence[LinearSite], weights: Sequence[np.ndarray],
              hessian: np.ndarray) -> list[QuantizedWeight]:
        from ptqonnx.numerics.gptq import gptq_quantize

        ends = np.cumsum([w.shape[0] for w in weights])
        res = gptq_quantize(
            np.concatenate(weights) if len(weights) > 1 else weights[0], hessian, bits=grid.bits,
            block_size=grid.group_size, symmetric=grid.symmetric, positive=grid.positive_scales, damp=grid.damp,
            act_order=grid.act_order,
            static_groups=grid.act_order, device=grid.device,
        )
        qw, out = res.qweight, []
        for site, a, b in zip(sites, np.concatenate([[0], ends[:-1]]), ends):
            rows = slice(int(a), int(b))
            out.append(dataclasses.replace(qw, q=np.ascontiguousarray(qw.q[rows]),
                                           scale=np.ascontiguousarray(qw.scale[rows]),
                                           zero_point=np.ascontiguousarray(qw.zero_point[rows])))
            if losses is not None:
                losses[site.weight_name] = float(res.row_loss[rows].sum())
        return out

    return solve

