"""Structural scaling groups: linear layers sharing one activation, and who can absorb a channel scale.

For linear layers Y_i = X W_i reading one activation X [..., K], any positive s [K] gives

    Y_i = (X diag(1/s)) (diag(s) W_i)

so the weights' rows may be scaled by s (AWQ, SmoothQuant) if X's producer absorbs 1/s, leaving the
float graph unchanged. A `ScalingGroup` is X, *all* the given linear sites reading it, and how 1/s is
absorbed (found structurally, never by node names):

* `norm_gamma`: X = Mul(A, γ) with γ a constant whose last axis is K (decomposed RMSNorm's
  `normed * weight`, or any scale by a constant; Gemma's `normed * (1 + γ)` is exported with 1 + γ
  already folded into one constant, which is the one divided); ONNX `LayerNormalization` (γ, β: GPT-2,
  OPT, Phi, GPT-NeoX); `SimplifiedLayerNormalization` (ORT runs it in the default domain; com.microsoft
  accepted too); com.microsoft `SkipSimplifiedLayerNormalization` / `SkipLayerNormalization` (output 0
  only). Absorb: γ /= s (β /= s): X' = normalize(A) γ/s + β/s = X / s.
* `linear_columns`: X = P(Z) (+ constant bias) with P a linear site, or X = Mul(A, P(Z) (+ bias)) with A
  independent of P (LLaMA's down_proj input SiLU(gate) * up). Absorb: W_P[:, j] /= s_j (bias too), since
  (Z W_P diag(1/s)) = P(Z) / s, and A * (B / s) = (A * B) / s. The P(Z) of a fused projection may be a
  part of P's columns (Phi-3's gate_up_proj: up = Split(P(Z))[1]): then only those columns are divided
  (`channels`, `width`) and A may read P's *other* columns (gate), which never see s.
* attention output (AWQ's "o after v"): X = layout(P·V), V = path(P_v(Z) (+ bias)) with P_v a linear
  site, the probabilities P independent of V's columns and only layout ops (Reshape, Transpose, Squeeze,
  Unsqueeze, Flatten, Identity, Expand) and selections (Slice, Split: a fused qkv's V part, Phi-3,
  GPT-2, GPT-NeoX) on both paths. P·V is linear in V and mixes only along V's sequence axis, so a
  per-column scale of V reaches the same (head, dim) channel of P·V: `linear_columns` into P_v's
  columns, through the channel map X channel c <- P_v column `channels[c]` (see
  `ptqonnx.graph.attention`). As llm-awq, grouped-query attention (V narrower than X: one V head serves
  several heads) is skipped, and so are fused attention ops, non-layout ops on the path, a V shared with
  other consumers (a KV cache) and maps that are not 1:1, each with a Skip saying which.
* `mul_insert`: anything else but attention outputs (including an X with consumers besides the group's
  sites; a `Shape` reader does not count, a scale leaves the shape as it is): a new `Mul(X, 1/s)` feeds
  only the group's sites (exact too; e.g. after GELU, which s does not pass through).

Between X and its producer the matches look through `Relu` (relu(y)/s = relu(y/s) for s > 0: OPT's fc2
folds into fc1's columns) and through a `Reshape` keeping the last axis K (a channel stays a channel:
GPT-2's Conv1D runs on [batch*sequence, K]), each the only reader of its input.

Only the sites given form groups: a linear consumer of X not in `sites` counts as another consumer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.attention import (
    ATTENTION_OPS, SELECT_OPS, CachePath, attention_path, channel_map, column_path, row_columns, trace_columns,
)
from ptqonnx.graph.sites import LinearSite, Skip, find_linear_sites
from ptqonnx.graph.trace import ONNX_DOMAINS, attr, data_uses, gemm_trans_b, trace_const, upstream_any

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
    width: int | None = None  # the producer's channel count when `channels` index a wider one (a fused part)
    cache_outputs: tuple[str, ...] = ()  # KV-cache present outputs holding V, scaled with it (V / s)

    def producer_scales(self, s: np.ndarray) -> np.ndarray:
        """s in the producer's channel order (the factor its channel axis absorbs the inverse of); 1 on the
        producer channels X does not carry (a fused projection's other parts)."""
        if self.channels is None:
            return s
        out = np.ones(self.width or self.K, dtype=s.dtype)
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


def _depends_on(value: ir.Value, target: ir.Node, stop: frozenset[int] = frozenset()) -> bool:
    """Whether `value` is computed (transitively) from `target`'s outputs, not counting what it reads through
    the values in `stop` (by id: a fused projection's other parts)."""
    return upstream_any(value, lambda v: v.producer() is target, stop)


def _only_consumer(value: ir.Value, node: ir.Node) -> bool:
    uses = data_uses(value)
    return not value.is_graph_output() and len(uses) == 1 and uses[0][0] is node


def _last_dim(value: ir.Value) -> int | None:
    d = value.shape[-1] if value.shape is not None and len(value.shape) else None
    return d if isinstance(d, int) else None


@dataclass(frozen=True)
class _Absorb:
    """How a producer absorbs 1/s: a ScalingGroup's kind, producer, absorb, channels, width."""

    kind: ProducerKind
    producer: ir.Node
    refs: tuple[ConstRef, ...]
    channels: tuple[int, ...] | None = None
    width: int | None = None
    stop: frozenset[int] = frozenset()  # values holding the producer's other columns (not scaled)
    cache: tuple[str, ...] = ()  # KV-cache present outputs on V's path (they will hold V / s)


def _peel(value: ir.Value, k: int, end: ir.Node | None) -> tuple[ir.Value, ir.Node | None]:
    """Back through Relu and last-axis-keeping Reshapes, each its input's only reader: (value, its reader)."""
    for _ in range(4):
        prod = value.producer()
        inner = prod.inputs[0] if prod is not None and prod.domain in ONNX_DOMAINS and prod.inputs else None
        if inner is None or not _only_consumer(inner, prod):
            break
        if prod.op_type == "Relu" or prod.op_type == "Reshape" and _last_dim(inner) == k == _last_dim(value):
            value, end = inner, prod
        else:
            break
    return value, end


def _linear_output(
    value: ir.Value, k: int, producers: dict[int, LinearSite]
) -> tuple[ir.Node, tuple[ConstRef, ...]] | None:
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
    return prod, tuple(refs + bias)


def _columns_source(value: ir.Value, k: int, producers: dict[int, LinearSite], end: ir.Node) -> _Absorb | None:
    """value (read by `end`) = [Relu/Reshape of] P(Z) (+ bias), or a selection of P(Z)'s columns (Slice / Split,
    through layout ops) that no other reader of P(Z) shares: how P's columns absorb 1/s."""
    value, end = _peel(value, k, end)
    found = _linear_output(value, k, producers)
    if found is not None:
        return _Absorb("linear_columns", *found)
    top, steps = column_path(value)
    width = _last_dim(top)
    if width is None or not any(n.op_type in SELECT_OPS for n, _ in steps) \
            or any(n.op_type in ("Concat", "Expand") for n, _ in steps):
        return None
    found = _linear_output(top, width, producers)
    trace = trace_columns(top, steps) if found is not None else None
    if trace is None or isinstance(trace, str):
        return None
    channels, siblings = row_columns(trace, k), trace.siblings(end)
    if isinstance(channels, str) or isinstance(siblings, str):
        logger.debug("%s: no column fold into %s: %s", value.name, found[0].name,
                     channels if isinstance(channels, str) else siblings)
        return None
    return _Absorb("linear_columns", *found, channels=channels, width=width,
                   stop=frozenset(id(v) for v in siblings))


def _attention_producer(
    k: int, producers: dict[int, LinearSite], o_path: list[ir.Node], pv: ir.Node, through_cache: bool = False
) -> _Absorb | str:
    """X = layout(P·V) with V a layout or selection of a linear site's output: how that site's columns absorb
    1/s, or the reason a per-channel scale does not pass to it. With `through_cache`, V may be stored in a KV
    cache (a present output on V's path, after a Concat with the past or not): the cache then holds V / s, exact
    for a past this model wrote (as `ptqonnx.graph.value_heads` for R2)."""
    if pv.op_type in ATTENTION_OPS:
        return f"fused {pv.op_type} (the scale cannot pass through it)"
    p, v = pv.inputs[0], pv.inputs[1]
    top, steps = column_path(v)
    width = _last_dim(top)
    found = _linear_output(top, width, producers) if width is not None else None
    if found is None:
        stop = top.producer().op_type if top.producer() is not None else "a graph input"
        return f"V is not a layout of a linear layer's output (reached {stop})"
    node, refs = found
    site = producers[id(node)]
    kv = CachePath.of(top, steps)
    if kv.past and not through_cache:
        return ("V also holds tensors from outside (a KV cache Concat) that would not carry the scale "
                "(--keep-cache-values)")
    if not kv.written_back:
        return "V joins a past cache (a Concat with a graph input) that the graph does not write back"
    # a present output without a past (a no-past twin of a with-past graph) is not let change: its scale, searched
    # on this graph's data, need not be the one the twin folds
    cache = frozenset(id(v) for v in kv.present) if through_cache and kv.past else frozenset()
    trace = trace_columns(top, steps)
    if isinstance(trace, str) and not (width == site.N and site.N < k):
        return trace
    n_v = int(trace.columns.size) if not isinstance(trace, str) else site.N  # an unfollowed GQA repeat: V is all
    if n_v != k:  # of P_v's columns
        kind = "grouped-query attention" if k % n_v == 0 else "V narrower than the attention output"
        name = site.weight_name or site.name
        what = f"{name} {site.N} outputs" if n_v == site.N else f"V is {n_v} of {name}'s {site.N} outputs"
        return f"{kind} ({what}, this layer reads {k}): per-channel scales don't pass (as llm-awq)"
    siblings = trace.siblings(pv, cache)
    post = [pv] + o_path[::-1]  # from P·V to X
    if isinstance(siblings, str) or not all(_only_consumer(a.outputs[0], b) for a, b in zip(post, post[1:])):
        return f"{site.name}'s output or the attention output has other consumers (the fold would change them)"
    stop = frozenset(id(s) for s in siblings)
    if _depends_on(p, node, stop):
        return "the attention probabilities depend on V (P·V is not linear in V)"
    mapped = channel_map(trace, k, pv, o_path)
    if isinstance(mapped, str):
        return mapped
    identity = width == k and mapped == tuple(range(k))
    return _Absorb("linear_columns", node, refs, None if identity else mapped, None if width == k else width, stop,
                   tuple(v.name for v in kv.present) if cache else ())


def _producer(x: ir.Value, k: int, producers: dict[int, LinearSite]) -> _Absorb | None:
    x, _ = _peel(x, k, None)
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
            return _Absorb("norm_gamma", prod, tuple(refs))
        return None
    if op == "Mul" and prod.domain in ONNX_DOMAINS:
        for i in (1, 0):  # γ is usually the second operand, but the exporter writes Mul(γ, normed)
            if _channel_vector(prod.inputs[i], k) and not trace_const(prod.inputs[1 - i]):
                return _Absorb("norm_gamma", prod, (ConstRef(prod, i, -1),))
        for i in (1, 0):
            b, a = prod.inputs[i], prod.inputs[1 - i]
            if b is None or a is None or not _only_consumer(b, prod):
                continue
            found = _columns_source(b, k, producers, prod)
            if found is not None and not _depends_on(a, found.producer, found.stop):
                return found
        return None
    found = _linear_output(x, k, producers)
    return None if found is None else _Absorb("linear_columns", *found)


def find_scaling_groups(model: ir.Model, sites: list[LinearSite],
                        through_cache: bool = False) -> tuple[list[ScalingGroup], list[Skip]]:
    """Group `sites` by activation (graph order) and find how each activation's producer absorbs 1/s;
    `through_cache`: also through a V stored in a KV cache (`_attention_producer`).

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
            idx == 0 and id(n) in member_nodes for n, idx in data_uses(x)
        )
        attention = attention_path(x)
        if attention is not None:
            found = (_attention_producer(k, producers, *attention, through_cache) if private
                     else "the attention output has other consumers")
            if isinstance(found, str):
                reason = f"{ATTENTION_SKIP_REASON}: {found}"
                logger.debug("%s: not scaled: %s", [s.name for s in members], reason)
                skipped += [Skip(s.name, s.node.op_type, reason) for s in members]
                continue
        else:
            found = _producer(x, k, producers) if private else None
        if found is None:
            group = ScalingGroup(x, tuple(members), "mul_insert", None, (), k)
        else:
            group = ScalingGroup(x, tuple(members), found.kind, found.producer, found.refs, k, found.channels,
                                 attention[1] if attention is not None else None, found.width, found.cache)
        logger.debug("scaling group %s: %s via %s (%s)", group.name, group.site_names, group.kind,
                     group.producer.name if group.producer is not None else "inserted Mul")
        groups.append(group)
    logger.info("scaling groups: %d (%s); %d sites skipped", len(groups),
                ", ".join(f"{n} {g}" for g, n in _count(groups)), len(skipped))
    return groups, skipped


def _count(groups: list[ScalingGroup]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for g in groups:
        out[g.kind] = out.get(g.kind, 0) + 1
    return sorted(out.items())
