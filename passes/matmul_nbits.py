"""Lower planned linear weights to ONNX Runtime's `com.microsoft::MatMulNBits`.

    MatMul(X, W) [+ bias]  ->  MatMulNBits(X, B, scales, zero_points?, -, bias?)   with
    W[k, n] = (q[n, k] - z[n, k // block_size]) * scale[n, k // block_size]

B, scales and zero_points are packed as `ptqonnx.numerics.packing` documents (the ORT spec); zero points
are omitted for symmetric grids, where the implicit 2^(bits-1) applies. The block size written is the
plan's. A per-channel plan (one block = K per row) is written blockwise with block 128 (or the next power
of two >= max(K, 16) when K is smaller), every block of a row repeating the row's scale and zero point:
the same numbers, but a block size ORT's MLAS kernels are fast for (a single K-long block, e.g. 1024 or
2048, made an INT8 prefill 1.4x slower than FP32 here).

A 3-bit plan is stored as 4-bit codes (0..7) with explicit zero points (bits=4 in the node): W3's grid and
accuracy at W4's size, since MatMulNBits has no 3-bit packing.

Requires: every planned node's name is unique. Updates: the planned nodes are replaced (same output
value, so consumers and graph outputs are untouched); the old weight initializers are left for
`RemoveUnusedNodesPass` (never mutated: a tied embedding may still read them).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import NameScope, add_initializer
from ptqonnx.numerics.packing import pack_matmulnbits_weight, pack_zero_points, storage_bits
from ptqonnx.numerics.quant import QuantizedWeight
from ptqonnx.plan import WeightPlan, planned_nodes

__all__ = ["LowerToMatMulNBitsPass", "MS_DOMAIN", "PER_CHANNEL_BLOCK", "matmulnbits_block_size", "per_channel_block",
           "as_blockwise"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
PER_CHANNEL_BLOCK = 128


def matmulnbits_block_size(block_size: int) -> int:
    """MatMulNBits needs a power of two >= 16."""
    bs = 16
    while bs < block_size:
        bs *= 2
    return bs


def per_channel_block(k: int) -> int:
    """The block size a per-channel weight with K inputs is written with (also the block of K that
    accuracy_level 4 quantizes activations in)."""
    return PER_CHANNEL_BLOCK if k > PER_CHANNEL_BLOCK else matmulnbits_block_size(max(k, 16))


def as_blockwise(qw: QuantizedWeight) -> QuantizedWeight:
    """A per-channel weight (one block of K per row) as an equal blockwise one with a kernel-friendly block."""
    n, k = qw.q.shape
    if qw.k_blocks != 1 or qw.block_size < k:
        return qw
    bs = per_channel_block(k)
    kb = (k + bs - 1) // bs
    return dataclasses.replace(
        qw, scale=np.repeat(qw.scale, kb, axis=1), zero_point=np.repeat(qw.zero_point, kb, axis=1), block_size=bs,
    )


class LowerToMatMulNBitsPass(InPlacePass):
    """Replace each planned MatMul/Gemm by MatMulNBits. Skips nothing: the plan lists what to rewrite."""

    def __init__(self, plan: WeightPlan, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = NameScope(graph)
        count = 0
        for node, planned in planned_nodes(graph, self.plan):
            site, qw = planned.site, as_blockwise(planned.qweight)
            bs = qw.block_size
            if matmulnbits_block_size(bs) != bs:
                raise ValueError(f"{node.name}: block size {bs} is not a power of two >= 16")
            dtype = site.float_dtype.numpy()
            base = site.weight_name
            bits = storage_bits(qw.bits)  # W3 codes are stored as 4-bit
            b = add_initializer(graph, f"{base}_Q{bits}", pack_matmulnbits_weight(qw.q, bits, bs), names)
            scales = add_initializer(graph, f"{base}_scales", qw.scale.astype(dtype), names)  # [N, k_blocks]
            inputs: list[ir.Value | None] = [node.inputs[0], b, scales]  # not site.activation: an earlier lowering may have replaced it
            if not qw.symmetric or bits != qw.bits:  # the implicit zero point is 2^(bits-1) of the storage
                inputs.append(add_initializer(graph, f"{base}_zero_points", pack_zero_points(qw.zero_point, bits), names))
            if site.bias is not None:
                inputs += [None] * (5 - len(inputs)) + [site.bias]
            attrs = {"K": site.K, "N": site.N, "bits": bits, "block_size": bs}
            if self.accuracy_level is not None:
                attrs["accuracy_level"] = self.accuracy_level
            new = ir.node(
                "MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}_Q{bits}",
                outputs=[ir.Value(name=f"{node.outputs[0].name}_q")],
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
            )
            count += 1
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("MatMulNBits: lowered %d linear layers", count)
        return PassResult(model, modified=count > 0)

