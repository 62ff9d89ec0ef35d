"""ONNX Runtime sessions: the one place that imports onnxruntime for the rest of the package."""

from __future__ import annotations

import logging
from pathlib import Path

from ptqonnx.errors import UserError, require_module

__all__ = ["OPT_LEVELS", "GAP_TOLERANCE", "make_session", "optimization_gap", "session_threads"]

# max relative output difference allowed between ORT_DISABLE_ALL and ORT_ENABLE_ALL on a probe input: fusions
# that change the arithmetic by design are held exact (QDQ->MatMulNBits at accuracy level 0), so a gap above
# this is a miscompute (an ORT fusion bug or a malformed rewrite), not quantization error
GAP_TOLERANCE = 0.1

logger = logging.getLogger(__name__)

# name -> GraphOptimizationLevel attribute
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def make_session(
    model: str | Path | bytes,
    *,
    opt_level: str = "all",
    threads: int | None = None,
    providers: list[str] | None = None,
    config: dict[str, str] | None = None,
):
    """An InferenceSession at `opt_level` (default: ORT's default, ORT_ENABLE_ALL).

    `model` is a path (external data next to it is found by ORT) or serialized ModelProto bytes.
    """
    ort = require_module("onnxruntime", "test")
    if opt_level not in OPT_LEVELS:
        raise UserError(f"unknown optimization level {opt_level!r}; use one of {sorted(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime could not load the model: {first}") from None


def session_threads(session) -> int:
    """The intra-op thread count a session runs with (0 means ORT's default: one per core)."""
    import os

    n = session.get_session_options().intra_op_num_threads
    return n if n > 0 else (os.cpu_count() or 1)


def optimization_gap(model: str | Path | bytes, feeds) -> float:
    """max over feeds and outputs of max|y_all - y_none| / max|y_none| between ORT_ENABLE_ALL and
    ORT_DISABLE_ALL (inf where one has a NaN/inf the other has not). The QDQ -> MatMulNBits fusion runs at
    accuracy level 0 here (its default, 4, quantizes activations on purpose)."""
    import numpy as np

    exact = {"session.qdq_matmulnbits_accuracy_level": "0"}
    outputs = []
    for level in ("disable", "all"):  # one session at a time: never two copies of the weights in ORT
        sess = make_session(model, opt_level=level, config=exact)
        names = [i.name for i in sess.get_inputs()]
        outputs.append([sess.run(None, {k: f[k] for k in names}) for f in feeds])
        del sess
        _release_freed_memory()
    worst = 0.0
    for ref_outs, fused_outs in zip(*outputs):
        for ref, out in zip(ref_outs, fused_outs):
            ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
            if not np.array_equal(np.isfinite(ref), np.isfinite(out)):
                return float("inf")
            ok = np.isfinite(ref)
            if ok.any():
                worst = max(worst, float(np.abs(ref[ok] - out[ok]).max() / max(np.abs(ref[ok]).max(), 1e-30)))
    return worst


def _release_freed_memory() -> None:
    """Hand the freed session's memory back to the OS (glibc keeps freed heap otherwise, so two sessions in a
    row would peak at twice one session's memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
