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
* `mul_insert`: anything else (including an X with consumers besides the group's sites): a new
  `Mul(X, 1/s)` feeds only the group's sites.

The attention output (o_proj reading softmax(QKᵀ)V through Transpose/Reshape) is reported as a skip:
folding into v_proj's columns needs a per-head passthrough that is not implemented.
Only the sites given form groups: a linear consumer of X not in `sites` counts as another consumer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from ptqonnx.graph import FLOAT_TYPES, LinearSite, Skip, find_linear_sites

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

ATTENTION_SKIP_REASON = "attention output: not folded (v→o scale passthrough not implemented)"

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
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        prod = v.producer() if v is not None else None
        if prod is None or id(prod) in seen:
            continue
        if prod is target:
            return True
        seen.add(id(prod))
        stack.extend(i for i in prod.inputs if i is not None)
    return False


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


def _is_attention_output(x: ir.Value) -> bool:
    v = x
    for _ in range(8):
        prod = v.producer()
        if prod is None:
            return False
        if prod.op_type in _ATTENTION_OPS:
            return True
        if prod.op_type in ("MatMul", "Gemm") and prod.domain in _ONNX:
            return all(trace_const(i) is None for i in prod.inputs[:2])
        if prod.op_type not in _LAYOUT_OPS:
            return False
        v = prod.inputs[0]
    return False


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

    Returns the groups and one Skip per site left out (attention outputs).
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
        if _is_attention_output(x):
            skipped += [Skip(s.name, s.node.op_type, ATTENTION_SKIP_REASON) for s in members]
            continue
        found = _producer(x, k, producers) if private else None
        if found is None:
            kind, prod, refs = "mul_insert", None, []
        else:
            kind, prod, refs = found
        group = ScalingGroup(x, tuple(members), kind, prod, tuple(refs), k)
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
