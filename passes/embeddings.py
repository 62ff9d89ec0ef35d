"""Quantize embedding tables: Gather(table, ids) -> com.microsoft::GatherBlockQuantized.

    out[i, :] = (q[ids[i], :] - z[ids[i], b]) * scale[ids[i], b],   b = column // block_size

The table T [V, H] is quantized like a linear weight with N = V rows and K = H (blocks along the hidden
axis), with the same grids as `ptqonnx.numerics.quant`; codes are stored as uint8 packed along the last
axis, low bits first (`bits` = 4: data [V, H / 2]), gather_axis 0, quantize_axis 1. Zero points are
omitted for symmetric grids: the op's default for uint8 data is 2^(bits-1), our symmetric zero point.

Requires: H a multiple of the block size (the op has no partial blocks); otherwise the largest power of
two >= 16 dividing H is used, and said. Skips (and says so) tables whose H has no such divisor.
Never mutates the table: a tied LM head may still read it; `RemoveUnusedNodesPass` drops it when unused.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import NameScope, add_initializer, find_embedding_gathers
from ptqonnx.numerics.packing import pack_bits, pack_zero_points
from ptqonnx.passes.matmul_nbits import MS_DOMAIN
from ptqonnx.numerics.quant import quantize_weight

__all__ = ["QuantizeEmbeddingsPass", "embedding_block_size"]

logger = logging.getLogger(__name__)


def embedding_block_size(hidden: int, requested: int) -> int | None:
    """`requested` if it divides `hidden`, else the largest power of two >= 16 that does (None if none)."""
    bs = requested
    while bs >= 16:
        if hidden % bs == 0:
            return bs
        bs //= 2
    return None


class QuantizeEmbeddingsPass(InPlacePass):
    """Replace float embedding Gathers by GatherBlockQuantized."""

    def __init__(self, bits: int, block_size: int, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.skipped: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = NameScope(graph)
        count = 0
        for node in find_embedding_gathers(model):
            table = node.inputs[0]
            v, h = table.const_value.shape
            if not np.isfinite(table.const_value.numpy()).all():
                self.skipped.append((node.name or "", "table holds NaN/Inf values"))
                continue
            bs = embedding_block_size(h, self.block_size)
            if bs is None:
                self.skipped.append((node.name or "", f"hidden size {h} has no power-of-two block >= 16"))
                continue
            if bs != self.block_size:
                logger.info("%s: hidden size %d is not a multiple of %d; using block size %d",
                            node.name, h, self.block_size, bs)
            qw = quantize_weight(table.const_value.numpy().astype("float32"), self.bits, bs, self.symmetric)
            base = table.name or node.name
            inputs = [
                add_initializer(graph, f"{base}_Q{self.bits}", pack_bits(qw.q, self.bits), names),  # [V, H*bits/8]
                node.inputs[1],
                add_initializer(graph, f"{base}_scales", qw.scale.astype(table.const_value.dtype.numpy()), names),
            ]
            if not self.symmetric:
                inputs.append(add_initializer(graph, f"{base}_zero_points", pack_zero_points(qw.zero_point, self.bits), names))
            new = ir.node(
                "GatherBlockQuantized", inputs,
                {"gather_axis": 0, "quantize_axis": 1, "block_size": bs, "bits": self.bits},
                domain=MS_DOMAIN, name=f"{node.name}_Q{self.bits}",
                outputs=[ir.Value(name=f"{node.outputs[0].name}_q")],
            )
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
            count += 1
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("GatherBlockQuantized: quantized %d embedding tables", count)
        return PassResult(model, modified=count > 0)
