"""Shared IR queries: which MatMul/Gemm nodes are quantizable linear layers, and small edit helpers.

A linear site is `Y = X @ W (+ bias)` whose weight W is a constant initializer, reached directly or
through a Transpose (W stored [N, K]), a Cast (W stored in another float type) and/or an Identity; a
Gemm's bias C the same way (a BERT pooler's bias reaches its Gemm through an Identity). The weight is
always handed to numerics as W [N, K] float32 (torch's layout), whatever its stored layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.trace import (
    FLOAT_TYPES, ONNX_DOMAINS, ConstTrace, Refusal, attr, gemm_trans_b, trace_const, upstream_any,
)

__all__ = [
    "ACTIVATION_MATMUL_REASON",
    "LinearSite",
    "Skip",
    "SiteScan",
    "find_linear_sites",
    "find_embedding_gathers",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LinearSite:
    """One quantizable linear layer. `weight_source` is the initializer holding the weight's data."""

    node: ir.Node
    activation: ir.Value  # X [..., K]
    weight_input: ir.Value  # the value the node reads as its weight (maybe a Transpose/Cast output)
    weight_source: ir.Value  # the initializer
    weight_transposed: bool  # True when the initializer is stored [N, K]
    bias: ir.Value | None  # Gemm's C
    K: int
    N: int
    is_lm_head: bool  # the last linear layer (its output is a graph output): an LM head or a classifier
    head_output: str = ""  # the graph output it gives, when is_lm_head

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def head_label(self) -> str:
        """What messages call the last layer: "LM head" when it gives logits, else "output layer" (a
        classifier, an encoder's projection)."""
        return "LM head" if "logits" in self.head_output.lower() else "output layer"

    @property
    def weight_name(self) -> str:
        return self.weight_source.name or self.name

    @property
    def float_dtype(self) -> ir.DataType:
        """The float type the node computes in (its activation's type, else float32)."""
        dt = self.activation.dtype
        return dt if dt in FLOAT_TYPES else ir.DataType.FLOAT

    def weight_nk(self) -> np.ndarray:
        """The weight as W [N, K] float32."""
        w = np.asarray(self.weight_source.const_value.numpy()).astype(np.float32)
        return np.ascontiguousarray(w if self.weight_transposed else w.T)


@dataclass(frozen=True)
class Skip:
    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class SiteScan:
    sites: list[LinearSite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


ACTIVATION_MATMUL_REASON = "activation x activation (e.g. attention's Q·Kᵀ, P·V): no constant weight"
ROLE_KEY = "ptqonnx.role"  # node metadata naming nodes ptqonnx inserted for a purpose
ONLINE_HADAMARD_ROLE = "online_hadamard"
ONLINE_HADAMARD_REASON = "online Hadamard of a rotation (kept float)"
GRAPH_INPUT_WEIGHT_REASON = "weight is a graph input, not a constant"
CONV_REASON = "Conv layer: not quantized (ptqonnx quantizes MatMul/Gemm layers; convolutions are not built yet)"
CONV_OPS = ("Conv", "ConvTranspose")


def _trace_weight(value: ir.Value) -> ConstTrace | Refusal:
    """The weight's constant, or why there is none (an activation x activation MatMul said as such)."""
    found = trace_const(value)
    if found:
        return found
    why = found.reason
    if why != GRAPH_INPUT_WEIGHT_REASON and upstream_any(
            value, lambda v: v.is_graph_input() and v.const_value is None):  # computed from an activation
        return Refusal(ACTIVATION_MATMUL_REASON)
    if why.startswith("weight is computed by"):
        return Refusal(why + " (constant-fold the graph first, e.g. onnxscript.optimizer.fold_constants)")
    return found


def _head_output(node: ir.Node) -> str | None:
    """The graph output the last linear layer gives (logits), directly or through a Reshape/Cast; None for any
    other layer."""
    out = node.outputs[0]
    for _ in range(3):
        if out.is_graph_output():
            return out.name or ""
        consumers = list(out.consumers())
        if len(consumers) != 1 or consumers[0].op_type not in ("Reshape", "Cast", "Identity", "Add"):
            return None
        out = consumers[0].outputs[0]
    return None


def _scan_node(node: ir.Node) -> LinearSite | Skip:
    op = node.op_type
    skip = lambda why: Skip(node.name or "", op, why)  # noqa: E731
    if node.metadata_props.get(ROLE_KEY) == ONLINE_HADAMARD_ROLE:
        return skip(ONLINE_HADAMARD_REASON)
    if op == "Gemm":
        if attr(node, "transA", 0) != 0:
            return skip("Gemm with transA=1")
        if attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return skip("Gemm with alpha or beta other than 1")
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return skip("no weight input")
    x, w = node.inputs[0], node.inputs[1]
    if x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return skip(f"activation type {x.dtype} is not a float type")
    found = _trace_weight(w)
    if not found:
        return skip(found.reason)
    source, transposed = found.initializer, found.transposed
    if source.const_value.dtype not in FLOAT_TYPES:
        return skip(f"weight type {source.const_value.dtype} is not a float type")
    shape = tuple(source.const_value.shape)
    if len(shape) != 2:
        return skip(f"weight has rank {len(shape)}, not 2")
    if gemm_trans_b(node):
        transposed = not transposed
    n, k = shape if transposed else shape[::-1]
    bias = node.inputs[2] if op == "Gemm" and len(node.inputs) > 2 else None
    bias_const = trace_const(bias) if bias is not None else None
    if bias is not None and (not bias_const or bias_const.initializer.const_value.size != n):
        return skip("Gemm bias C is not a constant vector of length N")
    head = _head_output(node)
    return LinearSite(
        node=node, activation=x, weight_input=w, weight_source=source, weight_transposed=transposed,
        bias=bias, K=int(k), N=int(n), is_lm_head=head is not None, head_output=head or "",
    )


def find_linear_sites(model: ir.Model) -> SiteScan:
    """All MatMul/Gemm nodes of the main graph, split into quantizable sites and skips (with reasons); Conv
    layers with a constant weight are skips too, so that a CNN's convolutions are reported, not passed over
    in silence."""
    scan = SiteScan()
    for node in model.graph:
        if node.domain in ONNX_DOMAINS and node.op_type in CONV_OPS and len(node.inputs) > 1 \
                and trace_const(node.inputs[1]):
            scan.skipped.append(Skip(node.name or "", node.op_type, CONV_REASON))
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("MatMul", "Gemm"):
            continue
        res = _scan_node(node)
        (scan.sites if isinstance(res, LinearSite) else scan.skipped).append(res)
    return scan


def find_embedding_gathers(model: ir.Model) -> list[ir.Node]:
    """Gather(axis=0) nodes reading a 2-D float initializer table [V, H] with integer indices."""
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS:
            continue
        data = node.inputs[0]
        if data is None or data.const_value is None or attr(node, "axis", 0) != 0:
            continue
        if data.const_value.dtype in FLOAT_TYPES and len(data.const_value.shape) == 2:
            found.append(node)
    return found
