"""Calibration data checked against the model before the first run, and layers the data gives no signal to.

`check_feeds` refuses, with one line naming the input, the sample and the fix: inputs missing or unknown, a
dtype other than the input's, a rank other than the input's or a static dimension of another size, NaN/Inf in
a float input, and token ids outside the embedding table they index (negative or >= its rows). Each of those
would otherwise crash inside ONNX Runtime or the numerics, or, worse, give a silently broken model.

`no_signal` tells a layer whose calibration input is all zero or constant from one that has data: from the
accumulated XᵀX (G) alone — G = 0 for all-zero rows, and rows that are all the same vector c give
G = n c cᵀ of rank 1, for which ‖G‖_F = tr(G) (a PSD matrix has ‖G‖_F² = Σλ² ≤ (Σλ)² = tr(G)², with equality
iff one eigenvalue is nonzero). GPTQ and AWQ fall back to RTN for such a layer (GPTQ would zero every column
of W whose input is always 0, and fit the rest to one direction); `check_signal` refuses a run where most
layers see no signal (the data is degenerate: all padding, one repeated token).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ptqonnx.errors import UserError

__all__ = ["check_feeds", "no_signal", "check_signal", "SIGNAL_TOLERANCE"]

logger = logging.getLogger(__name__)

SIGNAL_TOLERANCE = 1e-6  # ‖G‖_F >= (1 - tol) tr(G): rank one (constant rows) up to rounding


def _embedding_rows(model: ir.Model) -> dict[str, int]:
    """Graph input name -> rows of the constant table a Gather indexes with it."""
    rows: dict[str, int] = {}
    for node in model.graph:
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None and node.inputs[1] is not None \
                and node.inputs[1].is_graph_input():
            rows.setdefault(node.inputs[1].name, int(node.inputs[0].const_value.shape[0]))
    return rows


def check_feeds(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], origin: str = "calibration data") -> None:
    """Raise UserError on the first feed that does not fit the model's inputs (see the module docstring)."""
    inputs = [v for v in model.graph.inputs if v.const_value is None]
    names = [v.name for v in inputs]
    rows = _embedding_rows(model)
    if not feeds:
        raise UserError(f"{origin} is empty; pass at least one sample")
    for i, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        unknown = sorted(set(feed) - set(names))
        if missing or unknown:
            what = "; ".join(p for p in (f"missing {missing[:5]}" if missing else "",
                                         f"unknown {unknown[:5]}" if unknown else "") if p)
            raise UserError(f"{origin} does not match the model inputs {names[:8]} ({what}); provide one array "
                            "per model input, named after it")
        for v in inputs:
            a = np.asarray(feed[v.name])
            where = f"{origin}: input {v.name!r} (sample {i})"
            if v.dtype is not None and a.dtype != v.dtype.numpy():
                raise UserError(f"{where} is {a.dtype}, the model takes {np.dtype(v.dtype.numpy()).name}; save the "
                                "arrays as that type")
            if v.shape is not None:
                if a.ndim != len(v.shape):
                    raise UserError(f"{where} has rank {a.ndim} (shape {list(a.shape)}), the model takes rank "
                                    f"{len(v.shape)} {_spell(v.shape)}; reshape the arrays (samples stack on a "
                                    "leading axis in an npz, each sample keeps the model's batch axis)")
                for axis, (d, n) in enumerate(zip(v.shape, a.shape)):
                    if isinstance(d, int) and d != n:
                        raise UserError(f"{where} has size {n} on axis {axis}, the model fixes it at {d} "
                                        f"{_spell(v.shape)}; pass arrays of that shape")
            if np.issubdtype(a.dtype, np.floating):
                if not np.isfinite(a).all():
                    raise UserError(f"{where} holds NaN/Inf values; pass finite calibration data")
            elif v.name in rows and a.size:
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= rows[v.name]:
                    bad = lo if lo < 0 else hi
                    raise UserError(f"{where} holds token id {bad}, outside the embedding's {rows[v.name]} rows; "
                                    "tokenize with the model's own tokenizer")


def _spell(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def no_signal(xtx: np.ndarray | None, count: int) -> str | None:
    """'all zero' or 'constant' when the rows behind XᵀX carry no signal for a solver, else None."""
    if xtx is None or count == 0:
        return "all zero"
    g = np.asarray(xtx, np.float64)
    tr = float(np.trace(g))
    if not tr > 0:
        return "all zero"
    if float(np.linalg.norm(g)) >= (1.0 - SIGNAL_TOLERANCE) * tr:
        return "constant"
    return None


def check_signal(fallbacks: Mapping[str, str], total: int) -> None:
    """Refuse a run where most layers saw no signal (`fallbacks`: layer -> why) of `total` layers."""
    if total and len(fallbacks) * 2 > total:
        eg = ", ".join(f"{k} ({v})" for k, v in list(fallbacks.items())[:3])
        raise UserError(f"the calibration data gives no signal to {len(fallbacks)} of {total} layers (their inputs "
                        f"are all zero or constant, e.g. {eg}): it is degenerate (padding only, one repeated token?); "
                        "pass real calibration data")
    for layer, why in fallbacks.items():
        logger.warning("%s: calibration input is %s; quantized with RTN instead", layer, why)
