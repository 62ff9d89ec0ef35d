"""ONNX Runtime sessions: the one place that imports onnxruntime for the rest of the package."""

from __future__ import annotations

import logging
from pathlib import Path

from ptqonnx.errors import UserError, require_module

__all__ = ["OPT_LEVELS", "make_session", "session_threads"]

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
