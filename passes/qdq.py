"""Lower planned linear weights to a constant DequantizeLinear feeding the original MatMul/Gemm.

    MatMul(X, W)  ->  MatMul(X, DequantizeLinear(Wq, scale, zero_point?; axis, block_size))

the weight-only QDQ form TensorRT and ONNX Runtime read (opset 21: INT4/UINT4 and blocked quantization).
The DequantizeLinear output has the layout the node reads as its weight: [K, N] for MatMul and Gemm
(transB=0), [N, K] for Gemm(transB=1); any Transpose/Cast the exporter put on the weight is bypassed.

* blockwise (block < K): blocks along K (axis 0 for [K, N]); scale and zero point [k_blocks, N]
  (a shorter last block when K is not a multiple of block_size, as the opset-21 spec allows).
* per channel (block = K): `axis` is the N axis; scale and zero point [N]. A Conv weight keeps its layout
  [M, C/group, *kernel] with `axis` 0 (per output channel, the only Conv form). With `blocked_4bit` (TensorRT, which
  documents INT4 with per-block scales only) a 4-bit weight with one block is written blocked instead, with
  block_size = K (the same numbers).
* symmetric: signed codes q - 2^(bits-1) as INT4/INT8 and no zero point (zero point 0); FP8: FLOAT8E4M3FN
  codes per output channel, no zero point;
  asymmetric: unsigned codes as UINT4/UINT8 with a zero point of the same type.

Requires: opset >= 21 for 4-bit or blocked weights, >= 19 for FLOAT8 (checked; the CLI reports it). Updates: the weight
input of each planned node; the old initializers are left for `RemoveUnusedNodesPass`.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from ptqonnx.graph import NameScope, add_initializer, gemm_trans_b
from ptqonnx.plan import WeightPlan, planned_nodes

__all__ = ["LowerToQdqPass", "QDQ_MIN_OPSET"]

logger = logging.getLogger(__name__)

QDQ_MIN_OPSET = 21
FP8_MIN_OPSET = 19  # FLOAT8 DequantizeLinear (per tensor or per axis)

_CODE_TYPES = {  # (bits, symmetric) -> numpy storage type of the codes (3-bit codes fit INT4/UINT4)
    (3, True): ml_dtypes.int4,
    (3, False): ml_dtypes.uint4,
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
}


class LowerToQdqPass(InPlacePass):
    """Give each planned node a DequantizeLinear weight."""

    def __init__(self, plan: WeightPlan, *, blocked_4bit: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.blocked_4bit = blocked_4bit

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        needs_21 = any(p.qweight.bits < 8 or p.qweight.k_blocks > 1 for p in self.plan.values())
        if needs_21 and opset < QDQ_MIN_OPSET:
            raise PreconditionError(
                f"the model's opset is {opset}; INT4 / blocked DequantizeLinear needs opset "
                f"{QDQ_MIN_OPSET}: re-export with opset 21 (ptqonnx export does) or use --format matmulnbits"
            )
        if any(p.qweight.fp8 for p in self.plan.values()) and opset < FP8_MIN_OPSET:
            raise PreconditionError(f"the model's opset is {opset}; FLOAT8 DequantizeLinear needs opset "
                                    f"{FP8_MIN_OPSET}: re-export with opset 21 (ptqonnx export does)")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = NameScope(graph)
        count = 0
        for node, planned in planned_nodes(graph, self.plan):
            site, qw = planned.site, planned.qweight
            code_type = ml_dtypes.float8_e4m3fn if qw.fp8 else _CODE_TYPES[(qw.bits, qw.symmetric)]
            q = qw.q if qw.fp8 else qw.q.astype(np.int16)  # [N, K]
            zp = qw.zero_point.astype(np.int16)  # [N, k_blocks]
            if qw.symmetric and not qw.fp8:
                q = q - (1 << (qw.bits - 1))
            n_major = gemm_trans_b(node) or site.is_conv
            one_block = qw.k_blocks == 1 and qw.block_size >= site.K
            per_channel = one_block and not (self.blocked_4bit and qw.bits < 8)
            if site.is_conv and not per_channel:
                raise PreconditionError(f"{node.name}: Conv weights are quantized per output channel only")
            scale = qw.scale  # [N, k_blocks]
            if per_channel:
                scale, zp = scale[:, 0], zp[:, 0]  # [N]
                attrs = {"axis": 0 if n_major else 1}
            else:
                attrs = {"axis": 1 if n_major else 0, "block_size": site.K if one_block else qw.block_size}
            if site.is_conv:
                q = q.reshape((site.N, -1, *site.kernel))  # [M, C/group, *kernel]
            elif not n_major:
                q = q.T  # [K, N]
                if not per_channel:
                    scale, zp = scale.T, zp.T  # [k_blocks, N]
            base = site.weight_name
            inputs = [
                add_initializer(graph, f"{base}_Q{qw.bits}", np.ascontiguousarray(q).astype(code_type), names),
                add_initializer(graph, f"{base}_scales", np.ascontiguousarray(scale).astype(site.float_dtype.numpy()), names),
            ]
            if not qw.symmetric:
                inputs.append(add_initializer(graph, f"{base}_zero_points", np.ascontiguousarray(zp).astype(code_type), names))
            dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{node.name}_weight_DequantizeLinear",
                         outputs=[ir.Value(name=f"{node.name}_weight_dq")])
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            count += 1
        if count and any(p.qweight.bits < 8 or p.qweight.fp8 for p in self.plan.values()):
            model.ir_version = max(model.ir_version or 0, 10)  # INT4/UINT4 tensors need IR 10, FLOAT8 IR 9
        logger.info("QDQ: %d weights now read through DequantizeLinear", count)
        return PassResult(model, modified=count > 0)
