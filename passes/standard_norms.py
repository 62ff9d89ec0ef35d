"""ONNX Runtime's `SimplifiedLayerNormalization` in the ONNX domain, rewritten as standard operators.

onnxruntime-genai's model builder (and ORT's own transformer optimizer) write RMSNorm as
`SimplifiedLayerNormalization` in the *default* domain: ORT registers it there, ONNX does not define it,
so `onnx.checker` rejects the model (`No Op registered for SimplifiedLayerNormalization`), and every
output must pass the checker. The node becomes the decomposition transformers computes:

    y = (x / sqrt(mean(x², last axis) + ε)) ⊙ γ        (in float32 when stash_type = 1, as ORT does)

i.e. `Pow(x, 2)` → `ReduceMean` → `Add ε` → `Sqrt` → `Div(x, ·)` → [`Cast` back] → `Mul γ`, a form
`ptqonnx.graph.residual` and the scaling groups read, and the one ORT's `SimplifiedLayerNormFusion` fuses
back into its kernel at its default optimization level (float32; measured, ORT 1.32: the `Mul(x, x)` and
`Reciprocal` forms are not fused), so the runtime graph is what it was; the values differ only by float
rounding. Left alone (the checker then names
it): a norm over other than the last axis, one whose inv_std_var output is read, or a γ of another float
type than y.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import NameScope, attr

__all__ = ["StandardNormsPass"]

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")


class StandardNormsPass(InPlacePass):
    """Default-domain `SimplifiedLayerNormalization` -> standard ONNX operators (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> PassResult:
        self.rewritten = []
        graph = model.graph
        names: NameScope | None = None
        opset = model.opset_imports.get("", 1)
        for node in list(graph):
            if node.op_type != "SimplifiedLayerNormalization" or node.domain not in _DEFAULT_DOMAINS:
                continue
            x, gamma = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
            y = node.outputs[0]
            rank = x.shape.rank() if x.shape is not None else None
            axis = attr(node, "axis", -1)
            last = axis == -1 or (rank is not None and axis == rank - 1)
            extra_read = any(o.uses() or o.is_graph_output() for o in node.outputs[1:])
            dtype = x.dtype
            if not last or extra_read or dtype is None or gamma is None or gamma.dtype != dtype:
                continue
            names = names or NameScope(graph)
            base = node.name or "SimplifiedLayerNormalization"
            eps = float(attr(node, "epsilon", 1e-5))
            stash = attr(node, "stash_type", 1) == 1 and dtype != ir.DataType.FLOAT
            nodes: list[ir.Node] = []

            def add(op: str, inputs, **attrs) -> ir.Value:
                new = ir.node(op, inputs, attrs, name=names.fresh(f"{base}/{op}"))
                new.outputs[0].name = names.fresh(f"{new.name}_output_0")
                nodes.append(new)
                return new.outputs[0]

            def const(value: np.ndarray, what: str) -> ir.Value:
                name = names.fresh(f"{base}/{what}")
                v = ir.val(name, const_value=ir.tensor(value, name=name))
                graph.register_initializer(v)
                return v

            h = add("Cast", [x], to=ir.DataType.FLOAT) if stash else x
            compute = np.float32 if stash or dtype == ir.DataType.FLOAT else dtype.numpy()
            square = add("Pow", [h, const(np.array(2.0, compute), "two")])
            if opset >= 18:
                mean = add("ReduceMean", [square, const(np.array([-1], np.int64), "axes")], keepdims=1)
            else:
                mean = add("ReduceMean", [square], axes=[-1], keepdims=1)
            rms = add("Sqrt", [add("Add", [mean, const(np.array(eps, compute), "epsilon")])])
            normed = add("Div", [h, rms])
            if stash:
                normed = add("Cast", [normed], to=dtype)
            out = ir.node("Mul", [normed, gamma], name=names.fresh(f"{base}/Mul_gamma"))
            nodes.append(out)
            graph.insert_after(node, nodes)
            y.replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)
            original = y.name
            y.name = names.fresh(f"{original}_replaced")
            out.outputs[0].name = original
            out.outputs[0].dtype, out.outputs[0].shape = y.dtype, y.shape
            graph.remove(node, safe=True)
            self.rewritten.append(node.name or "")
        if self.rewritten:
            logger.info("rewrote %d default-domain SimplifiedLayerNormalization as standard ops (ONNX does not "
                        "define the op, onnx.checker rejects it; ORT fuses the ops back): %s%s", len(self.rewritten),
                        ", ".join(self.rewritten[:3]), " ..." if len(self.rewritten) > 3 else "")
        return PassResult(model, modified=bool(self.rewritten))
