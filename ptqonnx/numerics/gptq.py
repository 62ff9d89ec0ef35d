"""GPTQ: second-order weight rounding with error feedback (Frantar et al. 2022, arXiv:2210.17323).

Problem. For a linear layer y = x Wᵀ with W [N, K] and calibration inputs X [n, K], find codes on the
blockwise grid of `quant.py` that minimise the output error, row by row (rows are independent):

    min_Ŵ ‖X Wᵀ − X Ŵᵀ‖²_F / n  =  Σ_rows ½ δw H δwᵀ,   H = 2/n · XᵀX  [K, K],  δw = ŵ − w.

OBS step (Optimal Brain Surgeon, Hassibi & Stork; GPTQ eq. 2-3). Let F be the columns not quantized yet
and H_F⁻¹ the inverse of H restricted to F. Rounding column q of every row to q(w_q) and letting the
other columns of F move to their best value changes the error by, and is compensated by,

    ΔE_q = ½ (w_q − q(w_q))² / [H_F⁻¹]_qq,        δ_F = −(w_q − q(w_q)) / [H_F⁻¹]_qq · [H_F⁻¹]_{q,F}.

GPTQ (Algorithm 1) quantizes the columns in one fixed order for all rows, which makes H_F⁻¹ the same for
every row, and removes each quantized column from H⁻¹ by Gaussian elimination. Those eliminations are
exactly the rows of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row q of U is [H_F⁻¹]_{q,F} / d_q
with d_q = U_qq = sqrt([H_F⁻¹]_qq). With err_q = (w_q − q(w_q)) / d_q the step becomes

    W[:, F] −= err_q · U[q, F]          ΔE_q = ½ Σ_rows err_q²,

and the accumulated `loss` = ½ Σ_q Σ_rows err_q² (the reference's reported "error") equals
½ Σ_rows δw H δwᵀ for the damped H exactly, in exact arithmetic (a telescoping LDLᵀ identity).

Lazy batches (Algorithm 1, "lazy batch updates"): the column loop updates only the columns of the
current batch of `lazy_batch` columns; the rest W[:, i2:] receive the batch's errors in one GEMM
`W[:, i2:] −= Err1 · U[i1:i2, i2:]`, which is the same arithmetic reordered. By default the batch is the
paper's 128 columns, shrunk for very tall weights (an LM head's 49k rows) so that the in-batch updates,
which stream B x N floats per column, stay cache-sized: 2.2x faster there, same result up to float rounding.

Details following the reference implementation (`gptq.py::fasterquant`):

* dead inputs (diag H = 0, an input that is always zero): H_ii = 1 and W[:, i] = 0;
* dampening: λ = damp · mean(diag H) added to the diagonal; if a Cholesky factorisation fails the
  damping is multiplied by 10 and retried (logged); H is factored in float64 (λ bounds cond(H + λI) by
  ~K/damp, ~1.5e5 for K = 1536, too close to float32's 1/eps for comfort), the sweep runs in float32;
* groups: the grid of a group of `block_size` columns is chosen (with our `choose_qparams`, i.e. the
  ONNX Runtime MLAS convention) from the current, error-updated weights when the sweep reaches the
  group's first column (including the pending updates of the lazy batch when a group straddles two
  batches); per-channel (block_size None) uses one grid per row from the initial weights (dead
  columns already zeroed, so they do not widen the range);
* act_order: columns are visited by descending diag H. With `static_groups` all group grids are chosen up
  front on the original contiguous groups and every column uses its own group's grid, so the output keeps
  plain contiguous groups (MatMulNBits has no g_idx). `static_groups` without act_order also chooses grids
  up front (the reference's semantics); act_order with dynamic groups would need g_idx and is refused.

Codes are `quantize_with_qparams`'s (round half away from zero, as RTN; fused into the sweep) and the returned
`QuantizedWeight` holds exactly the grids used during the sweep, so `dequantize_weight(qweight)` equals the
swept Ŵ bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ptqonnx.numerics.quant import (
    QuantizedWeight,
    check_bits,
    choose_qparams,
    num_blocks,
)

__all__ = ["GptqResult", "gptq_quantize", "hessian_from_xtx"]

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 5
_BATCH_FLOATS = 1 << 21  # default lazy batch: at most 128 columns of N floats within about this many


@dataclass(frozen=True)
class GptqResult:
    """GPTQ output for one weight W [N, K], in the original column order."""

    qweight: QuantizedWeight  # codes and contiguous-group grids; dequantizes exactly to w_hat
    w_hat: np.ndarray  # float32 [N, K], the fake-quantized weights of the sweep
    loss: float  # ½ Σ err²/d² over columns and rows (the reference's "error")
    row_loss: np.ndarray  # float64 [N]: the same sum per row (rows are independent: Σ row_loss = loss)
    damp: float  # relative dampening finally used (> the requested one if Cholesky needed retries)


def hessian_from_xtx(xtx: np.ndarray, n_rows: int) -> np.ndarray:
    """H = 2/n · XᵀX as float64 [K, K], from the accumulated XᵀX over n_rows input rows."""
    xtx = np.asarray(xtx)
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"XᵀX must be square [K, K], got shape {xtx.shape}")
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    return xtx.astype(np.float64) * (2.0 / n_rows)


def _upper_cholesky_of_inverse(h_rev, damp: float) -> tuple[np.ndarray, float]:
    """U float32 [K, K] upper with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H); damp ×10 on failure.

    Takes h_rev = J H J (torch float64, J the order reversal) and factors in float64. One Cholesky and one
    triangular inverse instead of the reference's Cholesky, inverse and second Cholesky: with
    J(H + λI)J = L Lᵀ, U = J L⁻¹ J is upper triangular with positive diagonal and UᵀU = J L⁻ᵀ L⁻¹ J =
    (H + λI)⁻¹, i.e. the same (unique) factor.
    """
    import torch

    k = h_rev.shape[0]
    mean_diag = float(torch.diagonal(h_rev).mean())
    for attempt in range(_DAMP_RETRIES):
        h_damped = h_rev.clone()
        h_damped.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h_damped)
        if int(info) == 0:
            eye = torch.eye(k, dtype=chol.dtype, device=chol.device)
            l_inv = torch.linalg.solve_triangular(chol, eye, upper=False).cpu().numpy()
            u = np.ascontiguousarray(l_inv[::-1, ::-1], dtype=np.float32)
            if np.isfinite(u).all():
                return u, damp
        if attempt + 1 < _DAMP_RETRIES:
            logger.warning("GPTQ: Hessian not positive definite with damp=%g; retrying with %g",
                           damp, damp * 10)
            damp *= 10
    raise ValueError(f"GPTQ: Hessian is not positive definite even with damp={damp:g}")


def _grid_rows(scale: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grids [N, k_blocks] as contiguous rows [k_blocks, N] float32: scale, zero point and the 1/s that
    `quantize_with_qparams` multiplies by (0 where s = 0)."""
    s = np.ascontiguousarray(scale.T, dtype=np.float32)
    inv = np.where(s != 0, np.float32(1.0) / np.where(s != 0, s, 1), 0).astype(np.float32)
    return s, np.ascontiguousarray(zero_point.T, dtype=np.float32), inv


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    positive: bool = False,
    damp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    lazy_batch: int | None = None,
    device: str = "cpu",
) -> GptqResult:
    """Quantize W [N, K] with GPTQ given H = 2/n·XᵀX [K, K] (float64) of the layer's inputs.

    `block_size=None` quantizes per output channel; `damp` is relative to mean(diag H); `lazy_batch`
    columns (default 128, fewer for N > 16384) are updated column by column before one GEMM updates the
    rest. The result is in the
    original column order with plain contiguous groups. `device` is where H is factored (torch); the
    column sweep runs on the host (numpy, one torch GEMM per lazy batch). Raises ValueError on bad
    arguments, on act_order with dynamic groups, and when H + λI stays indefinite after the retries.
    """
    import torch

    w = np.asarray(w)
    hessian = np.asarray(hessian)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {w.shape}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for weight {w.shape}, got {hessian.shape}")
    check_bits(bits)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive or None, got {block_size}")
    if lazy_batch is None:  # 128, or fewer columns when B x N would pass ~2M floats (tall weights)
        lazy_batch = int(min(128, max(16, 2 ** int(np.log2(max(_BATCH_FLOATS // max(w.shape[0], 1), 1))))))
    if damp < 0 or lazy_batch < 1:
        raise ValueError(f"need damp >= 0 and lazy_batch >= 1, got damp={damp}, lazy_batch={lazy_batch}")
    if not (np.isfinite(w).all() and np.isfinite(hessian).all()):
        raise ValueError("weight and hessian must be finite")
    bs = k if block_size is None else int(block_size)
    grouped = bs < k
    if act_order and grouped and not static_groups:
        raise ValueError(
            "act_order with dynamic groups (static_groups=False) needs a g_idx column->group map, which "
            "MatMulNBits does not have; use static_groups=True, act_order=False or per-channel"
        )
    dev = torch.device(device)
    kb = num_blocks(k, bs)

    h = torch.tensor(hessian, dtype=torch.float64, device=dev)  # a copy: the caller's H is untouched
    w32 = np.array(w, dtype=np.float32)  # [N, K] copy
    dead = np.diagonal(hessian) == 0
    if dead.any():
        idx = torch.from_numpy(np.flatnonzero(dead)).to(dev)
        h[idx, idx] = 1.0
        w32[:, dead] = 0.0
        logger.debug("GPTQ: %d dead input columns zeroed", int(dead.sum()))

    # grids [N, k_blocks]: up front (per channel, static groups) or when the sweep reaches a group
    scale = np.zeros((n, kb), dtype=np.float32)
    zero_point = np.zeros((n, kb), dtype=np.uint8)
    dynamic = grouped and not static_groups
    if not dynamic:
        for g in range(kb):
            scale[:, g], zero_point[:, g] = choose_qparams(w32[:, g * bs : (g + 1) * bs], bits, symmetric,
                                                            positive=positive)

    perm = np.argsort(-np.diagonal(h.cpu().numpy()), kind="stable") if act_order else np.arange(k)
    group_of = perm // bs  # group of the column visited at step j
    rev = torch.from_numpy(np.ascontiguousarray(perm[::-1])).to(dev)
    hinv, damp_used = _upper_cholesky_of_inverse(h[rev][:, rev], damp)  # [K, K] upper, permuted order
    del h
    if dead.any():  # no coupling into or out of a dead column (exact zeros, not rounding noise)
        dp = dead[perm]
        diag = np.diagonal(hinv).copy()
        hinv[dp, :] = 0.0
        hinv[:, dp] = 0.0
        hinv[dp, dp] = diag[dp]

    # The sweep works on Wᵀ [K, N] so that a column of W is a contiguous row. Per-column work is numpy:
    # torch's intra-op threads on ~70k-element ops cost a barrier per column and stall under CPU
    # contention (measured 0.5 ms per rank-1 update with a busy core vs 15 us in numpy).
    wt = np.ascontiguousarray(w32[:, perm].T)  # [K, N] permuted, updated in place
    q_codes = np.empty((k, n), dtype=np.uint8)  # permuted order, transposed
    w_hat = np.empty((k, n), dtype=np.float32)  # permuted order, transposed
    # grids transposed [k_blocks, N] (a group's grid is a contiguous row), with 1/s as quantize_with_qparams
    scale_t, zp_t, inv_t = _grid_rows(scale, zero_point)
    qmax = float((1 << bits) - 1)
    row_loss = np.zeros(n, dtype=np.float64)
    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        w1 = wt[i1:i2]  # [B, N] view
        err1 = np.zeros((i2 - i1, n), dtype=np.float32)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = int(group_of[j])
            if dynamic and j % bs == 0:  # first column of group g: grid from the current weights
                end = min(j + bs, k)
                cur = w1[i : end - i1]
                if end > i2:  # the group runs past this lazy batch: add the batch's pending updates
                    cur = np.concatenate([cur, wt[i2:end] - hinv[i1:j, i2:end].T @ err1[:i]])
                scale[:, g], zero_point[:, g] = choose_qparams(cur.T, bits, symmetric, positive=positive)
                grid = _grid_rows(scale[:, g : g + 1], zero_point[:, g : g + 1])
                scale_t[g], zp_t[g], inv_t[g] = (a[0] for a in grid)
            col = w1[i]  # [N]
            # codes as quantize_with_qparams (MLAS: roundf(w * (1/s) + z), clamped) in float32, fused: for
            # t >= 0 roundf(t) = floor(t + 0.5) bit for bit, and t < 0 clamps to 0 either way
            t = col * inv_t[g]
            t += zp_t[g]
            t += np.float32(0.5)
            np.floor(t, out=t)
            np.clip(t, 0.0, qmax, out=t)
            q_codes[j] = t
            deq = (t - zp_t[g]) * scale_t[g]  # as dequantize_weight
            w_hat[j] = deq
            e = (col - deq) / hinv1[i, i]  # [N]
            w1[i:] -= hinv1[i, i:, None] * e  # OBS update of the batch's remaining columns
            err1[i] = e
        row_loss += 0.5 * np.sum(np.square(err1, dtype=np.float64), axis=0)
        if i2 < k:  # lazy update of all later columns: W[:, i2:] -= Err1 · U[i1:i2, i2:]
            rest, u12 = torch.from_numpy(wt[i2:]), torch.from_numpy(hinv[i1:i2, i2:])
            rest.addmm_(u12.T, torch.from_numpy(err1), alpha=-1.0)  # in place on wt

    inv = np.argsort(perm)
    loss = float(row_loss.sum())
    logger.debug("GPTQ: W [%d, %d], %d-bit, block_size=%s, act_order=%s, loss=%.6g", n, k, bits, block_size,
                 act_order, loss)
    qweight = QuantizedWeight(
        q=np.ascontiguousarray(q_codes[inv].T), scale=scale, zero_point=zero_point, bits=bits,
        block_size=bs, symmetric=symmetric,
    )
    return GptqResult(qweight=qweight, w_hat=np.ascontiguousarray(w_hat[inv].T), loss=loss, row_loss=row_loss,
                      damp=damp_used)
