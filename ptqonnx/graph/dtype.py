"""The float dtype a model computes in, and its float32 twin (for dtype-aware checks of exact rewrites).

An fp16 or bf16 model rounds every activation to 11 (8) significant bits, so an exact rewrite (a folded
scale, a rotation) moves its outputs by rounding alone, far above the fp32 fold tolerance. `as_float32`
gives the same graph computing in float32 — every fp16/bf16 initializer, value type, `Cast`/`Constant`
target and dtype attribute widened — so a check can measure the model's own arithmetic error (its outputs
against its float32 twin's) and allow a rewrite no more than a small multiple of that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["LOW_FLOATS", "as_float32", "low_float_type", "widen_feeds"]

LOW_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DTYPE_ATTRS = ("to", "dtype", "output_dtype")  # Cast, EyeLike/Random*, QuantizeLinear-21


def low_float_type(model: ir.Model) -> ir.DataType | None:
    """FLOAT16 or BFLOAT16 when the model's float weights or outputs are in that type, else None."""
    seen = [v.dtype for v in model.graph.outputs if v.dtype in LOW_FLOATS]
    seen += [v.const_value.dtype for v in model.graph.initializers.values()
             if v.const_value is not None and v.const_value.dtype in LOW_FLOATS]
    if not seen:
        return None
    return max(set(seen), key=seen.count)


def _widen_tensor(t: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(np.asarray(t.numpy(), dtype=np.float32), name=t.name)


def _widen_type(value: ir.Value) -> None:
    if value.dtype in LOW_FLOATS:  # a new type object: a clone shares the original's (dtype= would write through)
        value.type = ir.TensorType(ir.DataType.FLOAT)


def as_float32(model: ir.Model) -> ir.Model:
    """A clone of `model` computing in float32 wherever it computed in fp16/bf16 (same names and shapes)."""
    twin = model.clone()
    graphs = [twin.graph, *(g for n in ir.traversal.RecursiveGraphIterator(twin.graph)
                            for a in n.attributes.values() if a.type == ir.AttributeType.GRAPH
                            for g in [a.value])]
    for graph in graphs:
        for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            _widen_type(value)
            if value.const_value is not None and value.const_value.dtype in LOW_FLOATS:
                value.const_value = _widen_tensor(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(twin.graph):
        for out in node.outputs:
            _widen_type(out)
        for name, attr in list(node.attributes.items()):
            if name in _DTYPE_ATTRS and attr.type == ir.AttributeType.INT and attr.value in LOW_FLOATS:
                node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in LOW_FLOATS:
                node.attributes[name] = ir.AttrTensor(name, _widen_tensor(attr.value))
    return twin


def widen_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The feeds with fp16/bf16 arrays as float32 (the twin's inputs)."""
    return [{k: (np.asarray(v, np.float32) if np.asarray(v).dtype.name in ("float16", "bfloat16") else v)
             for k, v in f.items()} for f in feeds]
