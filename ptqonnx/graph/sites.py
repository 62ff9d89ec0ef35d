"""Shared IR queries: which MatMul/Gemm nodes are quantizable linear layers, which Conv nodes are
quantizable convolutions, and small edit helpers.

A linear site is `Y = X @ W (+ bias)` whose weight W is a constant initializer, reached directly or
through a Transpose (W stored [N, K]), a Cast (W stored in another float type) and/or an Identity; a
Gemm's bias C the same way (a BERT pooler's bias reaches its Gemm through an Identity). The weight is
always handed to numerics as W [N, K] float32 (torch's layout), whatever its stored layout.

A Conv site is the same record for `Y = Conv(X, W, B?)` with a constant weight W [M, C/group, *kernel]
(directly or through a Cast/Identity; no Transpose): N = M output channels, K = C/group * prod(kernel), and
`weight_nk()` is W reshaped to [M, K], so per-output-channel numerics apply unchanged. Conv sites are a list
of their own (`SiteScan.convs`): the MatMul methods (GPTQ's Hessians, AWQ's and SmoothQuant's per-channel
scales, rotations) read a linear layer's input channels on its last axis, which a Conv's NCHW input does not
have.
"""

from __future__ import annotations

import logging
import math
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
    "CONV_TRANSPOSE_REASON",
    "conv_kn",
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
    kernel: tuple[int, ...] = ()  # a Conv's kernel dims (its weight [N, K / prod(kernel), *kernel]); () for MatMul/Gemm
    token_input: bool = True  # the graph has an integer input (token ids): a text model

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def head_label(self) -> str:
        """What messages call the last layer: "LM head" when it gives logits in a model fed token ids, else
        "output layer" (a classifier, an image model's logits, an encoder's projection)."""
        return "LM head" if "logits" in self.head_output.lower() and self.token_input else "output layer"

    @property
    def weight_name(self) -> str:
        return self.weight_source.name or self.name

    @property
    def float_dtype(self) -> ir.DataType:
        """The float type the node computes in (its activation's type, else float32)."""
        dt = self.activation.dtype
        return dt if dt in FLOAT_TYPES else ir.DataType.FLOAT

    def weight_nk(self) -> np.ndarray:
        """The weight as W [N, K] float32 (a Conv's [M, C/group, *kernel] flattened per output channel)."""
        w = np.asarray(self.weight_source.const_value.numpy()).astype(np.float32)
        if self.kernel:
            return np.ascontiguousarray(w.reshape(self.N, self.K))
        return np.ascontiguousarray(w if self.weight_transposed else w.T)


@dataclass(frozen=True)
class Skip:
    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class SiteScan:
    sites: list[LinearSite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)  # MatMul/Gemm and Conv nodes left alone, graph order
    convs: list[LinearSite] = field(default_factory=list)  # quantizable Conv layers (`LinearSite.kernel` set)


ACTIVATION_MATMUL_REASON = "activation x activation (e.g. attention's Q·Kᵀ, P·V): no constant weight"
ROLE_KEY = "ptqonnx.role"  # node metadata naming nodes ptqonnx inserted for a purpose
ONLINE_HADAMARD_ROLE = "online_hadamard"
ONLINE_HADAMARD_REASON = "online Hadamard of a rotation (kept float)"
GRAPH_INPUT_WEIGHT_REASON = "weight is a graph input, not a constant"
CONV_TRANSPOSE_REASON = "ConvTranspose: not quantized (Conv layers are; a transposed convolution is not built yet)"
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


def _float_weight(node: ir.Node, skip) -> ConstTrace | Skip:
    """The constant float weight (input 1) of a MatMul/Gemm/Conv read from a float activation (input 0), or
    the `skip` saying why not."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return skip("no weight input")
    x = node.inputs[0]
    if x is not None and x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return skip(f"activation type {x.dtype} is not a float type")
    found = _trace_weight(node.inputs[1])
    if not found:
        return skip(found.reason)
    if found.initializer.const_value.dtype not in FLOAT_TYPES:
        return skip(f"weight type {found.initializer.const_value.dtype} is not a float type")
    return found


def _constant_vector(v: ir.Value, n: int) -> bool:
    """A bias that is a constant (through Cast/Identity) of n elements."""
    const = trace_const(v)
    return bool(const) and const.initializer.const_value.size == n


def conv_kn(stored: tuple[int, ...]) -> tuple[int, int]:
    """K and N of a Conv weight [M, C/group, *kernel]: K = C/group * prod(kernel), N = M."""
    return int(math.prod(stored[1:])), int(stored[0])


def _scan_node(node: ir.Node, token_input: bool = True) -> LinearSite | Skip:
    op = node.op_type
    skip = lambda why: Skip(node.name or "", op, why)  # noqa: E731
    if node.metadata_props.get(ROLE_KEY) == ONLINE_HADAMARD_ROLE:
        return skip(ONLINE_HADAMARD_REASON)
    if op == "Gemm":
        if attr(node, "transA", 0) != 0:
            return skip("Gemm with transA=1")
        if attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return skip("Gemm with alpha or beta other than 1")
    found = _float_weight(node, skip)
    if isinstance(found, Skip):
        return found
    x, w = node.inputs[0], node.inputs[1]
    source, transposed = found.initializer, found.transposed
    shape = tuple(source.const_value.shape)
    if len(shape) != 2:
        return skip(f"weight has rank {len(shape)}, not 2")
    if gemm_trans_b(node):
        transposed = not transposed
    n, k = shape if transposed else shape[::-1]
    bias = node.inputs[2] if op == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None and not _constant_vector(bias, n):
        return skip("Gemm bias C is not a constant vector of length N")
    head = _head_output(node)
    return LinearSite(
        node=node, activation=x, weight_input=w, weight_source=source, weight_transposed=transposed,
        bias=bias, K=int(k), N=int(n), is_lm_head=head is not None, head_output=head or "", token_input=token_input,
    )


def _scan_conv(node: ir.Node) -> LinearSite | Skip:
    skip = lambda why: Skip(node.name or "", node.op_type, why)  # noqa: E731
    if node.op_type == "ConvTranspose":
        return skip(CONV_TRANSPOSE_REASON)
    found = _float_weight(node, skip)
    if isinstance(found, Skip):
        return found
    if found.transposed:
        return skip("Conv weight read through a Transpose")
    shape = tuple(int(d) for d in found.initializer.const_value.shape)
    if len(shape) < 3:
        return skip(f"Conv weight has rank {len(shape)}, not 3 or more")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not _constant_vector(bias, shape[0]):
        return skip("Conv bias B is not a constant vector of length M")
    k, n = conv_kn(shape)
    return LinearSite(
        node=node, activation=node.inputs[0], weight_input=node.inputs[1], weight_source=found.initializer,
        weight_transposed=True, bias=bias, K=k, N=n, is_lm_head=False, kernel=shape[2:],
    )


def find_linear_sites(model: ir.Model) -> SiteScan:
    """All MatMul/Gemm nodes of the main graph, split into quantizable sites and skips (with reasons), and its
    Conv/ConvTranspose nodes: quantizable convolutions (`convs`) or skips."""
    scan = SiteScan()
    tokens = any(v.dtype in (ir.DataType.INT64, ir.DataType.INT32) for v in model.graph.inputs)
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS:
            continue
        if node.op_type in CONV_OPS:
            res = _scan_conv(node)
            (scan.convs if isinstance(res, LinearSite) else scan.skipped).append(res)
        elif node.op_type in ("MatMul", "Gemm"):
            res = _scan_node(node, tokens)
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
