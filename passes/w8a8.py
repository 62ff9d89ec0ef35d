"""Static per-tensor activation quantization for W8A8: QuantizeLinear -> DequantizeLinear before each MatMul.

    MatMul(X, DQ(Wq))  ->  MatMul(DQ(Q(X; scale, zero_point)), DQ(Wq))

Together with `LowerToQdqPass` (weights: INT8 symmetric per output channel, DequantizeLinear on an int8
initializer with `axis`, no Q on weights) this is the explicit-quantization form TensorRT fuses into INT8
GEMMs (Q/DQ right before the MatMul inputs, zero zero points) and that ONNX Runtime's CPU EP rewrites at
ORT_ENABLE_ALL into `QuantizeLinear + MatMulIntegerToFloat` (com.microsoft). No QuantizeLinear on outputs:
the MatMul stays a float-output node.

ORT 1.32 on x86 (measured, tests/test_smoothquant.py and the notes): uint8 activations fuse whether the Q
has one reader or several; int8 activations fuse only when the Q has a single reader (ORT first rewrites an
int8 Q/DQ pair to uint8, which it skips for shared pairs), so q/k/v and gate/up stay unfused DQ + float
MatMul. Hence `--target ort-cpu` emits uint8 (asymmetric) activations and `--target tensorrt` int8 ones.

Placement: one QuantizeLinear per activation tensor, shared by all its quantized consumers (q/k/v read one
Q), and one DequantizeLinear per consumer (the node-unit form ORT's QDQ selectors match without first
duplicating a shared DQ). The zero point is an initializer of the code type (int8 / uint8) and no
`output_dtype` attribute is written, so Q's output type always equals its zero point's type (ORT refuses a
mismatch at load). FP8 activation grids need opset >= 21 and have no zero point: Q says FLOAT8E4M3FN in
`output_dtype` instead. ONNX Runtime 1.32's `ReluQuantRewrite` rule removes a Relu before a QuantizeLinear
whose zero point is a FLOAT8 0 as if that Q clipped negatives (it does not: E4M3 is signed), a silent
miscompute at its default optimization level (measured: 0.62 relative error on a CNN); a Q without a zero point
is left alone, and TensorRT reads either form. Opset 19-20 has no `output_dtype`, so a FLOAT8 Q there needs
the zero point, and the Relu can be reached through layout ops, Clip or a pool as well as directly: FP8
activations below opset 21 are refused in one line (re-export with opset 21, or --w8a8-type int8). Scales
are stored in the activation's float type. Requires opset >= 13 (per-axis DequantizeLinear for the weights,
QuantizeLinear with a typed zero point).

`select_w8a8_sites` decides what is quantized: GEMV-shaped layers (a static 1 in the activation's
second-to-last dim, or N or K == 1) and the LM head stay float unless asked; attention batch matmuls (both
inputs computed) are `find_bmm_nodes`, quantized on both inputs only with `quantize_bmm`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from ptqonnx.graph import FLOAT_TYPES, LinearSite, NameScope, Skip, add_initializer, trace_const
from ptqonnx.numerics.smoothquant import ActivationQParams

__all__ = ["W8A8_MIN_OPSET", "ActivationPlan", "QuantizeActivationsPass", "select_w8a8_sites", "find_bmm_nodes",
           "lm_head_reason", "GEMV_REASON", "LM_HEAD_REASON", "FP8_ACTIVATION_OPSET", "fp8_opset_problem"]

logger = logging.getLogger(__name__)

W8A8_MIN_OPSET = 13
FP8_ACTIVATION_OPSET = 21  # QuantizeLinear's output_dtype attribute: a FLOAT8 Q without a zero point
GEMV_REASON = "GEMV (a dimension of 1): left in float for W8A8"
def lm_head_reason(label: str = "LM head") -> str:
    return f"{label} left in float for W8A8 (--quantize-lm-head to quantize it)"


LM_HEAD_REASON = lm_head_reason()


def fp8_opset_problem(opset: int) -> str | None:
    """Why FLOAT8 activations cannot be written at this opset (see the module docstring), or None."""
    if opset >= FP8_ACTIVATION_OPSET:
        return None
    return (f"the model's opset is {opset}; FLOAT8 activations need opset {FP8_ACTIVATION_OPSET} (the Q form without "
            "a FLOAT8 zero point: ONNX Runtime's ReluQuantRewrite drops a Relu before one that has it): re-export "
            "with opset 21 (ptqonnx export does), or use --w8a8-type int8")

# node name -> {input index: activation grid}
ActivationPlan = Mapping[str, Mapping[int, ActivationQParams]]


def _is_gemv(site: LinearSite) -> bool:
    shape = site.activation.shape
    rows_one = shape is not None and len(shape) >= 2 and isinstance(shape[-2], int) and shape[-2] == 1
    return rows_one or site.N == 1 or site.K == 1


def select_w8a8_sites(
    sites: list[LinearSite], *, quantize_lm_head: bool = False
) -> tuple[list[LinearSite], list[Skip]]:
    """The sites W8A8 quantizes, and a Skip (with its reason) for each one left in float."""
    chosen, skipped = [], []
    for s in sites:
        if s.is_lm_head and not quantize_lm_head:
            skipped.append(Skip(s.name, s.node.op_type, lm_head_reason(s.head_label)))
        elif _is_gemv(s):
            skipped.append(Skip(s.name, s.node.op_type, GEMV_REASON))
        else:
            chosen.append(s)
    return chosen, skipped


def find_bmm_nodes(model: ir.Model) -> list[ir.Node]:
    """Default-domain MatMuls whose two inputs are both computed (attention QKᵀ and PV), float typed."""
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        a, b = node.inputs[0], node.inputs[1]
        if a is None or b is None or trace_const(a) or trace_const(b):
            continue
        if a.const_value is not None or b.const_value is not None:
            continue
        if a.dtype in FLOAT_TYPES or a.dtype is None:
            found.append(node)
    return found


class QuantizeActivationsPass(InPlacePass):
    """Put a QuantizeLinear -> DequantizeLinear pair on each planned node input (one Q per tensor)."""

    def __init__(self, plan: ActivationPlan) -> None:
        super().__init__()
        self.plan = {name: dict(inputs) for name, inputs in plan.items()}
        self.quantized_tensors = 0

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if self.plan and opset < W8A8_MIN_OPSET:
            raise PreconditionError(
                f"the model's opset is {opset}; W8A8 QDQ needs opset {W8A8_MIN_OPSET} or later: re-export it"
            )
        fp8 = any(qp.fp8 for inputs in self.plan.values() for qp in inputs.values())
        problem = fp8_opset_problem(opset) if fp8 else None
        if problem:
            raise PreconditionError(problem)

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = NameScope(graph)
        # id(x) -> (Q output, grid, scale, zero point)
        q_out: dict[int, tuple[ir.Value, ActivationQParams, ir.Value, ir.Value]] = {}
        count = 0
        for node in list(graph):
            inputs = self.plan.get(node.name) if node.name else None
            if not inputs:
                continue
            for index, qp in sorted(inputs.items()):
                x = node.inputs[index]
                if x is None:
                    raise PreconditionError(f"{node.name}: input {index} is missing")
                base = x.name or f"{node.name}_in{index}"
                if id(x) not in q_out:
                    dtype = x.dtype if x.dtype in FLOAT_TYPES else ir.DataType.FLOAT
                    scale = add_initializer(graph, f"{base}_act_scale", np.array(qp.scale, dtype=dtype.numpy()), names)
                    code = np.int8 if qp.signed else np.uint8
                    # FP8: no FLOAT8 zero point, the type in output_dtype (the module docstring: ReluQuantRewrite)
                    zp = None if qp.fp8 else add_initializer(graph, f"{base}_act_zero_point",
                                                             np.array(qp.zero_point, dtype=code), names)
                    q = ir.node("QuantizeLinear", [x, scale] + ([zp] if zp is not None else []),
                                {"output_dtype": int(ir.DataType.FLOAT8E4M3FN)} if qp.fp8 else {},
                                name=f"{base}_QuantizeLinear", outputs=[ir.Value(name=f"{base}_quantized")])

                    producer = x.producer()
                    if producer is None:  # a graph input: before its first consumer (graph order)
                        graph.insert_before(node, q)
                    else:
                        graph.insert_after(producer, q)
                    q_out[id(x)] = (q.outputs[0], qp, scale, zp)
                    self.quantized_tensors += 1
                xq, shared_qp, scale, zp = q_out[id(x)]
                assert shared_qp == qp, f"{base}: consumers ask for different grids ({shared_qp} vs {qp})"
                dq = ir.node("DequantizeLinear", [xq, scale] + ([zp] if zp is not None else []),
                             name=f"{node.name}_in{index}_DequantizeLinear",
                             outputs=[ir.Value(name=f"{node.name}_in{index}_dq")])
                graph.insert_before(node, dq)
                node.replace_input_with(index, dq.outputs[0])
                count += 1
        logger.info("W8A8: %d activation tensors quantized (per tensor, static), read by %d node inputs",
                    self.quantized_tensors, count)
        return PassResult(model, modified=count > 0)
