"""Attention paths for per-channel scales: which channel of an attention output carries which V column.

AWQ's "o after v" folds o_proj's input scale into v_proj's output columns. That is exact when the attention
output X = layout(P·V) with V = layout(P_v(Z)) and only element-moving ops on both paths: P·V is linear in V
and mixes only along V's sequence axis, so a per-column scale of V reaches one (head, dim) channel of X.
These helpers find the path (`attention_path`, `v_path`) and the channel map (`channel_map`) by pushing
column ids through the layout ops at their annotated shapes; `ptqonnx.graph.scaling` decides whether a
scaling group may use them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.trace import ONNX_DOMAINS, attr, trace_const

__all__ = ["ATTENTION_OPS", "LAYOUT_OPS", "REPEAT_OPS", "attention_path", "v_path", "channel_map"]

LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
REPEAT_OPS = LAYOUT_OPS | {"Expand"}  # move or repeat elements, never combine them
_PROBE_SIZES = (3, 5, 7, 11, 13)  # sizes given to symbolic dims when following a layout: small, distinct
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "SparseAttention"}


def attention_path(x: ir.Value) -> tuple[list[ir.Node], ir.Node] | None:
    """X = layout(A) with A an attention op's or an activation x activation MatMul's output: (layout nodes
    from X back, that node), else None."""
    v, path = x, []
    for _ in range(8):
        prod = v.producer()
        if prod is None:
            return None
        if prod.op_type in ATTENTION_OPS:
            return path, prod
        if prod.op_type in ("MatMul", "Gemm") and prod.domain in ONNX_DOMAINS:
            return (path, prod) if all(not trace_const(i) for i in prod.inputs[:2]) else None
        if prod.op_type not in LAYOUT_OPS or prod.domain not in ONNX_DOMAINS:
            return None
        path.append(prod)
        v = prod.inputs[0]
    return None


def v_path(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow V back through element-moving ops (and a Concat with graph inputs, a KV cache): (the first
    value made otherwise, the nodes from there towards V)."""
    path: list[ir.Node] = []
    for _ in range(12):
        prod = v.producer()
        if prod is None or prod.domain not in ONNX_DOMAINS:
            break
        if prod.op_type in REPEAT_OPS:
            nxt = prod.inputs[0]
        elif prod.op_type == "Concat":
            own = [i for i in prod.inputs if i is not None and not i.is_graph_input()]
            if len(own) != 1:
                break
            nxt = own[0]
        else:
            break
        path.append(prod)
        v = nxt
    return v, path[::-1]


def _concrete(shape: ir.Shape | None, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """`shape` with each symbolic dim given a distinct probe size (None when a dim is unknown)."""
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d.value is None or len(sizes) >= len(_PROBE_SIZES) and d.value not in sizes:
            return None
        else:
            out.append(sizes.setdefault(d.value, _PROBE_SIZES[len(sizes)]))
    return tuple(out)


def _follow(ids: np.ndarray, nodes: list[ir.Node], sizes: dict[str, int]) -> np.ndarray | None:
    """Apply element-moving `nodes` to `ids` at their annotated output shapes (None where they disagree)."""
    for node in nodes:
        shape = _concrete(node.outputs[0].shape, sizes)
        if shape is None:
            return None
        try:
            if node.op_type == "Transpose":
                perm = attr(node, "perm", None)
                ids = ids.transpose(perm if perm is None else tuple(perm))
            elif node.op_type == "Expand":
                ids = np.broadcast_to(ids, shape)
            else:
                ids = ids.reshape(shape)
        except ValueError:
            return None
        if ids.shape != shape:
            return None
    return ids


def channel_map(top: ir.Value, k: int, v_nodes: list[ir.Node], pv: ir.Node,
                 o_path: list[ir.Node]) -> tuple[int, ...] | str:
    """X channel c -> the P_v output column it carries (both K wide), or why there is none.

    Found by moving channel ids: an array over the P_v output's shape (symbolic dims set to small distinct
    sizes) holding each element's column is pushed through the layout ops at their annotated output shapes;
    at V it must not vary along the sequence axis (-2, which P·V sums over), P·V's output carries V's row
    at every query position, and at X every channel must carry one column for all positions. Shapes come
    from the model's value_info; a wrong annotation cannot pass silently since folds are checked in ORT.
    """
    sizes: dict[str, int] = {}
    shape = _concrete(top.shape, sizes)
    if shape is None or not shape or shape[-1] != k:
        return "shapes on the v→o path unknown (run shape inference)"
    ids = _follow(np.broadcast_to(np.arange(k), shape), v_nodes, sizes)
    if ids is None or ids.ndim < 2:
        return "shapes on the v→o path unknown or inconsistent"
    if not (ids == ids[..., :1, :]).all():
        return "V's sequence axis mixes channels"
    out_shape = _concrete(pv.outputs[0].shape, sizes)
    if out_shape is None:
        return "shapes on the v→o path unknown (run shape inference)"
    try:
        ids = np.broadcast_to(ids[..., :1, :], out_shape)
    except ValueError:
        return "shapes on the v→o path inconsistent"
    ids = _follow(ids, o_path[::-1], sizes)
    if ids is None or ids.shape[-1] != k:
        return "shapes on the v→o path unknown or inconsistent"
    flat = ids.reshape(-1, k)
    if not (flat == flat[:1]).all() or sorted(flat[0].tolist()) != list(range(k)):
        return "its channels are not a permutation of V's columns"
    return tuple(int(c) for c in flat[0])
