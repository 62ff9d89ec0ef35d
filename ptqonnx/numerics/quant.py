"""Blockwise integer weight quantization: choose_qparams / quantize / dequantize.

A linear layer's weight is handled as W [N, K] (output channels x input features, torch's layout),
quantized in blocks of `block_size` consecutive input features (the K axis), the layout of ONNX
Runtime's MatMulNBits and of GPTQ/AWQ. A block b of row n stores unsigned codes q in [0, 2^bits - 1],
one scale s[n, b] and one zero point z[n, b]:

    W_hat[n, k] = (q[n, k] - z[n, k // block_size]) * s[n, k // block_size]

Grids (the conventions of ONNX Runtime's MLAS blockwise quantizer, `range2scale*` in q4_dq.cpp, so that
our RTN equals ORT's RTN):

* symmetric:  z = 2^(bits-1) (8 for INT4, implicit in MatMulNBits); s = m / -2^(bits-1), where m is the
  block's value of largest magnitude *with its sign*. The extreme lands exactly on the grid end -2^(b-1)
  (q = 0) and the full [-8, 7] range is used, instead of the absmax/7 grid that wastes code -8.
* asymmetric: lo = min(min(w), 0), hi = max(max(w), 0), s = (hi - lo) / (2^bits - 1),
  z = clip(round(-lo / s), 0, 2^bits - 1).
* symmetric, `positive=True` (TensorRT: "scale coefficients must all be positive"): z = 2^(bits-1) as above,
  s = max(-min(w) / 2^(bits-1), max(w) / (2^(bits-1) - 1)) >= 0, the smallest positive scale whose grid
  [-2^(bits-1)·s, (2^(bits-1) - 1)·s] holds the block. Where the signed extreme is negative this is the same
  range as ONNX Runtime's; where it is positive, ORT's grid puts it on code -2^(bits-1) with a negative
  scale, this one on code 2^(bits-1) - 1 (one level of 2^bits fewer on that side).

q = clip(round(w * (1/s) + z), 0, 2^bits - 1), with round half away from zero (C `roundf`) applied after
adding z, exactly as MLAS does: a tie w/s = -4.5 gives code round(3.5) = 4, not 3 (this matters on weights
that already lie on a grid, like SmolLM2's GGUF-derived ones). Blocks of all
zeros get s = 0 and dequantize to 0. When K is not a multiple of block_size the last block is shorter;
its parameters come from its real elements only.

`clip_ratio` < 1 shrinks the block's range before choosing the grid (AWQ's clipping search).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "check_bits",
    "grid_ends",
    "torch_fake_quantize",
    "round_half_away",
    "num_blocks",
    "choose_qparams",
    "quantize_with_qparams",
    "quantize_weight",
    "dequantize_weight",
    "FP8_E4M3_MAX",
    "quantize_fp8",
    "quantize_weight_fp8",
    "fake_quantize",
]

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and grid of one weight W [N, K]; `block_size == K` means per output channel."""

    q: np.ndarray  # uint8 [N, K], codes in [0, 2^bits - 1]
    scale: np.ndarray  # float32 [N, k_blocks]
    zero_point: np.ndarray  # uint8 [N, k_blocks]
    bits: int
    block_size: int
    symmetric: bool
    fp8: bool = False  # q holds FLOAT8 E4M3FN values (ml_dtypes.float8_e4m3fn), zero point 0, one block per row

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # (N, K)

    @property
    def k_blocks(self) -> int:
        return self.scale.shape[1]


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (C `roundf`), not numpy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def num_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] -> zero-padded blocks [N, k_blocks, block_size] and a validity mask of the same shape."""
    n, k = w.shape
    kb = num_blocks(k, block_size)
    pad = kb * block_size - k
    wb = np.pad(w, ((0, 0), (0, pad))).reshape(n, kb, block_size)
    mask = np.pad(np.ones((1, k), dtype=bool), ((0, 0), (0, pad))).reshape(1, kb, block_size)
    return wb, mask


def check_bits(bits: int) -> None:
    """The bit widths the grids support (the product offers 3, 4 and 8: `ptqonnx.config.WEIGHT_BITS`)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _signed_extreme(blocks: np.ndarray) -> np.ndarray:
    """Per block (last axis), the value of largest magnitude with its sign (the larger end on a tie: hi)."""
    hi, lo = blocks.max(axis=-1), blocks.min(axis=-1)
    return np.where(np.abs(hi) > np.abs(lo), hi, lo)


def _asym_range(blocks: np.ndarray, ratio) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(blocks.min(axis=-1) * ratio, 0.0).astype(np.float32)
    hi = np.maximum(blocks.max(axis=-1) * ratio, 0.0).astype(np.float32)
    return lo, hi


def choose_qparams(
    blocks: np.ndarray, bits: int, symmetric: bool, clip_ratio: float | np.ndarray = 1.0, positive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per block for blocks [..., B] (reduced over the last axis).

    Zero padding inside a block never changes the result: both grids include 0 in their range.
    Returns (scale float32 [...], zero_point uint8 [...]).
    """
    blocks = np.asarray(blocks, dtype=np.float32)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    ratio = np.asarray(clip_ratio, dtype=np.float32)
    if symmetric and positive:
        lo, hi = _asym_range(blocks, ratio)
        scale = np.maximum(-lo / np.float32(mid), hi / np.float32(mid - 1)).astype(np.float32)
        return scale, np.full(scale.shape, mid, dtype=np.uint8)
    if symmetric:
        extreme = _signed_extreme(blocks) * ratio
        scale = (extreme / np.float32(-mid)).astype(np.float32)
        zero_point = np.full(scale.shape, mid, dtype=np.uint8)
        return scale, zero_point
    lo, hi = _asym_range(blocks, ratio)
    scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scale != 0, -lo / np.where(scale != 0, scale, 1), 0.0)
    zero_point = np.clip(round_half_away(zp), 0, qmax).astype(np.uint8)
    return scale, zero_point


def grid_ends(blocks: np.ndarray, bits: int, symmetric: bool,
              clip_ratio: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per block: the values the grid `choose_qparams(blocks, bits, symmetric, clip_ratio)` reaches at
    its two ends. Asymmetric: [r·min(min w, 0), r·max(max w, 0)]. Symmetric, with e = r·m (m the block's signed
    extreme): the grid runs from e (code 0) to (qmax - mid)·scale = −(mid − 1)/mid · e (−7e/8 for 4 bits)."""
    blocks = np.asarray(blocks, dtype=np.float32)
    ratio = np.asarray(clip_ratio, dtype=np.float32)
    if symmetric:
        mid = 1 << (bits - 1)
        e = _signed_extreme(blocks) * ratio
        far = e * np.float32(-(mid - 1) / mid)
        return np.minimum(e, far), np.maximum(e, far)
    return _asym_range(blocks, ratio)


def quantize_with_qparams(
    blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int
) -> np.ndarray:
    """Codes for blocks [..., B] on the grid (scale, zero_point) [...]: uint8 [..., B]."""
    qmax = (1 << bits) - 1
    s = scale[..., None].astype(np.float32)
    inv = np.where(s != 0, np.float32(1.0) / np.where(s != 0, s, 1), 0).astype(np.float32)
    # the zero point is added before rounding (MLAS: roundf(w * (1/s) + z)), so ties round up, as ORT's do
    q = round_half_away(blocks.astype(np.float32) * inv + zero_point[..., None].astype(np.float32))
    return np.clip(q, 0, qmax).astype(np.uint8)


def _check(bits: int, block_size: int) -> None:
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")


def quantize_weight(
    w: np.ndarray,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    clip_ratio: float | np.ndarray = 1.0,
    positive: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K]; `block_size=None` quantizes per output channel; `positive`:
    the symmetric grid with positive scales (module docstring)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {w.shape}")
    n, k = w.shape
    bs = k if block_size is None else int(block_size)
    _check(bits, bs)
    wb, mask = _blocks(w, bs)
    scale, zero_point = choose_qparams(wb, bits, symmetric, clip_ratio, positive)
    q = quantize_with_qparams(wb, scale, zero_point, bits)
    # padded positions hold the zero point (they dequantize to 0)
    q = np.where(mask, q, zero_point[..., None]).reshape(n, -1)[:, :k]
    return QuantizedWeight(
        q=np.ascontiguousarray(q), scale=scale, zero_point=zero_point, bits=bits,
        block_size=bs, symmetric=symmetric,
    )


FP8_E4M3_MAX = 448.0  # largest finite FLOAT8 E4M3FN value


def quantize_fp8(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """ONNX QuantizeLinear to FLOAT8E4M3FN with saturate=1: x / scale in float32, saturated to ±448, rounded to
    nearest even; ml_dtypes.float8_e4m3fn values."""
    import ml_dtypes

    y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(y, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_weight_fp8(w: np.ndarray) -> QuantizedWeight:
    """FP8 E4M3 per output channel: s = max|w_row| / 448 (1 for an all-zero row), codes e4m3(w / s)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {w.shape}")
    n, k = w.shape
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(FP8_E4M3_MAX), 1.0).astype(np.float32)
    return QuantizedWeight(q=np.ascontiguousarray(quantize_fp8(w, scale)), scale=scale,
                           zero_point=np.zeros((n, 1), np.uint8), bits=8, block_size=k, symmetric=True, fp8=True)


def dequantize_weight(qw: QuantizedWeight) -> np.ndarray:
    """W_hat [N, K] float32 = (q - z) * s, blockwise."""
    n, k = qw.q.shape
    idx = np.arange(k) // qw.block_size
    s = qw.scale[:, idx]
    z = qw.zero_point[:, idx].astype(np.float32)
    return ((qw.q.astype(np.float32) - z) * s).astype(np.float32)


def fake_quantize(
    w: np.ndarray, bits: int, block_size: int | None, symmetric: bool, clip_ratio: float | np.ndarray = 1.0,
    positive: bool = False,
) -> np.ndarray:
    """quantize then dequantize W [N, K]."""
    return dequantize_weight(quantize_weight(w, bits, block_size, symmetric, clip_ratio, positive))


# -- torch backend (AWQ's searches score thousands of candidate grids; same float32 operations, same results) --


def _torch_round_half_away(t):
    import torch

    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def torch_fake_quantize(w, bits: int, block_size: int, symmetric: bool, clip_ratio=None):
    """torch twin of `fake_quantize` (same float32 operations, same results bit for bit).

    w: float32 tensor [N, K]; clip_ratio: None, a float or a tensor broadcasting to [N, k_blocks].
    """
    import torch

    n, k = w.shape
    kb = num_blocks(k, block_size)
    wb = torch.nn.functional.pad(w, (0, kb * block_size - k)).view(n, kb, block_size)
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    hi, lo = wb.amax(dim=-1), wb.amin(dim=-1)  # [N, kb]
    if symmetric:
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
        if clip_ratio is not None:
            extreme = extreme * clip_ratio
        scale = extreme / -mid
        zp = torch.full_like(scale, float(mid))
    else:
        if clip_ratio is not None:
            lo, hi = lo * clip_ratio, hi * clip_ratio
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / qmax
        nz = scale != 0
        zp = torch.where(nz, -lo / torch.where(nz, scale, torch.ones_like(scale)), torch.zeros_like(scale))
        zp = _torch_round_half_away(zp).clamp(0, qmax)
    s, z = scale[..., None], zp[..., None]
    inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
    q = _torch_round_half_away(wb * inv + z).clamp(0, qmax)
    return ((q - z) * s).reshape(n, kb * block_size)[:, :k]
