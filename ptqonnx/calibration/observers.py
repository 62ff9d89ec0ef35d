"""Streaming activation statistics: reduce each batch, keep only the reduction.

An activation `x` of any shape is viewed as rows `X = x.reshape(-1, C)` with `C = x.shape[-1]` (the channel
axis of a MatMul input is its last axis). Over all rows of all batches, with `n` rows in total:

    absmax[c]   = max_r |X[r, c]|                      (SmoothQuant's per-channel activation range)
    mean_abs[c] = (1/n) sum_r |X[r, c]|                (AWQ's per-channel activation magnitude)
    min, max    = min_{r,c} X[r, c], max_{r,c} X[r, c] (per-tensor range for static activation scales)
    xtx         = sum_r X[r]^T X[r]  in float64        (GPTQ: H = 2/n * xtx, Frantar et al. 2022, eq. 2)
    sample      = up to `k` rows drawn uniformly without replacement (seeded reservoir, Vitter's Algorithm R)
    row_absmax  = max_c |X[r, c]| of every row r                (how unevenly tokens use a per-tensor range)

Memory per value is O(C) for the first three, O(C^2) for `xtx`, O(k*C) for `sample` and O(n) for
`row_absmax` (one float per row: 64k for 128 windows of 512 tokens); the activations
themselves are discarded after each `update`. Pure numpy: this module never imports onnx or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable

import numpy as np

__all__ = [
    "Stat",
    "DEFAULT_SAMPLE_ROWS",
    "TensorStats",
    "TensorObserver",
    "parse_stats",
]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 4096


class Stat(str, enum.Enum):
    """A statistic a pass can request for a value."""

    ABSMAX = "absmax"
    MEAN_ABS = "mean_abs"
    MINMAX = "minmax"
    XTX = "xtx"
    SAMPLE = "sample"
    ROW_ABSMAX = "row_absmax"


def parse_stats(kinds: Iterable[str | Stat]) -> frozenset[Stat]:
    """Normalize statistic names (`"absmax"` or `Stat.ABSMAX`) to a set of `Stat`; ValueError on unknown."""
    out = set()
    for k in kinds:
        try:
            out.add(Stat(k))
        except ValueError:
            raise ValueError(
                f"unknown statistic {k!r}; use one of {[s.value for s in Stat]}"
            ) from None
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Finalized statistics of one value. Fields not requested are None.

    `count` is the number of rows `n` reduced (product of all but the last axis, summed over batches).
    `minmax_stale` is True once an exact rescaling made the per-tensor min/max unrecoverable (then
    `min`/`max` are None).
    """

    count: int
    channels: int
    absmax: np.ndarray | None = None  # [C] float32
    mean_abs: np.ndarray | None = None  # [C] float32
    min: float | None = None
    max: float | None = None
    xtx: np.ndarray | None = None  # [C, C] float64
    sample: np.ndarray | None = None  # [k, C] float32, k <= sample rows requested
    row_absmax: np.ndarray | None = None  # [n] float32: each row's max |x|, of the activation as measured
    minmax_stale: bool = False

    @property
    def kinds(self) -> frozenset[Stat]:
        have = set()
        if self.absmax is not None:
            have.add(Stat.ABSMAX)
        if self.mean_abs is not None:
            have.add(Stat.MEAN_ABS)
        if self.min is not None:
            have.add(Stat.MINMAX)
        if self.xtx is not None:
            have.add(Stat.XTX)
        if self.sample is not None:
            have.add(Stat.SAMPLE)
        if self.row_absmax is not None:
            have.add(Stat.ROW_ABSMAX)
        return frozenset(have)

    def hessian(self) -> np.ndarray:
        """GPTQ's layer Hessian H = 2/n * XᵀX as float64 [C, C]."""
        if self.xtx is None:
            raise KeyError("xtx was not collected for this value")
        return self.xtx * (2.0 / max(self.count, 1))

    def scaled(self, s: np.ndarray) -> TensorStats:
        """Statistics of x' = x / s (s per channel, [C], positive): exact for every kind but min/max.

        absmax' = absmax / s, mean_abs' = mean_abs / s, xtx' = diag(1/s) xtx diag(1/s), sample' = sample / s;
        per-tensor min/max of x/s depend on which channel held the extreme, so they are dropped (stale);
        `row_absmax` stays as measured before the scaling (rows' maxima of x/s are not recoverable from it).
        """
        s = np.asarray(s)
        if s.shape != (self.channels,):
            raise ValueError(f"scale has shape {s.shape}, expected ({self.channels},)")
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError("scale must be finite and positive")
        inv32 = (1.0 / s.astype(np.float64)).astype(np.float32)
        inv64 = 1.0 / s.astype(np.float64)
        return dataclasses.replace(
            self,
            absmax=None if self.absmax is None else (self.absmax * inv32).astype(np.float32),
            mean_abs=None if self.mean_abs is None else (self.mean_abs * inv32).astype(np.float32),
            xtx=None if self.xtx is None else self.xtx * inv64[:, None] * inv64[None, :],
            sample=None if self.sample is None else (self.sample * inv32).astype(np.float32),
            min=None,
            max=None,
            minmax_stale=self.minmax_stale or self.min is not None,
        )


class TensorObserver:
    """Accumulates the requested statistics of one value over batches; `finalize()` -> TensorStats."""

    def __init__(
        self,
        kinds: Iterable[str | Stat],
        *,
        sample_rows: int = DEFAULT_SAMPLE_ROWS,
        seed: int = 0,
        xtx_chunk_dtype: type = np.float64,
    ) -> None:
        """`xtx_chunk_dtype=np.float32` computes each update's XᵀX with a float32 GEMM (several times faster)
        and adds it into the float64 total: the rounding error stays per chunk (~rows x 2^-24 relative),
        it does not grow with the number of updates."""
        self.kinds = parse_stats(kinds)
        if xtx_chunk_dtype not in (np.float32, np.float64):
            raise ValueError(f"xtx_chunk_dtype must be float32 or float64, got {xtx_chunk_dtype}")
        self.xtx_chunk_dtype = xtx_chunk_dtype
        if not self.kinds:
            raise ValueError("an observer needs at least one statistic")
        if sample_rows < 1:
            raise ValueError(f"sample_rows must be at least 1, got {sample_rows}")
        self.sample_rows = sample_rows
        self._rng = np.random.default_rng(seed)
        self.count = 0
        self.channels: int | None = None
        self._absmax: np.ndarray | None = None  # [C] float32
        self._sum_abs: np.ndarray | None = None  # [C] float64
        self._min = np.inf
        self._max = -np.inf
        self._xtx: np.ndarray | None = None  # [C, C] float64
        self._sample: np.ndarray | None = None  # [k, C] float32
        self._row_absmax: list[np.ndarray] = []
        self._filled = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1, 1)
        c = x.shape[-1]
        if self.channels is None:
            self._init(c)
        elif c != self.channels:
            raise ValueError(f"channel count changed between batches: {self.channels} -> {c}")
        rows = x.reshape(-1, c)  # [n, C]
        if rows.shape[0] == 0:
            return
        if not np.issubdtype(rows.dtype, np.floating) or rows.dtype == np.float16:
            rows = rows.astype(np.float32)
        ks = self.kinds
        if Stat.ABSMAX in ks or Stat.MEAN_ABS in ks:
            a = np.abs(rows)
            if Stat.ABSMAX in ks:
                np.maximum(self._absmax, a.max(axis=0).astype(np.float32), out=self._absmax)
            if Stat.MEAN_ABS in ks:
                self._sum_abs += a.sum(axis=0, dtype=np.float64)
        if Stat.MINMAX in ks:
            self._min = min(self._min, float(rows.min()))
            self._max = max(self._max, float(rows.max()))
        if Stat.XTX in ks:
            rc = rows.astype(self.xtx_chunk_dtype)
            self._xtx += rc.T @ rc
        if Stat.SAMPLE in ks:
            self._reservoir(rows)
        if Stat.ROW_ABSMAX in ks:
            self._row_absmax.append(np.abs(rows).max(axis=1).astype(np.float32))
        self.count += rows.shape[0]

    def _init(self, c: int) -> None:
        self.channels = c
        ks = self.kinds
        if Stat.ABSMAX in ks:
            self._absmax = np.zeros(c, np.float32)
        if Stat.MEAN_ABS in ks:
            self._sum_abs = np.zeros(c, np.float64)
        if Stat.XTX in ks:
            self._xtx = np.zeros((c, c), np.float64)
        if Stat.SAMPLE in ks:
            self._sample = np.empty((self.sample_rows, c), np.float32)

    def _reservoir(self, rows: np.ndarray) -> None:
        """Algorithm R over the row stream: row i (0-based, global) replaces slot j ~ U[0, i] if j < k."""
        k = self.sample_rows
        n = rows.shape[0]
        take = min(max(k - self._filled, 0), n)
        if take:
            self._sample[self._filled : self._filled + take] = rows[:take]
            self._filled += take
        if take == n:
            return
        idx = np.arange(self.count + take, self.count + n)  # global indices of the remaining rows
        j = self._rng.integers(0, idx + 1)  # one draw per row
        for r, slot in zip(np.nonzero(j < k)[0], j[j < k]):  # in stream order: later rows win
            self._sample[slot] = rows[take + r]

    def finalize(self) -> TensorStats:
        if self.channels is None:
            raise ValueError("observer saw no data")
        ks = self.kinds
        n = self.count
        return TensorStats(
            count=n,
            channels=self.channels,
            absmax=self._absmax.copy() if Stat.ABSMAX in ks else None,
            mean_abs=(self._sum_abs / max(n, 1)).astype(np.float32) if Stat.MEAN_ABS in ks else None,
            min=self._min if Stat.MINMAX in ks else None,
            max=self._max if Stat.MINMAX in ks else None,
            xtx=self._xtx.copy() if Stat.XTX in ks else None,
            sample=self._sample[: self._filled].copy() if Stat.SAMPLE in ks else None,
            row_absmax=np.concatenate(self._row_absmax) if Stat.ROW_ABSMAX in ks else None,
        )
