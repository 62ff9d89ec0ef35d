"""The residual stream of a pre-norm decoder, found structurally (for QuaRot / SpinQuant rotations).

Rotating the residual stream (QuaRot's / SpinQuant's R1) is exact only if every reader of every stream value
commutes with x ↦ x Q. Walking from the embedding Gather's output, each stream value may be read by

* an RMSNorm: decomposed `Pow(x, 2)` (or `Mul(x, x)`) → `ReduceMean` over the last axis → [`Add` ε] →
  `Sqrt` → `Reciprocal` + `Mul(x, ·)` (or `Div(x, ·)`) → [`Mul` γ], or one `SimplifiedLayerNormalization` /
  `RMSNormalization` over the last axis. Without γ it commutes: rms(x Q) = ‖x Q‖/√H = rms(x), so
  norm(x Q) = norm(x) Q. Its output must be read only by linear layers (they absorb Qᵀ);
* a residual `Add(x, P(h) [+ b])` with P a linear layer (o_proj, down_proj) writing H channels and read by
  nothing else: it becomes the next stream value;
* a `Mul(x, c)` by a scalar constant (an embedding scale): also the next stream value.

The stream ends at a value read only by norms (the final norm, whose readers include the LM head). Anything
else is refused with the reason (`Refusal`): LayerNorm (it subtracts the mean, which does not commute with
Q; SliceGPT's construction would be needed), fused Skip*Norm ops, a stream value that is a graph output,
norms whose γ is not a constant vector, norm outputs read by something other than a linear layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.scaling import ConstRef, _channel_vector
from ptqonnx.graph.sites import LinearSite, find_embedding_gathers, find_linear_sites
from ptqonnx.graph.trace import FLOAT_TYPES, ONNX_DOMAINS, Refusal, attr, data_uses, trace_const

__all__ = ["LAYERNORM_REASON", "StreamNorm", "StreamWriter", "ResidualStream", "find_residual_stream"]

logger = logging.getLogger(__name__)

LAYERNORM_REASON = ("LayerNorm subtracts the mean, which does not commute with a rotation (SliceGPT's "
                    "construction would be needed; not implemented)")
_NORM_CAST_TYPES = (*FLOAT_TYPES, ir.DataType.DOUBLE)  # what an fp16/bf16 model's norm upcasts its input to
_FUSED_NORMS = {"SimplifiedLayerNormalization": ONNX_DOMAINS + ("com.microsoft",), "RMSNormalization": ONNX_DOMAINS}


@dataclass(frozen=True)
class StreamNorm:
    """An RMSNorm reading the stream: output = x / rms(x) [⊙ γ], read only by `readers`."""

    input: ir.Value
    output: ir.Value
    gamma: ConstRef | None  # the γ constant (None: the norm has no γ)
    readers: tuple[LinearSite, ...]


@dataclass(frozen=True)
class StreamWriter:
    """A linear layer added into the stream: next = x + P(h) [+ bias]."""

    site: LinearSite
    bias: ConstRef | None  # a constant [H] added between the site and the residual Add (Gemm's C: site.bias)
    add: ir.Node


@dataclass(frozen=True)
class ResidualStream:
    embedding: ir.Node  # Gather(E [V, H], ids)
    hidden: int
    values: tuple[ir.Value, ...]
    norms: tuple[StreamNorm, ...]  # graph order; the last one is the final norm
    writers: tuple[StreamWriter, ...]

    @property
    def head(self) -> LinearSite | None:
        return next((r for r in self.norms[-1].readers if r.is_lm_head), None)

    @property
    def tied(self) -> bool:
        """Whether the LM head reads the embedding table itself."""
        head = self.head
        return head is not None and head.weight_source is self.embedding.inputs[0]


def _who(node: ir.Node) -> str:
    """A node in words: its op and name (or, unnamed, its first output)."""
    return f"{node.op_type} {node.name}" if node.name else f"{node.op_type} (-> {node.outputs[0].name})"


def _const_equals(value: ir.Value | None, target: float) -> bool:
    found = trace_const(value)
    return bool(found) and found.initializer.const_value.size == 1 and \
        float(np.asarray(found.initializer.const_value.numpy()).reshape(-1)[0]) == target


def _sole_consumer(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    uses = data_uses(value)
    if value.is_graph_output() or len(uses) != 1:
        return None
    node = uses[0][0]
    return node if node.op_type in op_types and node.domain in ONNX_DOMAINS else None


def _last_axis(node: ir.Node, x: ir.Value) -> bool:
    """Whether a ReduceMean reduces exactly the last axis of x and keeps it."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        found = trace_const(node.inputs[1])
        axes = np.asarray(found.initializer.const_value.numpy()).reshape(-1).tolist() if found else None
    rank = len(x.shape) if x.shape is not None else None
    last = axes is not None and len(axes) == 1 and (axes[0] == -1 or rank is not None and axes[0] == rank - 1)
    return last and attr(node, "keepdims", 1) == 1


def _rms_of(x: ir.Value, square: ir.Node) -> tuple[ir.Node, ir.Value] | Refusal:
    """From x's square: the node computing x / rms(x) and its output, or why it is not an RMSNorm."""
    mean = _sole_consumer(square.outputs[0], ("ReduceMean",))
    if mean is None or not _last_axis(mean, x):
        return Refusal(f"{_who(square)}: x² is not averaged over the last axis alone (not an RMSNorm)")
    v = mean.outputs[0]
    eps = _sole_consumer(v, ("Add",))
    if eps is not None:
        if not trace_const(eps.inputs[1 if eps.inputs[0] is v else 0]):
            return Refusal(f"{_who(eps)}: ε of the norm is not a constant")
        v = eps.outputs[0]
    sqrt = _sole_consumer(v, ("Sqrt",))
    if sqrt is None:
        return Refusal(f"{_who(mean)}: the mean square is not followed by Sqrt (not an RMSNorm)")
    nxt = _sole_consumer(sqrt.outputs[0], ("Reciprocal", "Div", "Mul"))
    if nxt is not None and nxt.op_type == "Div" and nxt.inputs[0] is x and nxt.inputs[1] is sqrt.outputs[0]:
        return nxt, nxt.outputs[0]  # x / sqrt(...)
    one_over = nxt is not None and nxt.op_type == "Div" and _const_equals(nxt.inputs[0], 1.0)
    if nxt is not None and (nxt.op_type == "Reciprocal" or one_over and nxt.inputs[1] is sqrt.outputs[0]):
        mul = _sole_consumer(nxt.outputs[0], ("Mul",))
        if mul is not None and x in mul.inputs:
            return mul, mul.outputs[0]
    return Refusal(f"{_who(sqrt)}: x is not divided by the root mean square (not an RMSNorm)")


def _is_float_cast(node: ir.Node) -> bool:
    return node.op_type == "Cast" and node.domain in ONNX_DOMAINS and attr(node, "to", 0) in _NORM_CAST_TYPES


def _is_noop_cast(node: ir.Node, dtype: ir.DataType) -> bool:
    """A Cast of a stream value of type `dtype` to that type (an identity)."""
    return _is_float_cast(node) and attr(node, "to", 0) == int(dtype)


def _float_cast(value: ir.Value) -> ir.Node | None:
    """The Cast to a float type that is `value`'s only reader (fp16 models' norms compute in float32)."""
    node = _sole_consumer(value, ("Cast",))
    return node if node is not None and _is_float_cast(node) else None


def _norm(x: ir.Value, node: ir.Node, hidden: int, sites: dict[int, LinearSite],
          stream: ir.Value | None = None) -> tuple[StreamNorm, set[int]] | Refusal:
    """The RMSNorm starting at `node` (a reader of x) and the ids of its nodes reading x. `stream`: the stream
    value when x is its float cast (the norm is then Cast -> RMSNorm -> Cast [-> Mul γ], as transformers writes
    it for fp16 and bf16 models: casts commute with the rotation)."""
    reads = {id(node)}
    if node.op_type in _FUSED_NORMS and node.domain in _FUSED_NORMS[node.op_type]:
        if node.inputs[0] is not x or attr(node, "axis", -1) not in (-1, len(x.shape or ()) - 1):
            return Refusal(f"{_who(node)} does not normalize x over its last axis")
        gamma_ref = ConstRef(node, 1, -1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return Refusal(f"{_who(node)} has a bias")
        out = node.outputs[0]
    else:
        found = _rms_of(x, node)
        if not found:
            return found
        divide, out = found
        reads.add(id(divide))
        gamma_ref = None
        back = _float_cast(out)
        if back is not None:
            out = back.outputs[0]
        mul = _sole_consumer(out, ("Mul",))
        if mul is not None:  # γ: x / rms(x) ⊙ γ
            gamma_ref, out = ConstRef(mul, 1 if mul.inputs[0] is out else 0, -1), mul.outputs[0]
    if gamma_ref is not None and not _channel_vector(gamma_ref.node.inputs[gamma_ref.index], hidden):
        return Refusal(f"{_who(gamma_ref.node)}: γ of the norm is not a constant vector of length {hidden}")
    if out.is_graph_output():
        return Refusal(f"norm output {out.name} is a graph output (a rotation would change it)")
    readers = []
    for user, idx in data_uses(out):
        site = sites.get(id(user))
        if site is None or idx != 0 or site.K != hidden:
            return Refusal(f"norm output {out.name} is read by {_who(user)}, not a linear layer")
        readers.append(site)
    return StreamNorm(stream if stream is not None else x, out, gamma_ref, tuple(readers)), reads


def _writer(add: ir.Node, x: ir.Value, hidden: int, sites: dict[int, LinearSite]) -> StreamWriter | Refusal:
    w = add.inputs[1] if add.inputs[0] is x else add.inputs[0]
    if w is x:
        return Refusal(f"residual {_who(add)} adds the stream to itself")
    prod, bias = w.producer(), None
    if prod is not None and prod.op_type == "Add" and prod.domain in ONNX_DOMAINS:
        for i in (0, 1):
            inner = prod.inputs[1 - i]
            if _channel_vector(prod.inputs[i], hidden) and inner is not None and inner.producer() is not None \
                    and id(inner.producer()) in sites and len(data_uses(inner)) == 1 and not inner.is_graph_output():
                bias, prod = ConstRef(prod, i, -1), inner.producer()
                break
    site = sites.get(id(prod)) if prod is not None else None
    if site is None or site.N != hidden:
        made = f"made by {_who(prod)}" if prod is not None else "a graph input"
        return Refusal(f"residual {_who(add)} adds {w.name} ({made}), not a linear layer's output")
    if len(data_uses(w)) != 1 or w.is_graph_output():
        return Refusal(f"{w.name} (added into the stream by {_who(add)}) is also read elsewhere")
    return StreamWriter(site, bias, add)


def _starts_norm(u: ir.Node, x: ir.Value) -> bool:
    """Whether reader `u` of x starts an RMSNorm (x², or a fused norm op)."""
    return u.op_type in ("Pow", "Mul") and u.domain in ONNX_DOMAINS and (
        u.op_type == "Pow" and u.inputs[0] is x and _const_equals(u.inputs[1], 2.0)
        or u.op_type == "Mul" and u.inputs[0] is x and u.inputs[1] is x) \
        or u.op_type in _FUSED_NORMS and u.domain in _FUSED_NORMS[u.op_type]


def _cast_norm(x: ir.Value, cast: ir.Node, hidden: int,
               sites: dict[int, LinearSite]) -> tuple[StreamNorm, set[int]] | Refusal | None:
    """The RMSNorm computed on Cast(x) (None when the cast does not feed a norm); every reader of the cast
    must belong to the norm."""
    xc = cast.outputs[0]
    if xc.is_graph_output():
        return None
    start = next((u for u, _ in data_uses(xc) if _starts_norm(u, xc)), None)
    if start is None:
        return None
    found = _norm(xc, start, hidden, sites, stream=x)
    if found and any(id(u) not in found[1] for u, _ in data_uses(xc)):
        return Refusal(f"the float cast {xc.name} of stream value {x.name} is read outside its norm")
    return found


def _walk(gather: ir.Node, sites: dict[int, LinearSite], max_steps: int) -> ResidualStream | Refusal:
    hidden = int(gather.inputs[0].const_value.shape[1])
    dtype = gather.inputs[0].const_value.dtype  # the stream's type where an exporter left values untyped
    x = gather.outputs[0]
    values, norms, writers = [x], [], []
    for _ in range(max_steps):
        if x.is_graph_output():
            return Refusal(f"stream value {x.name} is a graph output (a rotation would change it)")
        users = list({id(u): u for u, _ in data_uses(x)}.values())  # Mul(x, x) reads x twice
        covered: set[int] = set()
        for u in users:  # norms first: a decomposed RMSNorm reads x twice
            if _starts_norm(u, x):
                found = _norm(x, u, hidden, sites)
                if not found:
                    return found
                norms.append(found[0])
                covered |= found[1]
            elif _is_float_cast(u) and not _is_noop_cast(u, x.dtype or dtype):
                found = _cast_norm(x, u, hidden, sites)
                if found is None:
                    continue  # not a norm: refused below as an unknown reader
                if not found:
                    return found
                norms.append(found[0])
                covered |= found[1] | {id(u)}
        nxt = None
        for u in users:
            if id(u) in covered:
                continue
            if nxt is not None:
                return Refusal(f"stream value {x.name} continues twice ({_who(nxt)} and {_who(u)})")
            if u.op_type == "Add" and u.domain in ONNX_DOMAINS:
                found = _writer(u, x, hidden, sites)
                if not found:
                    return found
                writers.append(found)
                nxt = u
            elif u.op_type == "Mul" and u.domain in ONNX_DOMAINS and any(
                    trace_const(i) and trace_const(i).initializer.const_value.size == 1 for i in u.inputs):
                nxt = u  # a scalar scale commutes with any rotation
            elif _is_noop_cast(u, x.dtype or dtype):
                nxt = u  # optimum's float32 exports: the norm's upcast of a float32 stream, read by the residual too
            elif u.op_type == "LayerNormalization" or u.op_type in ("ReduceMean", "Sub"):
                return Refusal(f"{_who(u)}: {LAYERNORM_REASON}")
            elif u.op_type.startswith("Skip"):
                return Refusal(f"{_who(u)} fuses the residual Add into the norm (unfuse it first)")
            else:
                return Refusal(f"stream value {x.name} is read by {_who(u)}, neither an RMSNorm nor a "
                               "residual Add")
        if nxt is None:
            break
        x = nxt.outputs[0]
        values.append(x)
    if not norms or norms[-1].input is not x:
        return Refusal(f"the stream ends at {x.name} without a final norm")
    return ResidualStream(gather, hidden, tuple(values), tuple(norms), tuple(writers))


def find_residual_stream(model: ir.Model) -> ResidualStream | Refusal:
    """The residual stream from the embedding Gather to the final norm, or why it cannot be proven rotatable."""
    sites = {id(s.node): s for s in find_linear_sites(model).sites}
    gathers = find_embedding_gathers(model)
    if not gathers:
        return Refusal("no embedding Gather of a constant [vocab, hidden] table")
    first: Refusal | None = None
    for gather in gathers:
        found = _walk(gather, sites, len(model.graph))
        if found:
            # debug: a query several passes make per compile; they say at INFO what they rotated
            logger.debug("residual stream: hidden %d, %d norms, %d writers, LM head %s", found.hidden,
                        len(found.norms), len(found.writers), "tied" if found.tied else "untied")
            return found
        first = first or found
    logger.debug("no rotatable residual stream: %s", first.reason)
    return first

