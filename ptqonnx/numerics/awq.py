"""AWQ: activation-aware weight scaling and clipping (Lin et al. 2024, arXiv:2306.00978).

Problem. Linear layers y_i = x W_iᵀ (W_i [N_i, K]) read one activation x [n, K]. For any s [K] > 0,

    x W_iᵀ = (x diag(s)⁻¹) (W_i diag(s))ᵀ

exactly in float (the 1/s is folded into x's producer, see `passes/fold_scales.py`), but not after
quantizing: the paper's eq. 2-3 show that scaling a salient input channel up (s > 1) shrinks its relative
rounding error by ~1/s while barely changing the block's step Δ. AWQ searches (eq. 4)

    s* = argmin_s  L(s),   L(s) = Σ_i ‖ x W_iᵀ − (x diag(s)⁻¹) Q(W_i diag(s))ᵀ ‖²_F

over the one-parameter family of eq. 5, s = s_x^α with s_x[k] = mean_r |x[r, k]| (the per-channel mean
magnitude over all calibration rows) and α on a grid. As the reference (llm-awq `auto_scale.py`):
α ∈ {0, 1/grid, …, (grid−1)/grid}; s = max(s_x^α, 1e-4); s /= sqrt(max(s)·min(s)) (centres s around 1 in
log scale, so the fold does not move the producer's range much). α = 0 gives s = 1 exactly, so
L(s*) ≤ L(1) = the RTN error: AWQ is never worse than RTN on the search data. Q is our blockwise grid
(`quant.py`, MLAS convention; its torch backend `quant.torch_fake_quantize` equals `quant.fake_quantize` bit for bit), and W·s rounds to
float32 exactly as `FoldScalesPass` writes it, so the planned weights are the ones the search scored.

Error evaluation. With ΔW_i = Q(W_i s)/s − W_i [N_i, K] (the effective weight error in x's units),
L(s) = Σ_i ‖x ΔW_iᵀ‖² = Σ_i tr(ΔW_i G ΔW_iᵀ), G = xᵀx [K, K]. The searches take G, not x: it is
accumulated over *all* calibration rows in O(K²) memory (streamed block by block, `ptqonnx.awq`), costs
N·K² per α instead of n·N·K, and runs over chunks of output rows (Q is row-local), so memory stays
O(chunk · K). Any positive multiple of G gives the same argmin.

Clipping (llm-awq `auto_clip.py`). Per output row n and block g, shrink the block's range by a ratio
r ∈ {1, 1 − 1/grid, …} down to 1 − max_shrink (exclusive, as the reference) and keep the r minimising the
block's own contribution to the output error,

    e[n, g](r) = ‖x_g (w[n, g] − Q_r(w[n, g]))ᵀ‖² = d G_gg dᵀ,   d = Q_r(w[n, g]) − w[n, g],

with G_gg the g-th diagonal block of G (the reference's `(input_feat * w).sum(-1)` per group, summed
instead of averaged over rows). r = 1 is tried first and only a strictly smaller error replaces it, so
clipping never increases any block's error on the search data. The ratio is applied the way
`quantize_weight(clip_ratio=r)` does (the grid of r·range, values beyond it saturate at the grid ends),
which for the symmetric grid equals the reference's clamp(w, ±r·max|w|) followed by quantization;
`clip_weight` performs that clamp for solvers that choose their own grids (GPTQ after AWQ).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptqonnx.numerics.quant import check_bits, grid_ends, num_blocks, torch_fake_quantize

__all__ = ["AwqScale", "awq_scale", "clip_grid", "search_scales", "search_clip", "clip_weight"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22  # elements of the largest temporary per chunk of output rows (16 MiB in float32)


@dataclass(frozen=True)
class AwqScale:
    """Result of the scale search for one group."""

    s: np.ndarray  # float32 [K]: weights' input channels × s, the activation ÷ s (all ones when alpha = 0)
    alpha: float
    alphas: np.ndarray  # float64 [grid]
    errors: np.ndarray  # float64 [grid]: L(s_x^alpha); errors[0] (alpha = 0) is RTN's error

    @property
    def rtn_error(self) -> float:
        return float(self.errors[0])

    @property
    def error(self) -> float:
        return float(self.errors[int(np.argmin(self.errors))])


def _check(bits: int, grid: int) -> None:
    check_bits(bits)
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")


def awq_scale(mean_abs, alpha: float):
    """s = max(mean_abs^alpha, 1e-4) / sqrt(max · min) (llm-awq's normalisation); torch float32 [K] in and out."""
    s = mean_abs.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _gram(gram, k: int | None = None) -> np.ndarray:
    g = np.asarray(gram)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0 or (k is not None and g.shape[0] != k):
        raise ValueError(f"gram must be a square XᵀX [K, K]{'' if k is None else f' with K={k}'}, got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("gram must be finite")
    return g


def search_scales(
    gram: np.ndarray,
    weights: Sequence[np.ndarray],
    *,
    mean_abs: np.ndarray,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    grid: int = 20,
    device: str = "cpu",
) -> AwqScale:
    """AWQ's per-input-channel scale for the layers W_i [N_i, K] reading x, from G = xᵀx [K, K] and
    s_x = `mean_abs` [K] (mean |x| per channel over the calibration rows); `block_size=None` = per channel.
    Returns the s of the α ∈ {0, 1/grid, …} with the least summed output error (ties: the smaller α).
    """
    import torch

    _check(bits, grid)
    g = _gram(gram)
    k = g.shape[0]
    if not weights or any(np.ndim(w) != 2 or np.shape(w)[1] != k for w in weights):
        raise ValueError(f"weights must be a non-empty list of [N_i, K={k}] arrays, got "
                         f"{[np.shape(w) for w in weights]}")
    bs = k if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size must be positive or None, got {block_size}")
    xm = np.asarray(mean_abs, np.float64)
    if xm.shape != (k,) or not np.all(np.isfinite(xm)) or np.any(xm < 0):
        raise ValueError(f"mean_abs must be finite, >= 0 and of shape ({k},), got shape {xm.shape}")
    dev = torch.device(device)
    xm_t = torch.tensor(xm, dtype=torch.float32, device=dev)
    gram_t = torch.tensor(g, dtype=torch.float32, device=dev)  # [K, K]
    ws = [torch.tensor(np.asarray(w), dtype=torch.float32, device=dev) for w in weights]
    rows = max(1, _CHUNK_ELEMENTS // k)

    alphas = np.arange(grid, dtype=np.float64) / grid
    errors = np.zeros(grid, dtype=np.float64)
    best = None
    for a, alpha in enumerate(alphas):
        s = awq_scale(xm_t, float(alpha))  # [K]
        err = 0.0
        for w in ws:
            for r0 in range(0, w.shape[0], rows):
                wc = w[r0 : r0 + rows]
                dw = torch_fake_quantize(wc * s, bits, bs, symmetric) / s - wc  # [Nc, K]
                err += float(((dw @ gram_t) * dw).sum(dtype=torch.float64))
        errors[a] = err
        if best is None or err < errors[best[0]]:
            best = (a, s)
    a_best, s_best = best
    return AwqScale(s=s_best.cpu().numpy().astype(np.float32), alpha=float(alphas[a_best]), alphas=alphas,
                    errors=errors)


def clip_grid(grid: int, max_shrink: float) -> np.ndarray:
    """Clip ratios tried, largest first: 1 − i/grid for i < max_shrink·grid (at least 1.0 itself)."""
    if grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 1, got grid={grid}, max_shrink={max_shrink}")
    steps = max(1, int(max_shrink * grid + 1e-9))
    return 1.0 - np.arange(steps, dtype=np.float64) / grid


def search_clip(
    gram: np.ndarray,
    w: np.ndarray,
    *,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    device: str = "cpu",
) -> np.ndarray:
    """Per-block clip ratios float32 [N, k_blocks] for W [N, K] read by x, from G = xᵀx [K, K] (only its
    diagonal blocks are used); usable as `quantize_weight(..., clip_ratio=ratios)`."""
    import torch

    _check(bits, grid)
    ratios = clip_grid(grid, max_shrink)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {w.shape}")
    nw, k = w.shape
    g = _gram(gram, k)
    bs = k if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size must be positive or None, got {block_size}")
    kb = num_blocks(k, bs)
    pad = kb * bs - k
    dev = torch.device(device)
    gp = torch.nn.functional.pad(torch.tensor(g, dtype=torch.float32, device=dev), (0, pad, 0, pad))
    diag = torch.diagonal(gp.view(kb, bs, kb, bs), dim1=0, dim2=2)  # [B, B, kb]
    blocks = diag.permute(2, 0, 1).contiguous()  # [kb, B, B]: the diagonal blocks of G
    wt = torch.from_numpy(w).to(dev)
    best_ratio = np.ones((nw, kb), dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // (k + kb * bs))
    for r0 in range(0, nw, rows):
        wc = wt[r0 : r0 + rows]
        best_err = torch.full((wc.shape[0], kb), float("inf"), dtype=torch.float64, device=dev)
        best = torch.ones((wc.shape[0], kb), dtype=torch.float32, device=dev)
        for r in ratios:
            d = torch.nn.functional.pad(torch_fake_quantize(wc, bits, bs, symmetric, float(r)) - wc, (0, pad))
            d = d.view(-1, kb, bs)  # [Nc, kb, B]
            err = (torch.einsum("ngb,gbc->ngc", d, blocks) * d).sum(-1, dtype=torch.float64)  # [Nc, kb]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, float(r)), best)
        best_ratio[r0 : r0 + rows] = best.cpu().numpy()
    return best_ratio


def clip_weight(w: np.ndarray, ratios: np.ndarray, *, bits: int, block_size: int | None, symmetric: bool) -> np.ndarray:
    """W [N, K] clamped per block to the range of its clipped grid (llm-awq `apply_clip`), float32 [N, K].

    The range is the one `quantize_weight(clip_ratio=r)` gives the block (`quant.grid_ends`), so that choosing a
    grid from the clamped block gives that grid again and the codes agree. (llm-awq clamps to ±r·max|w|; on
    our signed symmetric grid that would make both ends tie and could flip the grid's sign.)
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    bs = k if block_size is None else int(block_size)
    kb = num_blocks(k, bs)
    ratios = np.broadcast_to(np.asarray(ratios, dtype=np.float32), (n, kb))
    idx = np.arange(k) // bs
    wb = np.pad(w, ((0, 0), (0, kb * bs - k))).reshape(n, kb, bs)
    lo, hi = grid_ends(wb, bits, symmetric, ratios)
    return np.clip(w, lo[:, idx], hi[:, idx]).astype(np.float32)
