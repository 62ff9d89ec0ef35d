"""Column paths for per-channel scales: which output column of a linear layer each channel of a value carries.

AWQ's "o after v" folds o_proj's input scale into v_proj's output columns. That is exact when the attention
output X = layout(P·V) with V = path(P_v(Z)) and only element-moving ops on both paths: P·V is linear in V
and mixes only along V's sequence axis, so a per-column scale of V reaches one (head, dim) channel of X.
A fused projection (Phi-3's `qkv_proj` and `gate_up_proj`, GPT-2's `c_attn`, GPT-NeoX's per-head
interleaved `query_key_value`) adds a selection (`Slice` / `Split`) on the path: V then carries a subset of
P_v's columns, and a scale on those columns is exact as long as every other reader of P_v's output (q, k,
gate) is a selection of other columns, which never sees it.

These helpers find the paths (`attention_path`, `column_path`), push column ids through them at their
annotated shapes (`trace_columns`), find the other readers of the path's columns (`ColumnTrace.siblings`)
and the channel map (`channel_map`, `row_columns`); `ptqonnx.graph.scaling` decides whether a scaling
group may use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.trace import ONNX_DOMAINS, attr, data_uses, trace_const

__all__ = ["ATTENTION_OPS", "LAYOUT_OPS", "REPEAT_OPS", "SELECT_OPS", "ColumnTrace", "attention_path",
           "column_ids", "column_path", "trace_columns", "channel_map", "row_columns"]

LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
REPEAT_OPS = LAYOUT_OPS | {"Expand"}  # move or repeat elements, never combine them
SELECT_OPS = {"Slice", "Split"}  # keep a part of an axis (a fused projection's q/k/v or gate/up columns)
_PROBE_SIZES = (3, 5, 7, 11, 13)  # sizes given to symbolic dims when following a layout: small, distinct
_FREE_SIZE = 2  # the size given to an unknown dim along which the ids do not vary (any size would do)
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "SparseAttention"}

Step = tuple[ir.Node, ir.Value]  # a node on a path and the output of it that the path follows


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


def column_path(v: ir.Value) -> tuple[ir.Value, list[Step]]:
    """Follow `v` back through element-moving and selecting ops (and a Concat with graph inputs, a KV cache):
    (the first value made otherwise, the steps from there towards `v`)."""
    path: list[Step] = []
    for _ in range(12):
        prod = v.producer()
        if prod is None or prod.domain not in ONNX_DOMAINS:
            break
        if prod.op_type in REPEAT_OPS or prod.op_type in SELECT_OPS:
            nxt = prod.inputs[0]
        elif prod.op_type == "Concat":
            own = [i for i in prod.inputs if i is not None and not i.is_graph_input()]
            if len(own) != 1:
                break
            nxt = own[0]
        else:
            break
        path.append((prod, v))
        v = nxt
    return v, path[::-1]


@dataclass(frozen=True)
class CachePath:
    """What a KV cache does on V's path (`column_path`'s top and steps): `present`, the values on it that are
    graph outputs (V as the cache stores it); `past`, whether a Concat joins V to a past (a graph input);
    `written_back`, whether a present output follows the last such Concat (the graph writes the past it reads)."""

    present: tuple[ir.Value, ...]
    past: bool
    written_back: bool

    @classmethod
    def of(cls, top: ir.Value, steps: list[Step]) -> CachePath:
        values = [top] + [out for _, out in steps]
        concats = [i for i, (n, _) in enumerate(steps) if n.op_type == "Concat"]
        return cls(tuple(v for v in values if v.is_graph_output()), bool(concats),
                   not concats or any(v.is_graph_output() for v in values[concats[-1] + 1:]))


def _unknown(d: ir.SymbolicDim) -> str | None:
    """The key of a dim whose size the model does not say: "" for an unnamed one, the name of one ONNX shape
    inference made up (`unk__N`: a Reshape or Expand to a computed shape, as optimum's exports have; one
    name is one size wherever it appears; a sum such as `past_sequence + sequence`, a KV cache's length, which
    another value may call by another name), else None (a named symbol: any probe size may stand for it)."""
    if d.value is None:
        return ""
    return str(d.value) if str(d.value).startswith("unk__") or "+" in str(d.value) else None


def _concrete(shape: ir.Shape | None, sizes: dict[str, int], free: bool = False) -> tuple[int, ...] | None:
    """`shape` with each symbolic dim given a distinct probe size. A dim of unknown size (`_unknown`) takes the
    size found for its name earlier in `sizes`, else it makes the shape None, or with `free` it is -1 (to
    be taken from the data, `_step`). A product of symbols and integers (torch's exporter writes a merged
    batch and sequence axis as `sequence*batch`) is the product of their sizes."""
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        key = _unknown(d)
        if key is not None:
            if key and key in sizes:
                out.append(sizes[key])
            elif free:
                out.append(-1)
            else:
                return None
            continue
        size, named = 1, sum(1 for k in sizes if not k.startswith("unk__"))
        for factor in str(d.value).replace(" ", "").split("*"):
            if factor.isdigit():
                size *= int(factor)
            elif not factor or named >= len(_PROBE_SIZES) and factor not in sizes:
                return None
            else:
                if factor not in sizes:
                    sizes[factor], named = _PROBE_SIZES[named], named + 1
                size *= sizes[factor]
        out.append(size)
    return tuple(out)


def _learn(shape: ir.Shape, got: tuple[int, ...], sizes: dict[str, int]) -> None:
    """Remember the sizes the data gave to `shape`'s made-up dims (`unk__N`)."""
    for d, g in zip(shape, got):
        key = None if isinstance(d, int) else _unknown(d)
        if key:
            sizes.setdefault(key, g)


def column_ids(top: ir.Value, sizes: dict[str, int]) -> np.ndarray | None:
    """`top` [..., W]'s column id at every element (W must be known; its other unknown dims get the size
    `_FREE_SIZE`: the ids do not vary along them)."""
    shape = _concrete(top.shape, sizes, free=True)
    if not shape or shape[-1] < 0:
        return None
    shape = tuple(_FREE_SIZE if s < 0 else s for s in shape)
    _learn(top.shape, shape, sizes)
    return np.broadcast_to(np.arange(shape[-1]), shape)


def _ints(value: ir.Value | None) -> list[int] | None:
    found = trace_const(value)
    return None if not found else [int(i) for i in np.asarray(found.initializer.const_value.numpy()).reshape(-1)]


def _select(ids: np.ndarray, node: ir.Node, out: ir.Value) -> np.ndarray | None:
    """ids at `out` of a Slice (steps > 0) or Split with constant parameters (None otherwise)."""
    rank = ids.ndim
    if node.op_type == "Slice":
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is None or ends is None or len(starts) != len(ends):
            return None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if len(axes) != len(starts) or len(steps) != len(starts) or any(s <= 0 for s in steps):
            return None
        index = [slice(None)] * rank
        for a, b, e, s in zip(axes, starts, ends, steps):
            index[a % rank] = slice(b, e, s)  # for steps > 0 ONNX clamps as Python does
        return ids[tuple(index)]
    axis = attr(node, "axis", 0) % rank
    dim, j = ids.shape[axis], list(node.outputs).index(out)
    split = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if split is None:
        n = attr(node, "num_outputs", None) or len(node.outputs)
        chunk = -(-dim // n)
        split = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    if len(split) != len(node.outputs) or sum(split) != dim:
        return None
    start = sum(split[:j])
    return np.take(ids, np.arange(start, start + split[j]), axis=axis)


def _step(ids: np.ndarray, node: ir.Node, out: ir.Value, sizes: dict[str, int]) -> np.ndarray | None:
    """Apply one element-moving or selecting node to `ids` at its annotated output shape (None where they
    disagree). An output dim of unknown size (-1 from `_concrete`) is taken from the data: a Transpose or a
    selection gives it, a Reshape with one of them solves it from the element count (as ONNX's -1 does), and
    a Reshape keeping the last axis of columns constant along the others gives it `_FREE_SIZE`; the sizes
    found are kept for the dim's name."""
    shape = _concrete(out.shape, sizes, free=True)
    if shape is None:
        return None
    try:
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None)
            ids = ids.transpose(perm if perm is None else tuple(perm))
        elif node.op_type == "Expand":
            ids = np.broadcast_to(ids, _expanded_shape(ids, shape, out, sizes))
        elif node.op_type in SELECT_OPS:
            ids = _select(ids, node, out)
        elif node.op_type == "Concat":
            ids = _cache_concat(ids, node, shape)
        elif ids.ndim and len(shape) and shape[-1] >= 0 and ids.shape[-1] == shape[-1] \
                and (ids == ids.reshape(-1, shape[-1])[:1]).all():
            shape = tuple(_FREE_SIZE if s < 0 else s for s in shape)
            ids = np.broadcast_to(ids.reshape(-1, shape[-1])[0], shape)  # a reshape keeping the last axis of
            # columns constant along the others ([batch*sequence, N] <-> [batch, sequence, N]): shape-free
        else:
            ids = ids.reshape(shape)
    except ValueError:
        return None
    if ids is None or not _fits(ids.shape, shape):
        return None
    _learn(out.shape, ids.shape, sizes)
    return ids


def _expanded_shape(ids: np.ndarray, shape: tuple[int, ...], out: ir.Value, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape an Expand gives `ids`, its unknown output dims filled in: the input's size, except one
    size-1 axis being repeated (grouped-query attention's `repeat_kv` to a computed shape, as optimum's
    exports have), whose count the Reshape reading the Expand says (its elements / the input's)."""
    like = (1,) * (len(shape) - ids.ndim) + ids.shape
    target = [g if s < 0 else s for s, g in zip(shape, like)]
    open_axes = [i for i, (s, g) in enumerate(zip(shape, like)) if s < 0 and g == 1]
    readers = out.uses()
    if len(open_axes) == 1 and len(readers) == 1 and readers[0][0].op_type == "Reshape":
        after = _concrete(readers[0][0].outputs[0].shape, sizes, free=True)
        n = int(np.prod(target))
        if after is not None and min(after, default=0) > 0 and int(np.prod(after)) % n == 0:
            target[open_axes[0]] = int(np.prod(after)) // n
    return tuple(target)


def _cache_concat(ids: np.ndarray, node: ir.Node, shape: tuple[int, ...]) -> np.ndarray | None:
    """ids at a KV cache's Concat (`column_path` follows only those: the other inputs are graph inputs, the
    past): along a non-column axis the ids do not vary along, the past rows are taken to carry the same
    columns, which holds when the cache was written by this same graph (the caller's premise). None where
    the axis is the columns' or the ids vary along it."""
    axis = attr(node, "axis", 0)
    axis = axis + ids.ndim if axis < 0 else axis
    if not 0 <= axis < ids.ndim - 1 or not (ids == ids.take([0], axis=axis)).all() or len(shape) != ids.ndim:
        return None
    target = list(ids.shape)
    for d in range(ids.ndim - 1):  # a size the output names (the past's batch symbol, the total length) where
        if shape[d] >= 0 and (d == axis or (ids == ids.take([0], axis=d)).all()):  # the ids do not vary
            ids, target[d] = ids.take([0], axis=d), shape[d]
    return np.broadcast_to(ids, tuple(target))


def _fits(got: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(got) == len(shape) and all(s in (-1, g) for g, s in zip(got, shape))


def _broadcast_shape(shape: ir.Shape | None, like: np.ndarray, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """`shape` (P·V's output) with its unknown dims taken from `like` (the ids at V: batch, heads and head
    size are V's, and the query axis, which V's ids do not vary along, gets V's sequence size)."""
    out = _concrete(shape, sizes, free=True)
    if out is None or len(out) != like.ndim:
        return None if out is None or -1 in out else out
    return tuple(g if s == -1 else s for g, s in zip(like.shape, out))


@dataclass(frozen=True)
class ColumnTrace:
    """Column ids of `top` (a linear layer's output [..., W]) pushed along `steps`: `ids[i]` at the value
    before step i, `ids[-1]` at the path's end."""

    top: ir.Value
    steps: tuple[Step, ...]
    ids: tuple[np.ndarray, ...]
    sizes: dict[str, int]

    @property
    def values(self) -> list[ir.Value]:
        return [self.top] + [out for _, out in self.steps]

    @property
    def columns(self) -> np.ndarray:
        """The distinct columns of `top` that reach the path's end."""
        return np.unique(self.ids[-1])

    def siblings(self, end: ir.Node, cache: frozenset[int] = frozenset()) -> list[ir.Value] | str:
        """The other values that read the path's columns' source: a Split's other outputs and other Slice /
        Split readers of a value on the path, each carrying none of the columns reaching the path's end (`end`
        reads its last value). A reason when a value on the path has any other consumer. Values in `cache`
        (ids: a KV cache's present outputs, which the caller lets change) may be graph outputs and have their
        length read."""
        keep = set(self.columns.tolist())
        found: list[ir.Value] = []
        values = self.values
        users = [n for n, _ in self.steps] + [end]
        for i, value in enumerate(values):
            if value.is_graph_output() and id(value) not in cache:
                return f"{value.name} is a graph output (the fold would change it)"
            others = [(users[i], out) for out in users[i].outputs if out is not values[i + 1]] \
                if i < len(self.steps) and users[i].op_type == "Split" else []  # the Split's other parts
            for user, index in (data_uses(value) if id(value) in cache else value.uses()):
                if user is users[i]:
                    continue
                if user.op_type not in SELECT_OPS or user.domain not in ONNX_DOMAINS or index != 0:
                    return f"{value.name} has other consumers ({user.op_type}; the fold would change them)"
                others += [(user, out) for out in user.outputs]
            for user, out in others:
                got = _select(self.ids[i], user, out)
                if got is None or keep & set(np.unique(got).tolist()):
                    return f"{value.name} is also read by {user.op_type} {user.name} over the same columns"
                found.append(out)
        return found


def trace_columns(top: ir.Value, steps: list[Step]) -> ColumnTrace | str:
    """Push `top`'s column ids along `steps` (see `ColumnTrace`), or say why the shapes do not allow it."""
    sizes: dict[str, int] = {}
    ids = column_ids(top, sizes) if top.shape is not None and isinstance(top.shape[-1], int) else None
    if ids is None:
        return "shapes on the path unknown (run shape inference)"
    history = [ids]
    for node, out in steps:
        ids = _step(ids, node, out, sizes)
        if ids is None:
            return f"shapes on the path unknown or inconsistent (at {node.op_type} {node.name})"
        history.append(ids)
    return ColumnTrace(top, tuple(steps), tuple(history), sizes)


def row_columns(trace: ColumnTrace, k: int) -> tuple[int, ...] | str:
    """The `top` column carried by each channel of the path's end [..., k], the same at every position."""
    ids = trace.ids[-1]
    flat = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    if flat.shape[-1] != k or not (flat == flat[:1]).all() or len(set(flat[0].tolist())) != k:
        return "its channels are not distinct columns of the linear layer's output"
    return tuple(int(c) for c in flat[0])


def channel_map(trace: ColumnTrace, k: int, pv: ir.Node, o_path: list[ir.Node]) -> tuple[int, ...] | str:
    """X channel c -> the P_v output column it carries (`trace` runs from P_v's output to V), or why there is
    none.

    At V the ids must not vary along the sequence axis (-2, which P·V sums over), P·V's output carries V's row
    at every query position, and at X every channel must carry one column for all positions, distinct ones.
    Shapes come from the model's value_info; a wrong annotation cannot pass silently since folds are checked
    in ORT.
    """
    ids, sizes = trace.ids[-1], dict(trace.sizes)
    if ids.ndim < 2:
        return "shapes on the v→o path unknown or inconsistent"
    if not (ids == ids[..., :1, :]).all():
        return "V's sequence axis mixes channels"
    out_shape = _broadcast_shape(pv.outputs[0].shape, ids, sizes)
    if out_shape is None:
        return "shapes on the v→o path unknown (run shape inference)"
    try:
        ids = np.broadcast_to(ids[..., :1, :], out_shape)
    except ValueError:
        return "shapes on the v→o path inconsistent"
    for node in o_path[::-1]:
        ids = _step(ids, node, node.outputs[0], sizes)
        if ids is None:
            return "shapes on the v→o path unknown or inconsistent"
    if ids.shape[-1] != k:
        return "shapes on the v→o path unknown or inconsistent"
    flat = ids.reshape(-1, k)
    if not (flat == flat[:1]).all() or sorted(flat[0].tolist()) != sorted(trace.columns.tolist()):
        return "its channels are not a permutation of V's columns"
    return tuple(int(c) for c in flat[0])
