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
  `ptqonnx.graph.attention.channel_map`). As llm-awq, grouped-query attention (P_v narrower than X: one V head serves several
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

from ptqonnx.graph.attention import ATTENTION_OPS, attention_path, channel_map, v_path
from ptqonnx.graph.sites import LinearSite, Skip, find_linear_sites
from ptqonnx.graph.trace import ONNX_DOMAINS, attr, gemm_trans_b, trace_const, upstream_any

__all__ = [
    "ATTENTION_SKIP_REASON",
    "ConstRef",
    "ProducerKind",
    "ScalingGroup",
    "find_scaling_groups",
]

logger = logging.getLogger(__name__)

ProducerKind = Literal["norm_gamma", "linear_columns", "mul_insert"]

ATTENTION_SKIP_REASON = "attention output"  # prefix of every attention-output Skip's reason

_MS = "com.microsoft"
# op (domain set) -> (gamma input index, beta input index or None)
_NORMS: dict[str, tuple[tuple[str, ...], int, int | None]] = {
    "LayerNormalization": (ONNX_DOMAINS, 1, 2),
    "SimplifiedLayerNormalization": (ONNX_DOMAINS + (_MS,), 1, None),
    "SkipSimplifiedLayerNormalization": ((_MS,), 2, None),
    "SkipLayerNormalization": ((_MS,), 2, 3),
}
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


def _channel_vector(value: ir.Value | None, k: int) -> bool:
    """A constant (maybe via Cast) with last axis K and no other non-unit axis: broadcasts as [K]."""
    found = trace_const(value)
    if not found or any(n.op_type == "Transpose" for n in found.chain):
        return False
    shape = tuple(found.initializer.const_value.shape)
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
    if prod.op_type == "Add" and prod.domain in ONNX_DOMAINS:
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
    refs = [ConstRef(prod, 1, 0 if gemm_trans_b(prod) else 1)]  # N axis of the node's view of W
    if site.bias is not None:
        refs.append(ConstRef(prod, 2, -1))
    return prod, refs + bias


def _attention_producer(
    k: int, producers: dict[int, LinearSite], o_path: list[ir.Node], pv: ir.Node
) -> tuple[ir.Node, list[ConstRef], tuple[int, ...] | None] | str:
    """X = layout(P·V) with V a layout of a linear site's output: (that node, its refs, the channel map or
    None for the identity), or the reason a per-channel scale does not pass to it."""
    if pv.op_type in ATTENTION_OPS:
        return f"fused {pv.op_type} (the scale cannot pass through it)"
    p, v = pv.inputs[0], pv.inputs[1]
    top, v_nodes = v_path(v)
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
    if any(n.op_type == "Concat" for n in v_nodes):
        return "V also holds tensors from outside (a KV cache Concat) that would not carry the scale"
    chain = v_nodes + [pv] + o_path[::-1]  # from P_v's output to X
    if not all(_only_consumer(val, user) for val, user in zip([top] + [n.outputs[0] for n in chain], chain)):
        return f"{site.name}'s output or the attention output has other consumers (the fold would change them)"
    if _depends_on(p, node):
        return "the attention probabilities depend on V (P·V is not linear in V)"
    mapped = channel_map(top, k, v_nodes, pv, o_path)
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
        axis, rank = attr(prod, "axis", -1), (len(x.shape) if x.shape is not None else None)
        if prod.outputs[0] is not x or axis != -1 and (rank is None or axis != rank - 1):
            return None  # Skip*Norm: only output 0 is the normalized tensor; γ must span the last axis only
        refs = [ConstRef(prod, gi, -1)]
        if bi is not None and len(prod.inputs) > bi and prod.inputs[bi] is not None:
            refs.append(ConstRef(prod, bi, -1))
        if all(_channel_vector(prod.inputs[r.index], k) for r in refs):
            return "norm_gamma", prod, refs
        return None
    if op == "Mul" and prod.domain in ONNX_DOMAINS:
        for i in (1, 0):  # γ is usually the second operand, but the exporter writes Mul(γ, normed)
            if _channel_vector(prod.inputs[i], k) and not trace_const(prod.inputs[1 - i]):
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
        attention, channels = attention_path(x), None
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
