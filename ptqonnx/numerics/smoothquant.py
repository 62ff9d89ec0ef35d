"""SmoothQuant (Xiao et al. 2023) scales and the W8A8 activation grid.

For a scaling group (linear layers Y_i = X W_i reading one activation X [n, K], W_i stored here as [N_i, K]),
eq. 3 of the paper: Y_i = (X diag(s)^-1) (diag(s) W_i) for any s > 0, and eq. 4 picks

    s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha)

which moves activation outliers (a few channels 100x larger than the rest) into the weights, where
per-output-channel INT8 absorbs them. As in the reference code, both maxima are clamped to >= 1e-5 and s
to >= 1e-5; a channel that is dead in X or in every W_i (maximum 0) gets s = 1 (no information to move).

`auto_alpha` searches alpha on a grid, per group, minimizing the group's W8A8 output error on sampled rows
of X: sum_i ||Q_a(X / s) Q_w(W_i * s)^T - X W_i^T||^2 / ||X W_i^T||^2, with Q_w INT8 symmetric per output
channel (`ptqonnx.numerics.quant`, the grid the weights are emitted with) and Q_a INT8 per tensor with the
static scale `act_scale_fn` derives from the smoothed statistics (the grid the activations are emitted with).

Activation grids (ONNX QuantizeLinear: q = saturate(round_half_even(x / scale) + zero_point)):

* symmetric INT8: scale = absmax / 127, zero_point 0 (TensorRT accepts only zero zero points); codes in
  [-128, 127] but the range maps to [-127, 127].
* asymmetric UINT8: lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo) / 255,
  zero_point = clip(round(-lo / scale), 0, 255) (ONNX Runtime's CPU kernels take any zero point).

A range of 0 gets scale 1 (every value quantizes to 0 exactly; a zero scale would divide by zero).

Dynamic activation scales (`fake_quantize_activation_dynamic`): symmetric INT8 with a scale per row and per
block of `block_size` consecutive features, taken from the values themselves at run time, as ONNX Runtime's
MatMulNBits does with accuracy_level 4 (MLAS `QuantizeARow_CompInt8`): a = max|x_block|, q = round_half_even(
x * (127 / a)), x_hat = q * (a / 127); an all-zero block stays 0. Finer than per-token scales (a block of a
row, not the whole row), so an outlier channel costs resolution only inside its own block of that row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ptqonnx.numerics.quant import fake_quantize

__all__ = [
    "CLAMP",
    "DEFAULT_ALPHA_GRID",
    "ActivationQParams",
    "ActivationQuantizer",
    "smooth_scales",
    "activation_scale",
    "percentile_absmax",
    "percentile_range",
    "fake_quantize_activation",
    "activation_scale_fp8",
    "fake_quantize_activation_dynamic",
    "w8a8_group_error",
    "auto_alpha",
]

CLAMP = 1e-5
DEFAULT_ALPHA_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


@dataclass(frozen=True)
class ActivationQParams:
    """A per-tensor activation grid: INT8 when `signed` (zero point 0 if symmetric), else UINT8; FP8 E4M3 with
    `fp8` (signed, zero point 0)."""

    scale: float
    zero_point: int
    signed: bool
    fp8: bool = False  # FLOAT8 E4M3FN codes (zero point 0, saturating at ±448 · scale)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"activation scale must be finite and > 0, got {self.scale}")
        lo, hi = (-128, 127) if self.signed else (0, 255)
        if not lo <= self.zero_point <= hi:
            raise ValueError(f"zero point {self.zero_point} is outside [{lo}, {hi}]")

    @property
    def qmin(self) -> int:
        return -128 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 127 if self.signed else 255


def _weight_absmax(weights: Sequence[np.ndarray], k: int) -> np.ndarray:
    """max_i max_n |W_i[n, j]| [K] float64."""
    if not weights:
        raise ValueError("a scaling group needs at least one weight")
    out = np.zeros(k, np.float64)
    for w in weights:
        w = np.asarray(w)
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"weights must be [N, K] with K={k}, got shape {w.shape}")
        np.maximum(out, np.abs(w).max(axis=0), out=out)
    return out


def smooth_scales(act_absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """s [K] float32 = max|X_j|^alpha / max|W_j|^(1-alpha), maxima clamped to >= 1e-5; s = 1 on dead channels."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_absmax, np.float64)
    if a.ndim != 1:
        raise ValueError(f"act_absmax must be [K], got shape {a.shape}")
    w = _weight_absmax(weights, a.size)
    s = np.maximum(a, CLAMP) ** alpha / np.maximum(w, CLAMP) ** (1.0 - alpha)
    s = np.maximum(s, CLAMP)
    s[(a == 0) | (w == 0) | ~np.isfinite(s)] = 1.0
    return s.astype(np.float32)


def activation_scale(lo: float, hi: float, symmetric: bool = True) -> ActivationQParams:
    """The per-tensor grid covering [lo, hi] (symmetric: [-max(|lo|, |hi|), +max(|lo|, |hi|)])."""
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if symmetric:
        amax = max(-lo, hi)
        return ActivationQParams(float(np.float32(amax / 127.0)) if amax > 0 else 1.0, 0, True)
    if hi - lo <= 0:
        return ActivationQParams(1.0, 0, False)
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(np.floor(-lo / scale + 0.5), 0, 255))
    return ActivationQParams(scale, zp, False)


def activation_scale_fp8(amax: float) -> ActivationQParams:
    """The per-tensor FP8 E4M3 grid holding [-amax, amax]: scale amax / 448."""
    from ptqonnx.numerics.quant import FP8_E4M3_MAX

    return ActivationQParams(float(np.float32(amax / FP8_E4M3_MAX)) if amax > 0 else 1.0, 0, True, fp8=True)


def _check_p(p: float) -> None:
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {p}")


def percentile_absmax(sample: np.ndarray, p: float) -> float:
    """The p-th percentile of |x| over all entries of the sampled rows [n, K] (clipping range of `--percentile`)."""
    _check_p(p)
    return float(np.percentile(np.abs(np.asarray(sample, np.float32)), p))


def percentile_range(sample: np.ndarray, p: float) -> tuple[float, float]:
    """(100-p)-th and p-th percentiles of x over the sampled rows: the asymmetric clipping range."""
    _check_p(p)
    x = np.asarray(sample, np.float32).ravel()
    return float(np.percentile(x, 100.0 - p)), float(np.percentile(x, p))


def fake_quantize_activation(x: np.ndarray, qp: ActivationQParams) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) exactly as ONNX specifies it (round half to even), float32."""
    scale = np.float32(qp.scale)
    if qp.fp8:
        from ptqonnx.numerics.quant import quantize_fp8

        return (quantize_fp8(x, scale).astype(np.float32) * scale).astype(np.float32)
    q = np.clip(np.rint(np.asarray(x, np.float32) / scale) + qp.zero_point, qp.qmin, qp.qmax)
    return ((q - qp.zero_point) * scale).astype(np.float32)


def fake_quantize_activation_dynamic(x: np.ndarray, block_size: int) -> np.ndarray:
    """INT8 fake quantization with a symmetric scale per row and per block of `block_size` along the last
    axis, from the values themselves (MatMulNBits accuracy_level 4), float32; the last block may be short."""
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    pad = (-k) % block_size
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, block_size)
    a = np.abs(xb).max(axis=-1, keepdims=True)  # [..., k_blocks, 1]
    inv = np.divide(np.float32(127.0), a, out=np.zeros_like(a), where=a > 0)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q * (a / np.float32(127.0))).reshape(*x.shape[:-1], -1)[..., :k].astype(np.float32)


# an activation fake-quantizer: a static per-tensor grid, or any x -> x_hat (e.g. dynamic scales)
ActivationQuantizer = ActivationQParams | Callable[[np.ndarray], np.ndarray]


def w8a8_group_error(x: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray,
                     act: ActivationQuantizer, refs: Sequence[np.ndarray] | None = None) -> float:
    """sum_i ||Q_a(X/s) Q_w(W_i s)^T - X W_i^T||^2 / ||X W_i^T||^2 for rows x [n, K], W_i [N_i, K]; Q_a is
    the static grid `act` or, when `act` is a function, `act` itself. `refs`: the X W_i^T, if already known."""
    x = np.asarray(x, np.float32)
    xq = fake_quantize_activation(x / s, act) if isinstance(act, ActivationQParams) else act(x / s)
    err = 0.0
    for i, w in enumerate(weights):
        w = np.asarray(w, np.float32)
        ref = x @ w.T if refs is None else refs[i]
        out = xq @ fake_quantize(w * s, 8, None, True).T
        err += float(np.sum((out - ref) ** 2, dtype=np.float64) / max(np.sum(ref**2, dtype=np.float64), 1e-30))
    return err


def auto_alpha(
    x_sample: np.ndarray,
    weights: Sequence[np.ndarray],
    act_absmax: np.ndarray,
    act_scale_fn: Callable[[np.ndarray, np.ndarray], ActivationQuantizer],
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    *,
    holdout: bool = True,
) -> tuple[float, np.ndarray, dict[float, float]]:
    """Alpha on `grid` minimizing `w8a8_group_error` on the sampled rows x_sample [n, K].

    `act_absmax` [K] is the full calibration run's per-channel maximum (what the returned s is computed
    from); `act_scale_fn(absmax / s, rows / s)` returns the activation grid the emitted model would use
    (or, for dynamic scales, its fake-quantizer).
    With `holdout` (and n >= 2), each candidate's s and activation grid are fitted on the even rows only and
    its error measured on the odd rows: measured in-sample, a large alpha looks best because no calibration
    row ever exceeds its channel's range, while unseen rows do and are clipped (alpha near 1 fits every
    channel's range exactly). Returns (alpha, s [K] from the full statistics, error per alpha); ties go to
    the smaller alpha (grid order).
    """
    x = np.asarray(x_sample, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x_sample must be [n, K] with n > 0, got shape {x.shape}")
    if holdout and x.shape[0] >= 2:
        fit, test = x[0::2], x[1::2]
        fit_absmax = np.abs(fit).max(axis=0)
    else:
        fit, test, fit_absmax = x, x, np.asarray(act_absmax, np.float32)
    errors: dict[float, float] = {}
    best: tuple[float, float] | None = None
    refs = [test @ np.asarray(w, np.float32).T for w in weights]
    for alpha in grid:
        s = smooth_scales(fit_absmax, weights, float(alpha))
        qp = act_scale_fn(fit_absmax / s, fit / s)
        e = w8a8_group_error(test, weights, s, qp, refs)
        errors[float(alpha)] = e
        if best is None or e < best[0]:
            best = (e, float(alpha))
    assert best is not None, "empty alpha grid"
    return best[1], smooth_scales(act_absmax, weights, best[1]), errors
