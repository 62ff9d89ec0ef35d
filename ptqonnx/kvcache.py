"""The KV-cache interface of a decoder graph: which inputs are the cache, and the empty cache of a prefill.

Two naming conventions are recognized: optimum's and onnxruntime-genai's `past_key_values.{i}.key/.value`
[batch, kv_heads, past, head_dim] -> `present.{i}.key/.value`, and GPT-2's `past_{i}` [2, batch, kv_heads,
past, head_dim] (K and V stacked on axis 0) -> `present_{i}`. In both the past length is axis -2 and the
batch axis -4, and heads and head_dim (axes -3 and -1) are fixed by the export.

A prefill is the cached graph run with an *empty* cache (past length 0): that is how calibration, the
fold checks and the benchmarks run a KV-cache graph, so one quantized graph serves prefill and decode.
onnxruntime-genai's builder leaves head_dim symbolic (`kv_cache_dim`); its `GroupQueryAttention` nodes say
it (`gqa_head_dims`: kv_num_heads, and the query width over the heads), and where it writes attention as
standard ops (its fp16 CPU build) the new keys the past is concatenated with do (`concat_head_dims`, after
shape inference).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqonnx.errors import UserError

__all__ = ["CONVENTIONS", "cache_head_dims", "concat_head_dims", "empty_past", "gqa_head_dims", "head_dims",
           "is_past"]

# (name, past-input pattern, present-output format)
CONVENTIONS = (
    ("optimum / onnxruntime-genai", re.compile(r"past_key_values\.(\d+)\.(key|value)"), "present.{i}.{kind}"),
    ("GPT-2 (K and V stacked)", re.compile(r"past_(\d+)()"), "present_{i}"),
)


def is_past(name: str) -> bool:
    """Whether `name` is a KV-cache input under one of the conventions."""
    return any(p.fullmatch(name or "") for _, p, _ in CONVENTIONS)


def gqa_head_dims(past: ir.Value) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a cache input read as past_key/past_value (inputs 3, 4) by a com.microsoft
    GroupQueryAttention with a known query width (packed Q, K, V when its key input is absent), else None."""
    for node, index in past.uses():
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or index not in (3, 4):
            continue
        heads, kv = node.attributes.get("num_heads"), node.attributes.get("kv_num_heads")
        query = node.inputs[0]
        width = query.shape[-1] if query is not None and query.shape is not None and query.shape.rank() else None
        if heads is None or kv is None or not isinstance(width, int):
            continue
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        per = heads.as_int() + (2 * kv.as_int() if packed else 0)
        if per > 0 and width % per == 0:
            return kv.as_int(), width // per
    return None


def concat_head_dims(past: ir.Value) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a cache input from the values a Concat joins it with along the past axis (the
    new keys or values [batch, kv_heads, sequence, head_dim]), where their shapes fix axes -3 and -1."""
    rank = past.shape.rank() if past.shape is not None else 0
    if not rank:
        return None
    for node, _ in past.uses():
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() % rank != rank - 2:
            continue
        for other in node.inputs:
            dims = other.shape if other is not None and other is not past else None
            if dims is not None and dims.rank() == rank and isinstance(dims[-3], int) and isinstance(dims[-1], int):
                return dims[-3], dims[-1]
    return None


def head_dims(past: ir.Value) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a cache input whose export left them symbolic: `gqa_head_dims`, else
    `concat_head_dims`."""
    return gqa_head_dims(past) or concat_head_dims(past)


def cache_head_dims(model_path: str | Path) -> dict[str, tuple[int, int]]:
    """`head_dims` of every cache input of the model file (its weights are not read; shapes inferred where the
    graph's GroupQueryAttention does not say them)."""
    model = ir.load(str(model_path))
    found = {v.name: gqa_head_dims(v) for v in model.graph.inputs if is_past(v.name)}
    if any(v is None for v in found.values()):
        from ptqonnx.graph.trace import infer_shapes

        infer_shapes(model)
        found = {v.name: head_dims(v) for v in model.graph.inputs if is_past(v.name)}
    return {k: v for k, v in found.items() if v is not None}


def empty_past(name: str, shape: Sequence[int | str | None] | None, dtype, batch: int = 1,
               heads: tuple[int, int] | None = None) -> np.ndarray:
    """The zero-length cache for input `name` of `shape` (ints for fixed axes, anything else symbolic):
    axis -4 (batch) = `batch`, axis -2 (past) = 0, the other axes as the export fixed them, or, where
    symbolic, `heads` (kv_heads, head_dim; `head_dims`) gives them."""
    dims = list(shape or ())
    if len(dims) not in (4, 5):
        raise UserError(f"KV-cache input {name} has rank {len(dims)}; expected [batch, heads, past, head_dim] "
                        "(or GPT-2's [2, batch, heads, past, head_dim]); pass --calib-npz FILE with its arrays")
    out = []
    for axis, d in enumerate(dims):
        if axis == len(dims) - 4:
            out.append(batch)
        elif axis == len(dims) - 2:
            out.append(0)
        elif isinstance(d, int) and d > 0:
            out.append(d)
        elif heads is not None and axis in (len(dims) - 3, len(dims) - 1):
            out.append(heads[0] if axis == len(dims) - 3 else heads[1])
        else:
            raise UserError(f"KV-cache input {name} has a symbolic axis {axis} ({d!r}), so its empty cache "
                            "cannot be built; export with fixed heads and head_dim, or pass --calib-npz FILE")
    return np.zeros(out, dtype)
