"""Mixed precision under a size budget (`--budget-bits B`, `--max-size-mb N`): which layers get 8 bits per
channel instead of the stage's 3/4-bit grid, so that the average bits per quantized weight (codes, scales and
zero points as written) stays within B — or the file within N MiB — and the measured error drops most.

Each layer's sensitivity is its RTN error on the grid and at 8 bits, measured on the calibration rows the
one-shot statistics already hold (`sample`; the relative output MSE of `ptqonnx.analysis`), or on the weights
alone without data. The choice is a greedy knapsack: layers by error removed per added bit, each taken while
it fits. Pure functions of arrays and numbers; the pipeline feeds them and writes the choice into the recipe
(`high_bits`), so the written recipe compiles the same model again without measuring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptqonnx.config import WeightStage
from ptqonnx.errors import UserError

__all__ = ["LayerCost", "stored_bits", "layer_cost", "choose_high_bits", "bits_for_size"]


@dataclass(frozen=True)
class LayerCost:
    name: str
    weights: int  # N * K
    base_bits: float  # bits per weight on the stage's grid, as stored
    high_bits: float  # bits per weight at 8 bits per channel, as stored
    base_error: float  # relative error on the stage's grid
    high_error: float  # relative error at 8 bits

    @property
    def gain_per_bit(self) -> float:
        extra = self.weights * (self.high_bits - self.base_bits)
        return (self.base_error - self.high_error) / extra if extra > 0 else math.inf


def stored_bits(cfg: WeightStage, k: int, scale_bits: int, fmt: str) -> float:
    """Bits per weight of a K-input layer on `cfg`'s grid as the lowering writes it (checked against the
    written bytes in tests/test_budget.py). MatMulNBits (`passes.matmul_nbits`): each row's codes padded to
    whole blocks, one scale per block, zero points (asymmetric, or 3-bit codes in 4-bit storage) padded to
    whole bytes per row; a single-block weight is written with `per_channel_block(K)`. QDQ (`passes.qdq`):
    K codes per row, one scale per block (and a zero point, asymmetric only)."""
    from ptqonnx.numerics.packing import storage_bits
    from ptqonnx.passes.matmul_nbits import per_channel_block

    code = storage_bits(cfg.bits)
    if fmt == "matmulnbits":
        block = per_channel_block(k) if cfg.group_size is None or cfg.group_size >= k else cfg.group_size
        blocks = math.ceil(k / block)
        zero_points = 8 * math.ceil(blocks * code / 8) if (not cfg.symmetric or code != cfg.bits) else 0
        return (code * blocks * block + blocks * scale_bits + zero_points) / k
    blocks = 1 if cfg.group_size is None else math.ceil(k / cfg.group_size)
    return code + blocks * (scale_bits + (0 if cfg.symmetric else code)) / k


def layer_cost(name: str, w: np.ndarray, x: np.ndarray | None, cfg: WeightStage, scale_bits: int,
               fmt: str) -> LayerCost:
    """The layer's cost and RTN errors on `cfg`'s grid and at 8 bits per channel; `x` [R, K] input rows (None:
    the weight-space error)."""
    from ptqonnx.analysis import relative_output_mses, relative_weight_mse
    from ptqonnx.numerics.quant import fake_quantize

    high = cfg.high_grid()
    n, k = w.shape
    w_hats = [fake_quantize(w, c.bits, c.group_size, c.symmetric, positive=c.positive_scales) for c in (cfg, high)]
    errs = (relative_output_mses(x, w, [(None, wh) for wh in w_hats]) if x is not None
            else [relative_weight_mse(w, wh) for wh in w_hats])
    return LayerCost(name, n * k, stored_bits(cfg, k, scale_bits, fmt), stored_bits(high, k, scale_bits, fmt), *errs)


def choose_high_bits(layers: Sequence[LayerCost], budget: float,
                     flag: str = "--budget-bits") -> tuple[list[str], float, float]:
    """(names to raise to 8 bits, the average bits per weight reached, the average with none raised). Refuses
    a budget below what the grid alone takes."""
    if not layers:
        raise UserError(f"{flag} has no linear layer to spend bits on (only embeddings are quantized); drop it")
    total = sum(c.weights for c in layers)
    spent = sum(c.weights * c.base_bits for c in layers)
    floor = spent / total
    if budget + 1e-9 < floor:
        least = math.ceil(floor * 1000) / 1000
        raise UserError(f"{flag} {budget:g} is below the {least:.3f} bits per weight the grid alone takes "
                        f"(codes with their padding, scales and zero points of {len(layers)} layers); pass at least "
                        f"{least:.3f}, or another group size")
    chosen = []
    for c in sorted(layers, key=lambda c: c.gain_per_bit, reverse=True):
        extra = c.weights * (c.high_bits - c.base_bits)
        if c.base_error > c.high_error and spent + extra <= budget * total:
            chosen.append(c.name)
            spent += extra
    return chosen, spent / total, floor


def bits_for_size(max_bytes: float, fixed_bytes: float, layers: Sequence[LayerCost]) -> float:
    """The average bits per quantized weight that keeps the whole file within `max_bytes` when `fixed_bytes`
    of it are not the quantized layers' codes, scales and zero points (embeddings, norms, float layers, the
    graph itself). Refuses a size the grid alone exceeds, naming the smallest one that fits."""
    if not layers:
        raise UserError("--max-size-mb has no MatMul/Gemm layer to spend bits on (embeddings and Conv layers have fixed "
                        "grids); drop it")
    total = sum(c.weights for c in layers)
    least = fixed_bytes + sum(c.weights * c.base_bits for c in layers) / 8
    if max_bytes < least:
        mib = math.ceil(least / 2**20 * 100) / 100
        raise UserError(f"--max-size-mb {max_bytes / 2**20:g} is below the {mib:.2f} MiB the grid alone writes "
                        f"({fixed_bytes / 2**20:.2f} MiB of it is not quantized weights: embeddings, norms, float "
                        f"layers, the graph); pass at least {mib:.2f}, or a coarser grid (--wbits 3, a larger "
                        "--group-size)")
    return (max_bytes - fixed_bytes) * 8 / total
