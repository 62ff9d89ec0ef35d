"""The one constant-tracing helper: follow a value back through float Casts, 2-D Transposes and Identity to an
initializer.

Exporters put layout and type ops between a weight and the node that reads it: a `Transpose` (a weight
stored [N, K], a tied LM head reading the embedding table), a `Cast` (float16 storage read as float32)
and/or an `Identity` (a parameter aliased by the exporter, e.g. a BERT pooler's Gemm bias). Every query
that needs "the constant behind this input" (linear sites, scaling groups' γ and biases, the scale fold,
sequential calibration's private weight copies) goes through `trace_const`, so they agree on what counts
as a constant.

A value is a constant when it holds a tensor (`const_value`): an initializer, including an initializer that
is also listed as a graph input (IR < 4 models list every initializer as an input).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["ConstTrace", "Refusal", "FLOAT_TYPES", "ONNX_DOMAINS", "attr", "data_uses", "trace_const",
           "gemm_trans_b", "infer_shapes", "quantize_output_type", "upstream_any"]

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
ONNX_DOMAINS = ("", "ai.onnx")
_MAX_CHAIN = 4  # values looked at (so at most three Cast/Transpose nodes between a node and its constant)
_FLOAT_TYPE_IDS = frozenset(int(t) for t in FLOAT_TYPES)


@dataclass(frozen=True)
class Refusal:
    """Why a match failed, in words for the user (falsy, so `if not found:` reads naturally)."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class ConstTrace:
    """The initializer behind a value and the Cast/Transpose nodes between them (node side first)."""

    initializer: ir.Value
    chain: tuple[ir.Node, ...]

    @property
    def transposed(self) -> bool:
        """True when an odd number of Transposes lie on the chain (the node sees the constant transposed)."""
        return sum(n.op_type == "Transpose" for n in self.chain) % 2 == 1

    @property
    def casts(self) -> tuple[ir.Node, ...]:
        return tuple(n for n in self.chain if n.op_type == "Cast")


_SHAPE_READERS = ("Shape", "Size")


def data_uses(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The uses of `value` that read its elements: a `Shape`/`Size` reader (exporters such as optimum's
    read a hidden state's shape for the sequence length) is left out, as a per-channel scale or an
    orthogonal rotation of the value leaves its shape unchanged."""
    return [(n, i) for n, i in value.uses() if not (n.op_type in _SHAPE_READERS and n.domain in ONNX_DOMAINS)]


def attr(node: ir.Node, name: str, default):
    """An attribute's value, or `default` when the node does not set it."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference (with data propagation) where an exporter left intermediate values unshaped, as
    optimum's and torch.onnx's TorchScript exports do: the matchers read a value's last axis (a Reshape
    that keeps the channel axis, GPT-2's Conv1D as Gemm on [batch*sequence, K]), a KV cache's symbolic heads
    are read from the values it is joined with. A model it cannot infer (contrib ops, a graph ONNX's checker
    refuses) keeps the shapes it has."""
    from onnx_ir.passes.common import ShapeInferencePass

    if all(v.shape is not None for n in model.graph for v in n.outputs):
        return
    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:  # inference is a help to the matchers, never a requirement
        logger.debug("shape inference failed (%s); matching on the shapes the model has", exc)


def quantize_output_type(q: ir.Node) -> ir.DataType:
    """A QuantizeLinear's output type: its zero point's, else its `output_dtype` (opset 21), else UINT8 (the
    spec's default)."""
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    out = int(attr(q, "output_dtype", 0))
    return ir.DataType(out) if out else ir.DataType.UINT8


def gemm_trans_b(node: ir.Node) -> bool:
    """Whether a Gemm reads its B input transposed (False for MatMul)."""
    return node.op_type == "Gemm" and bool(attr(node, "transB", 0))


def trace_const(value: ir.Value | None) -> ConstTrace | Refusal:
    """Follow float `Cast`, 2-D `Transpose` (perm absent or [1, 0]) and `Identity` back to a constant (at most
    three nodes)."""
    chain: list[ir.Node] = []
    v = value
    for _ in range(_MAX_CHAIN):
        if v is None:
            return Refusal("input is missing")
        if v.const_value is not None:
            return ConstTrace(v, tuple(chain))
        prod = v.producer()
        if prod is None:
            return Refusal("weight is a graph input, not a constant")
        if prod.domain not in ONNX_DOMAINS or prod.op_type not in ("Cast", "Transpose", "Identity"):
            return Refusal(f"weight is computed by {prod.op_type}, not a constant")
        if prod.op_type == "Cast" and attr(prod, "to", None) not in _FLOAT_TYPE_IDS:
            return Refusal("weight Cast is not to a float type")
        if prod.op_type == "Transpose":
            perm = attr(prod, "perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return Refusal(f"weight Transpose has perm {list(perm)}")
        chain.append(prod)
        v = prod.inputs[0]
    return Refusal("weight is not a constant")


def upstream_any(value: ir.Value, pred, stop: frozenset[int] = frozenset()) -> bool:
    """Whether `value` or any value it is computed from (transitively, through producers) satisfies `pred`;
    values whose id is in `stop` are not looked at (nor what they are computed from)."""
    todo, seen = [value], set(stop)
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if pred(v):
            return True
        prod = v.producer()
        if prod is not None:
            todo.extend(prod.inputs)
    return False
