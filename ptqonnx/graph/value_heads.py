"""v_proj → attention → o_proj pairs whose value heads can be rotated (QuaRot / SpinQuant R2), found structurally.

Per-head value rotation needs o_proj's input X = layout(P·V), V = layout(v_proj(Z) [+ b]) with only
element-moving ops (and grouped-query attention's Expand) on both paths. `find_value_heads` proves, by pushing
ids through those ops at their annotated shapes (`ptqonnx.graph.attention`'s helpers, as `channel_map` does
for AWQ's 1:1 case), that X's channel b·d + j carries V column g(b)·d + j (d = head_dim) and that all d channels
of X's block b come from one P·V head, i.e. one set of attention probabilities P_b. Then for any R [d, d]

    X'_b = P_b (V blockdiag(R))_g = (P_b V_g) R = X_b R,    so V' = V blockdiag(R) gives X' = X blockdiag(R).

V stored in a KV cache (a graph output on V's path, the present; maybe after a Concat with a graph input, the
past) is followed only when asked (`through_cache`): the cache then holds rotated values, V' = V blockdiag(R),
and the past rows must too, which holds when this model wrote them (a cache is fed back to the model that made
it; a no-past graph exposing V and its with-past twin rotate alike); `ValueHeads.cache_outputs` names those
present outputs. A past joined to V that the graph does not write back is refused. Refused otherwise (a Skip
per o_proj, with the reason): fused attention ops, v_proj or attention outputs with other consumers,
probabilities that depend on V, unknown shapes, channel maps that are not whole head blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.attention import (ATTENTION_OPS, CachePath, Step, _broadcast_shape, _step, attention_path,
                                     column_ids, column_path)
from ptqonnx.graph.scaling import ConstRef, _channel_vector
from ptqonnx.graph.sites import LinearSite, Skip, find_linear_sites
from ptqonnx.graph.trace import ONNX_DOMAINS, data_uses, trace_const, upstream_any

__all__ = ["ValueHeads", "find_value_heads"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueHeads:
    """v_proj → P·V → o_proj: V's columns come in blocks of `head_dim` (one per KV head), o_proj's rows too
    (one per attention head), and o_proj's block b reads V's block `groups[b]`."""

    v: LinearSite
    v_bias: ConstRef | None  # a constant added to v_proj's output before the attention (Gemm's C: v.bias)
    o: LinearSite
    head_dim: int
    groups: tuple[int, ...]
    cache_outputs: tuple[str, ...] = ()  # present outputs that hold V (rotated with it)


def _follow(ids: np.ndarray, steps: list[Step], sizes: dict[str, int]) -> np.ndarray | None:
    """`ids` pushed along `steps` (`ptqonnx.graph.attention._step`), None where the shapes disagree."""
    for node, out in steps:
        ids = _step(ids, node, out, sizes)
        if ids is None:
            return None
    return ids


def _head_blocks(top: ir.Value, v_steps: list[Step], pv: ir.Node, o_path: list[ir.Node], d: int,
                 k: int) -> tuple[int, ...] | str:
    """X block b ↦ V block g(b) with channel b·d + j carrying V column g(b)·d + j, all of one P·V head."""
    sizes: dict[str, int] = {}
    ids = column_ids(top, sizes)
    if ids is None:
        return "shapes on the v→o path unknown (run shape inference)"
    cols = _follow(ids, v_steps, sizes)  # V column behind each V element
    out_shape = None if cols is None else _broadcast_shape(pv.outputs[0].shape, cols, sizes)
    if cols is None or cols.ndim < 2 or out_shape is None or out_shape[-1] != d:
        return "shapes on the v→o path unknown or inconsistent"
    if not (cols == cols[..., :1, :]).all():
        return "V's sequence axis mixes channels"
    try:
        cols = np.broadcast_to(cols[..., :1, :], out_shape)  # P·V's output element (.., t, j) reads V column
    except ValueError:
        return "shapes on the v→o path inconsistent"
    elems = np.arange(int(np.prod(out_shape))).reshape(out_shape)  # which P·V output element (head row, j)
    o_steps = [(n, n.outputs[0]) for n in o_path[::-1]]
    cols, elems = _follow(cols, o_steps, sizes), _follow(elems, o_steps, sizes)
    if cols is None or elems is None or cols.shape[-1] != k or k % d:
        return "shapes on the v→o path unknown or inconsistent"
    cols, elems = cols.reshape(-1, k // d, d), elems.reshape(-1, k // d, d)
    j = np.arange(d)
    if not (cols == cols[:1]).all() or not (cols % d == j).all() or not (cols // d == cols[..., :1] // d).all():
        return f"o_proj's input channels are not V's columns in whole blocks of head_dim {d}"
    if not (elems % d == j).all() or not (elems // d == elems[..., :1] // d).all():
        return f"o_proj's input blocks of {d} channels do not each come from one attention head"
    return tuple(int(g) for g in cols[0, :, 0] // d)


def _value_heads(o: LinearSite, sites: dict[int, LinearSite], through_cache: bool) -> ValueHeads | str | None:
    path = attention_path(o.activation)
    if path is None:
        return None
    o_path, pv = path
    if pv.op_type in ATTENTION_OPS:
        return f"fused {pv.op_type}: V's rotation cannot be proven to pass through it"
    p, v = pv.inputs[0], pv.inputs[1]
    top, v_steps = column_path(v)
    kv = CachePath.of(top, v_steps)
    if (kv.past or kv.present) and not through_cache:
        return "V is stored in a KV cache, kept as the float model's (--keep-cache-values)"
    if not kv.written_back:
        return ("V joins a past cache (a Concat with a graph input) that the graph does not write back: a rotated "
                "V would meet a past it did not write")
    prod, bias = top.producer(), None
    if prod is not None and prod.op_type == "Add" and prod.domain in ONNX_DOMAINS:
        for i in (0, 1):
            inner = prod.inputs[1 - i]
            if inner is not None and inner.producer() is not None and id(inner.producer()) in sites \
                    and trace_const(prod.inputs[i]) and len(inner.uses()) == 1:
                width = sites[id(inner.producer())].N
                if not _channel_vector(prod.inputs[i], width):
                    return "V's bias is not a constant vector"
                bias, prod = ConstRef(prod, i, -1), inner.producer()
                break
    v_site = sites.get(id(prod)) if prod is not None else None
    if v_site is None:
        return "V is not a layout of a linear layer's output"
    chain = [n for n, _ in v_steps] + [pv] + o_path[::-1]
    inner = v_site.node.outputs[0]
    values = ([inner] if bias is not None else []) + [top] + [out for _, out in v_steps] + \
        [n.outputs[0] for n in [pv] + o_path[::-1]]
    users = ([bias.node] if bias is not None else []) + chain + [o.node]
    present = {id(val) for val in kv.present}  # a present output may have its length read too

    def only_reader(val: ir.Value, user: ir.Node) -> bool:
        uses = data_uses(val) if id(val) in present else val.uses()
        return len(uses) == 1 and uses[0][0] is user and (id(val) in present or not val.is_graph_output())

    if not all(only_reader(val, u) for val, u in zip(values, users)):
        return f"{v_site.name}'s output or the attention output has other consumers"
    if upstream_any(p, lambda val: val.producer() is v_site.node):
        return "the attention probabilities depend on V"
    d = v.shape[-1] if v.shape is not None and len(v.shape) else None
    if not isinstance(d, int):
        return "head_dim unknown (run shape inference)"
    groups = _head_blocks(top, v_steps, pv, o_path, d, o.K)
    if isinstance(groups, str):
        return groups
    return ValueHeads(v_site, bias, o, d, groups, tuple(val.name for val in kv.present))


def find_value_heads(model: ir.Model, through_cache: bool = False) -> tuple[list[ValueHeads], list[Skip]]:
    """Every linear layer reading an attention output, as a v/o pair or a Skip saying why it is none;
    `through_cache`: also pairs whose V is stored in a KV cache (the cache will hold rotated values)."""
    scan = find_linear_sites(model).sites
    sites = {id(s.node): s for s in scan}
    pairs, skipped = [], []
    for o in scan:
        found = _value_heads(o, sites, through_cache)
        if isinstance(found, ValueHeads):
            pairs.append(found)
        elif isinstance(found, str):
            skipped.append(Skip(o.name, o.node.op_type, f"attention output: {found}"))
    logger.info("value heads: %d v/o pairs, %d attention outputs skipped", len(pairs), len(skipped))
    return pairs, skipped
