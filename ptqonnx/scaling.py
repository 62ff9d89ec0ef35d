"""Structural scaling groups: linear layers sharing one activation, and who can absorb a channel scale.

For linear layers Y_i = X W_i reading one activation X [..., K], any positive s [K] gives

    Y_i = (X diag(1/s)) (diag(s) W_i)

so the weights' rows may be scaled by s (AWQ, SmoothQuant) if X's producer absorbs 1/s, leaving the
float graph unchanged. A `ScalingGroup` is X, *all* the given linear sites reading it, and how 1/s is
absorbed (found structurally, never by node names):

* `norm_gamma`: X = Mul(A, γ) with γ a constant whose last axis is K (decomposed RMSNorm's
  `normed * weight`, or any scale by a constant); ONNX `LayerNormalization` (γ, β);
  `SimplifiedLayerNormalization` (ORT runs it in the default domain; com.microsoft accepted too);
  com.microsoft `SkipSimplifiedLayerNormalization` / `SkipLayerNormalization` (output 0 only).
  Absorb: γ /= s (β /= s): X' = normalize(A) γ/s + β/s = X / s.
* `linear_columns`: X = P(Z) (+ constant bias) with P a linear site, or X = Mul(A, P(Z) (+ bias)) with A
  independent of P (LLaMA's down_proj input SiLU(gate) * up). Absorb: W_P[:, j] /= s_j (bias too), since
  (Z W_P diag(1/s)) = P(Z) / s, and A * (B / s) = (A * B) / s.
* attention output (AWQ's "o after v"): X = layout(P·V), V = layout(P_v(Z) (+ bias)) with P_v a linear
  site, the probabilities P independent of P_v and only layout ops (Reshape, Transpose, Squeeze,
  Unsqueeze, Flatten, Identity, Expand) on both paths. P·V is linear in V and mixes only along V's
  sequence axis, so a per-column scale of V reaches the same (head, dim) channel of P·V: `linear_columns`
  into P_v's columns, through the channel map X channel c <- P_v column `channels[c]` (a permutation; see
  `_channel_map`). As llm-awq, grouped-query attention (P_v narrower than X: one V head serves several
  heads) is skipped, and so are fused attention ops, non-layout ops on the path, a V shared with other
  consumers (a KV cache) and maps that are not 1:1, each with a Skip saying which.
* `mul_insert`: anything else but attention outputs (including an X with consumers besides the group's
  sites): a new `Mul(X, 1/s)` feeds only the group's sites.

Only the sites given form groups: a linear consumer of X not in `sites` counts as another consumer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from ptqonnx.graph import FLOAT_TYPES, LinearSite, Skip, find_linear_sites, upstream_any

__all__ = [
    "ATTENTION_SKIP_REASON",
    "ConstRef",
    "ProducerKind",
    "ScalingGroup",
    "find_scaling_groups",
    "trace_const",
]

logger = logging.getLogger(__name__)

ProducerKind = Literal["norm_gamma", "linear_columns", "mul_insert"]

ATTENTION_SKIP_REASON = "attention output"  # prefix of every attention-output Skip's reason

_ONNX = ("", "ai.onnx")
_MS = "com.microsoft"
# op (domain set) -> (gamma input index, beta input index or None)
_NORMS: dict[str, tuple[tuple[str, ...], int, int | None]] = {
    "LayerNormalization": (_ONNX, 1, 2),
    "SimplifiedLayerNormalization": (_ONNX + (_MS,), 1, None),
    "SkipSimplifiedLayerNormalization": ((_MS,), 2, None),
    "SkipLayerNormalization": ((_MS,), 2, 3),
}
_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_REPEAT_OPS = _LAYOUT_OPS | {"Expand"}  # move or repeat elements, never combine them
_PROBE_SIZES = (3, 5, 7, 11, 13)  # sizes given to symbolic dims when following a layout: small, distinct
_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                  "PackedMultiHeadAttention", "SparseAttention"}


@dataclass(frozen=True)
class ConstRef:
    """The constant `node` reads at input `index`, directly or through Cast/Transpose.

    `axis` is the axis of the node's view of that constant that the K channels index (-1 for γ, β and
    biases; 0 or 1 for a 2-D weight as the node sees it, before undoing the stored layout).
    """

    node: ir.Node
    index: int
    axis: int


@dataclass(frozen=True)
class ScalingGroup:
    """Linear sites reading one activation X [..., K] and how X's producer absorbs 1/s."""

    activation: ir.Value
    sites: tuple[LinearSite, ...]
    kind: ProducerKind
    producer: ir.Node | None  # the node whose constants absorb 1/s (None for mul_insert)
    absorb: tuple[ConstRef, ...]  # constants divided by s along their channel axis
    K: int
    channels: tuple[int, ...] | None = None  # producer channel absorbing each s[k] (None: channel k)
    through: ir.Node | None = None  # the P·V MatMul 1/s passes through (attention output), whose V it scales

    def producer_scales(self, s: np.ndarray) -> np.ndarray:
        """s in the producer's channel order (the factor its channel axis absorbs the inverse of)."""
        if self.channels is None:
            return s
        out = np.empty_like(s)
        out[list(self.channels)] = s
        return out

    @property
    def name(self) -> str:
        """The activation's name: the key of this group's scale (and of its statistics)."""
        return self.activation.name or ""

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def trace_const(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """Follow float Cast / 2-D Transpose back to an initializer: (initializer, chain nodes, node-side first)."""
    chain: list[ir.Node] = []
    v = value
    for _ in range(4):
        if v is None or v.is_graph_input():
            return None
        if v.const_value is not None:
            return (v, chain) if v.is_initializer() else None
        prod = v.producer()
        if prod is None or prod.domain not in _ONNX:
            return None
        if prod.op_type == "Cast" and _attr(prod, "to", None) in {int(t) for t in FLOAT_TYPES}:
            pass
        elif prod.op_type == "Transpose" and (_attr(prod, "perm", None) in (None, [1, 0], (1, 0))):
            pass
        else:
            return None
        chain.append(prod)
        v = prod.inputs[0]
    return None


def _channel_vector(value: ir.Value | None, k: int) -> bool:
    """A constant (maybe via Cast) with last axis K and no other non-unit axis: broadcasts as [K]."""
    found = trace_const(value)
    if found is None or any(n.op_type == "Transpose" for n in found[1]):
        return False
    shape = tuple(found[0].const_value.shape)
    return len(shape) >= 1 and shape[-1] == k and all(d == 1 for d in shape[:-1])


def _depends_on(value: ir.Value, target: ir.Node) -> bool:
    """Whether `value` is computed (transitively) from `target`'s outputs."""
    return upstream_any(value, lambda v: v.producer() is target)


def _only_consumer(value: ir.Value, node: ir.Node) -> bool:
    uses = list(value.uses())
    return not value.is_graph_output() and len(uses) == 1 and uses[0][0] is node


def _linear_output(
    value: ir.Value, k: int, producers: dict[int, LinearSite]
) -> tuple[ir.Node, list[ConstRef]] | None:
    """value = P(Z) or Add(P(Z), c) with P a linear site of N = K whose output feeds only that path."""
    prod = value.producer()
    if prod is None:
        return None
    bias: list[ConstRef] = []
    if prod.op_type == "Add" and prod.domain in _ONNX:
        for i in (0, 1):
            inner, c = prod.inputs[i], prod.inputs[1 - i]
            if inner is not None and inner.producer() is not None and id(inner.producer()) in producers \
                    and _channel_vector(c, k) and _only_consumer(inner, prod):
                bias = [ConstRef(prod, 1 - i, -1)]
                prod = inner.producer()
                break
        else:
            return None
    site = producers.get(id(prod))
    if site is None or site.N != k:
        return None
    gemm_trans_b = prod.op_type == "Gemm" and bool(_attr(prod, "transB", 0))
    refs = [ConstRef(prod, 1, 0 if gemm_trans_b else 1)]  # N axis of the node's view of W
    if site.bias is not None:
        refs.append(ConstRef(prod, 2, -1))
    return prod, refs + bias


def _attention_path(x: ir.Value) -> tuple[list[ir.Node], ir.Node] | None:
    """X = layout(A) with A an attention op's or an activation x activation MatMul's output: (layout nodes
    from X back, that node), else None."""
    v, path = x, []
    for _ in range(8):
        prod = v.producer()
        if prod is None:
            return None
        if prod.op_type in _ATTENTION_OPS:
            return path, prod
        if prod.op_type in ("MatMul", "Gemm") and prod.domain in _ONNX:
            return (path, prod) if all(trace_const(i) is None for i in prod.inputs[:2]) else None
        if prod.op_type not in _LAYOUT_OPS or prod.domain not in _ONNX:
            return None
        path.append(prod)
        v = prod.inputs[0]
    return None


def _v_path(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow V back through element-moving ops (and a Concat with graph inputs, a KV cache): (the first
    value made otherwise, the nodes from there towards V)."""
    path: list[ir.Node] = []
    for _ in range(12):
        prod = v.producer()
        if prod is None or prod.domain not in _ONNX:
            break
        if prod.op_type in _REPEAT_OPS:
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
                perm = _attr(node, "perm", None)
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


def _channel_map(top: ir.Value, k: int, v_path: list[ir.Node], pv: ir.Node,
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
    ids = _follow(np.broadcast_to(np.arange(k), shape), v_path, sizes)
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


def _attention_producer(
    k: int, producers: dict[int, LinearSite], o_path: list[ir.Node], pv: ir.Node
) -> tuple[ir.Node, list[ConstRef], tuple[int, ...] | None] | str:
    """X = layout(P·V) with V a layout of a linear site's output: (that node, its refs, the channel map or
    None for the identity), or the reason a per-channel scale does not pass to it."""
    if pv.op_type in _ATTENTION_OPS:
        return f"fused {pv.op_type} (the scale cannot pass through it)"
    p, v = pv.inputs[0], pv.inputs[1]
    top, v_path = _v_path(v)
    width = top.shape[-1] if top.shape is not None and len(top.shape) else None
    found = _linear_output(top, width, producers) if isinstance(width, int) else None
    if found is None:
        stop = top.producer().op_type if top.producer() is not None else "a graph input"
        return f"V is not a layout of a linear layer's output (reached {stop})"
    node, refs = found
    site = producers[id(node)]
    if site.N != k:
        kind = "grouped-query attention" if k % site.N == 0 else "V narrower than the attention output"
        return (f"{kind} ({site.weight_name or site.name} {site.N} outputs, this layer reads {k}): per-channel "
                "scales don't pass (as llm-awq)")
    if any(n.op_type == "Concat" for n in v_path):
        return "V also holds tensors from outside (a KV cache Concat) that would not carry the scale"
    chain = v_path + [pv] + o_path[::-1]  # from P_v's output to X
    if not all(_only_consumer(val, user) for val, user in zip([top] + [n.outputs[0] for n in chain], chain)):
        return f"{site.name}'s output or the attention output has other consumers (the fold would change them)"
    if _depends_on(p, node):
        return "the attention probabilities depend on V (P·V is not linear in V)"
    mapped = _channel_map(top, k, v_path, pv, o_path)
    if isinstance(mapped, str):
        return mapped
    return node, refs, None if mapped == tuple(range(k)) else mapped


def _producer(
    x: ir.Value, k: int, producers: dict[int, LinearSite]
) -> tuple[ProducerKind, ir.Node, list[ConstRef]] | None:
    prod = x.producer()
    if prod is None:
        return None
    op = prod.op_type
    if op in _NORMS and prod.domain in _NORMS[op][0]:
        _, gi, bi = _NORMS[op]
        axis, rank = _attr(prod, "axis", -1), (len(x.shape) if x.shape is not None else None)
        if prod.outputs[0] is not x or axis != -1 and (rank is None or axis != rank - 1):
            return None  # Skip*Norm: only output 0 is the normalized tensor; γ must span the last axis only
        refs = [ConstRef(prod, gi, -1)]
        if bi is not None and len(prod.inputs) > bi and prod.inputs[bi] is not None:
            refs.append(ConstRef(prod, bi, -1))
        if all(_channel_vector(prod.inputs[r.index], k) for r in refs):
            return "norm_gamma", prod, refs
        return None
    if op == "Mul" and prod.domain in _ONNX:
        for i in (1, 0):  # γ is usually the second operand, but the exporter writes Mul(γ, normed)
            if _channel_vector(prod.inputs[i], k) and trace_const(prod.inputs[1 - i]) is None:
                return "norm_gamma", prod, [ConstRef(prod, i, -1)]
        for i in (1, 0):
            b, a = prod.inputs[i], prod.inputs[1 - i]
            found = _linear_output(b, k, producers)
            if found is not None and _only_consumer(b, prod) and not _depends_on(a, found[0]):
                return "linear_columns", found[0], found[1]
        return None
    found = _linear_output(x, k, producers)
    return None if found is None else ("linear_columns", found[0], found[1])


def find_scaling_groups(model: ir.Model, sites: list[LinearSite]) -> tuple[list[ScalingGroup], list[Skip]]:
    """Group `sites` by activation (graph order) and find how each activation's producer absorbs 1/s.

    Returns the groups and one Skip per site left out (attention outputs whose scale cannot reach v's columns).
    """
    by_x: dict[int, list[LinearSite]] = {}
    for site in sites:
        by_x.setdefault(id(site.activation), []).append(site)
    producers = {id(s.node): s for s in find_linear_sites(model).sites}  # any linear site may absorb
    groups: list[ScalingGroup] = []
    skipped: list[Skip] = []
    for members in by_x.values():
        x, k = members[0].activation, members[0].K
        member_nodes = {id(s.node) for s in members}
        private = not x.is_graph_output() and all(
            idx == 0 and id(n) in member_nodes for n, idx in x.uses()
        )
        attention, channels = _attention_path(x), None
        if attention is not None:
            found = (_attention_producer(k, producers, *attention) if private
                     else "the attention output has other consumers")
            if isinstance(found, str):
                reason = f"{ATTENTION_SKIP_REASON}: {found}"
                logger.debug("%s: not scaled: %s", [s.name for s in members], reason)
                skipped += [Skip(s.name, s.node.op_type, reason) for s in members]
                continue
            prod, refs, channels = found
            kind = "linear_columns"
        else:
            found = _producer(x, k, producers) if private else None
            kind, prod, refs = ("mul_insert", None, []) if found is None else found
        group = ScalingGroup(x, tuple(members), kind, prod, tuple(refs), k, channels,
                             attention[1] if attention is not None else None)
        logger.debug("scaling group %s: %s via %s (%s)", group.name, group.site_names, kind,
                     prod.name if prod is not None else "inserted Mul")
        groups.append(group)
    logger.info("scaling groups: %d (%s); %d sites skipped", len(groups),
                ", ".join(f"{n} {g}" for g, n in _count(groups)), len(skipped))
    return groups, skipped


def _count(groups: list[ScalingGroup]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for g in groups:
        out[g.kind] = out.get(g.kind, 0) + 1
    return sorted(out.items())
