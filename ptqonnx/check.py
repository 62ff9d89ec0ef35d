"""Target rules for an emitted ONNX graph: what TensorRT and ONNX Runtime accept, checked on the IR alone.

`check_model(model, target)` returns one `Finding` per broken rule and node. It reads only the graph (pure
onnx_ir: no onnxruntime or tensorrt import), so it runs wherever ptqonnx does; `ptqonnx.runtime.tensorrt`
runs the real TensorRT-RTX parser where that is installed, and `tests/test_tensorrt.py` compares the two.

Severity: an *error* breaks a requirement written in the cited source, or made the TensorRT-RTX 1.7
parser/builder fail in `tests/test_tensorrt.py`; a *warning* departs from what the source documents as
supported where TensorRT-RTX 1.7 still built it (another TensorRT may not), or costs speed.

TensorRT's explicit quantization (NvInfer.h IQuantizeLayer / IDequantizeLayer) is symmetric,

    Q(x) = clamp(round(x / s)),   DQ(q) = q * s,   s > 0 a build-time constant,

so a zero point must be absent or all zeros, and ONNX Runtime's symmetric convention s = m / -2^(b-1), m the
block's extreme with its sign, is refused for INT8/FP8 ("Scale coefficients must all be positive"): a block
whose extreme is positive gets s < 0 and holds that extreme at code -2^(b-1). Writing |s| with negated codes
is exact for every other code, but +2^(b-1) does not fit the type, so such blocks need a positive grid
(e.g. s = absmax / (2^(b-1) - 1), TensorRT's own) rather than a sign flip.
Granularity follows the ONNX spec (QuantizeLinear/DequantizeLinear-21): a scalar scale is per tensor, a 1-D
scale is per `axis` (length = that axis), a scale of the input's rank is blocked along `axis` with
`block_size`. ONNX allows a short last block (ceil(D / block_size) scales); TensorRT infers the block from
the shapes instead, D / number of scales: K=384 with block 256 silently becomes block 192, K=320 with
block 128 (3 scales) is refused (both measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.trace import quantize_output_type

__all__ = ["Finding", "TARGETS", "TRT_OPSET_RANGE", "check_model", "errors", "format_findings"]

Severity = Literal["error", "warning"]
TARGETS = ("tensorrt", "ort-cuda", "ort-cpu")
TRT_OPSET_RANGE = (9, 24)  # onnx-tensorrt docs/operators.md: "TensorRT 10.15 supports ... opset 9 to opset 24"

S_OPERATORS = "onnx-tensorrt docs/operators.md"
S_NVINFER = "NvInfer.h IQuantizeLayer/IDequantizeLayer"
S_QTYPES = "TensorRT docs, Working with Quantized Types (Quantization Schemes)"
S_TRT_OPS = "TensorRT operator docs, Quantize/Dequantize"
S_TYPED = "TensorRT docs, Strongly Typed Networks (TensorRT-RTX builds only strongly typed networks)"
S_ONNX = "ONNX operator spec, QuantizeLinear/DequantizeLinear-21/23"
S_MNB = "ONNX Runtime docs/ContribOperators.md, com.microsoft.MatMulNBits"
S_MNB_CUDA = "onnxruntime contrib_ops/cuda/quantization/matmul_nbits.{h,cc}"
S_ORT_KERNELS = "ONNX Runtime docs/OperatorKernels.md (kernels for ai.onnx, ai.onnx.ml, com.microsoft)"
S_RTX = "measured: tensorrt-rtx 1.7.1.116 parser/builder (tests/test_tensorrt.py)"

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_TRT_QTYPES = (ir.DataType.INT8, ir.DataType.INT4, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT4E2M1)
_SUB_BYTE = (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1)
_TRT_INT4_BLOCKS = (64, 128)
_ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
_SAME_TYPE_OPS = ("MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Conv", "Concat")  # inputs share one type T


@dataclass(frozen=True)
class Finding:
    """One broken rule at one node; `source` says where the rule is written down (or measured)."""

    rule: str
    severity: Severity
    node: str
    message: str
    source: str


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def format_findings(findings: list[Finding]) -> list[str]:
    """One line per finding: `error trt-scale-positive at NODE: message [source]`."""
    return [f"{f.severity} {f.rule} at {f.node}: {f.message} [{f.source}]" for f in findings]


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} -> {node.outputs[0].name if node.outputs else '?'}"


def _const(value: ir.Value | None):
    """The constant tensor behind a value (initializer or Constant node), else None."""
    return None if value is None else ir.convenience.get_const_tensor(value)


def _array(value: ir.Value | None) -> np.ndarray | None:
    tensor = _const(value)
    return None if tensor is None else tensor.numpy()


def _dims(value: ir.Value) -> tuple[int | None, ...] | None:
    """Static dimensions (None where symbolic), without reading a constant's data."""
    tensor = _const(value)
    shape = tensor.shape if tensor is not None else value.shape
    return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)


def _int_attr(node: ir.Node, name: str, default: int | None) -> int | None:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


@dataclass(frozen=True)
class _QdqNode:
    """A QuantizeLinear/DequantizeLinear node read once: its quantized type, granularity and constants."""

    node: ir.Node
    qtype: ir.DataType | None
    data: ir.Value  # Q: the float input; DQ: the quantized input
    data_const: bool
    dims: tuple[int | None, ...] | None
    scale: ir.Value
    scale_array: np.ndarray | None
    zero_point: ir.Value | None
    axis: int | None  # normalized when the rank is known
    block_size: int

    @property
    def granularity(self) -> str:
        """'block' (block_size set), 'channel' (a 1-D scale of more than one element) or 'tensor'."""
        if self.block_size > 0:
            return "block"
        dims = _dims(self.scale) or ()
        return "channel" if len(dims) == 1 and dims[0] != 1 else "tensor"

    @property
    def axis_len(self) -> int | None:
        if self.dims is None or self.axis is None or not 0 <= self.axis < len(self.dims):
            return None
        return self.dims[self.axis]


def _qtype(node: ir.Node) -> ir.DataType | None:
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type == _DQ:
        x = node.inputs[0]
        if x is not None and x.dtype is not None:
            return x.dtype
        prod = x.producer() if x is not None else None
        if prod is not None and prod.op_type == _Q:
            return _qtype(prod)
        return zp.dtype if zp is not None else None
    return quantize_output_type(node)


def _read_qdq(node: ir.Node) -> _QdqNode:
    data, scale = node.inputs[0], node.inputs[1]
    dims = _dims(data)
    axis = _int_attr(node, "axis", 1)
    if dims is not None and axis is not None and axis < 0:
        axis += len(dims)
    return _QdqNode(node, _qtype(node), data, _const(data) is not None, dims, scale, _array(scale),
                    node.inputs[2] if len(node.inputs) > 2 else None, axis, _int_attr(node, "block_size", 0) or 0)


@dataclass(frozen=True)
class _Context:
    model: ir.Model
    nodes: tuple[ir.Node, ...]
    qdq: tuple[_QdqNode, ...]
    opset: int | None


def _finding(rule: str, severity: Severity, node: ir.Node | str, message: str, source: str) -> Finding:
    return Finding(rule, severity, node if isinstance(node, str) else _label(node), message, source)


# ----------------------------------------------------------------------------------------- TensorRT rules
def _trt_graph(ctx: _Context) -> Iterator[Finding]:
    lo, hi = TRT_OPSET_RANGE
    if ctx.opset is not None and not lo <= ctx.opset <= hi:
        yield _finding("trt-opset", "warning", "<model>", f"default-domain opset {ctx.opset} is outside the "
                       f"{lo}..{hi} TensorRT documents (the parser does not check it; re-export at opset 21)",
                       S_OPERATORS)
    for node in ctx.nodes:
        if node.domain not in ("", "ai.onnx"):
            hint = ("; TensorRT-RTX 1.7's parser has a MatMulNBits importer (fp16 A, bits 4/8, block 32/64/128) "
                    "that needs a plugin its wheel does not ship: use --format qdq" if node.op_type == "MatMulNBits"
                    else "")
            yield _finding("trt-domain", "error", node, f"{node.domain}::{node.op_type} is outside the ONNX "
                           f"default domain that onnx-tensorrt's operator table covers{hint}",
                           f"{S_OPERATORS}; {S_RTX}")
    quantized = ctx.qdq or any(n.domain not in ("", "ai.onnx") for n in ctx.nodes)
    if not quantized and _only_float32(ctx):
        yield _finding("trt-fp32-graph", "warning", "<model>", "every float tensor is float32 and nothing is "
                       "quantized: a strongly typed network keeps the ONNX types, so the engine computes in "
                       "FP32; quantize the model or convert it to float16", S_TYPED)


def _only_float32(ctx: _Context) -> bool:
    g = ctx.model.graph
    values = [*g.inputs, *g.outputs, *g.initializers.values(), *(o for n in ctx.nodes for o in n.outputs)]
    types = {v.dtype for v in values if v.dtype in _FLOATS}
    return types == {ir.DataType.FLOAT}


def _trt_qdq(ctx: _Context) -> Iterator[Finding]:
    for q in ctx.qdq:
        yield from _trt_types(q)
        yield from _trt_scale(q)
        yield from _trt_granularity(q)


def _trt_types(q: _QdqNode) -> Iterator[Finding]:
    if q.qtype is not None and q.qtype not in _TRT_QTYPES:
        yield _finding("trt-qdq-type", "error", q.node, f"quantized type {q.qtype.name}: TensorRT quantizes "
                       "to INT8, INT4, FP8 (E4M3) and FP4 (E2M1) only (UINT8 only as network I/O); use the "
                       "symmetric signed grid", S_OPERATORS)
    if q.zero_point is not None:
        zp = _array(q.zero_point)
        if zp is None or np.any(zp.astype(np.float32) != 0):
            yield _finding("trt-zero-point", "error", q.node, "zero point is not a constant of zeros: TensorRT "
                           "quantization is symmetric (zeroPt must only contain zero-valued coefficients)",
                           f"{S_NVINFER}; {S_OPERATORS}")
    if q.qtype in _SUB_BYTE and q.dims is not None and None not in q.dims and math.prod(q.dims) % 2:
        yield _finding("trt-sub-byte-odd", "error", q.node, f"4-bit tensor of shape {list(q.dims)} has an odd "
                       "element count (two per byte); the builder refuses it", S_RTX)
    if q.qtype == ir.DataType.INT4 and q.node.op_type == _Q and not q.data_const:
        yield _finding("trt-int4-weight-only", "error", q.node, "INT4 QuantizeLinear on a computed tensor: "
                       "TensorRT supports INT4 for weight-only quantization", S_QTYPES)
    if q.qtype == ir.DataType.INT4 and q.node.op_type == _DQ and q.data_const:
        for use in q.node.outputs[0].uses():
            others = [v for i, v in enumerate(use.node.inputs) if i != use.idx and v is not None]
            if use.node.op_type in ("MatMul", "Gemm") and any(_dequantized_activation(v) for v in others):
                yield _finding("trt-int4-weight-only", "error", use.node, "INT4 weight times a quantized "
                               "activation (W4A8): TensorRT supports INT4 weight-only (W4A16); the builder "
                               "fails on it", f"{S_QTYPES}; {S_RTX}")


def _dequantized_activation(v: ir.Value) -> bool:
    prod = v.producer()
    return prod is not None and prod.op_type == _DQ and _const(prod.inputs[0]) is None


def _trt_scale(q: _QdqNode) -> Iterator[Finding]:
    s = q.scale_array
    if s is None:
        yield _finding("trt-scale-constant", "error", q.node, f"scale {q.scale.name!r} is computed, not a "
                       "constant: TensorRT's scale must be a build-time constant (and its sign cannot be checked)",
                       S_TRT_OPS)
        return
    s = s.astype(np.float32)
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        yield _finding("trt-scale-positive", "error", q.node, f"{int(bad.sum())} of {s.size} scales are not "
                       f"strictly positive and finite (min {float(np.nanmin(s)):.3g}); quantize on a positive grid "
                       "(|scale| with negated codes is exact except a -2^(b-1) code, which has no negation)",
                       f"{S_NVINFER}; {S_RTX}")
    out = _int_attr(q.node, "output_dtype", 0) if q.node.op_type == _DQ else 0
    if out and q.scale.dtype is not None and ir.DataType(out) != q.scale.dtype:
        fails = q.qtype in _SUB_BYTE
        yield _finding("trt-dq-output-dtype", "error" if fails else "warning", q.node, f"output_dtype "
                       f"{ir.DataType(out).name} differs from the scale's {q.scale.dtype.name}: the builder "
                       f"{'has no such 4-bit DequantizeLinear' if fails else 'accepts this for 8-bit types only'}; "
                       "store the scale in the output type", S_RTX)


def _trt_granularity(q: _QdqNode) -> Iterator[Finding]:
    kind, n = q.granularity, q.axis_len
    if kind == "channel":
        size = None if q.scale_array is None else q.scale_array.size
        if size is not None and n is not None and size != n:
            yield _finding("trt-per-channel-axis", "error", q.node, f"{size} scales for axis {q.axis} of "
                           f"length {n}: the 1-D scale must match the quantization axis", f"{S_NVINFER}; {S_ONNX}")
        produced_by_q = (p := q.data.producer()) is not None and p.op_type == _Q
        if not q.data_const and not produced_by_q:
            yield _finding("trt-per-channel-activation", "warning", q.node, "per-channel scale on a computed "
                           "tensor: TensorRT documents per-channel scales for constant weights and per-tensor "
                           "ones for activations", S_QTYPES)
    if kind != "block":
        if q.qtype == ir.DataType.INT4:
            yield _finding("trt-int4-granularity", "warning", q.node, f"INT4 with a per-{kind} scale: TensorRT "
                           "documents INT4 with per-block scales only", S_QTYPES)
        return
    if q.qtype == ir.DataType.INT8:
        yield _finding("trt-block-int8", "warning", q.node, "blocked INT8: the current Quantize docs list INT8 "
                       "for block quantization, TensorRT 10.x's Dequantize docs INT4 only", S_TRT_OPS)
    rank = None if q.dims is None else len(q.dims)
    if rank is not None and q.axis not in (rank - 1, rank - 2):
        yield _finding("trt-block-axis", "error", q.node, f"blocked along axis {q.axis} of a rank-{rank} tensor: "
                       "TensorRT blocks only the last or second-to-last dimension", f"{S_NVINFER}; {S_RTX}")
    if n is not None and n % q.block_size:
        yield _finding("trt-block-ragged", "error", q.node, f"axis {q.axis} has {n} elements, not a multiple "
                       f"of block_size {q.block_size}: ONNX allows a short last block, TensorRT takes the block "
                       f"as {n} / {-(-n // q.block_size)} scales (a different product, or a parse error when that "
                       f"does not divide); pick a block size dividing {n}", f"{S_ONNX}; {S_RTX}")
    if q.qtype == ir.DataType.INT4 and q.block_size not in _TRT_INT4_BLOCKS:
        yield _finding("trt-int4-block-size", "warning", q.node, f"INT4 block_size {q.block_size}: TensorRT "
                       f"documents {list(_TRT_INT4_BLOCKS)} (TensorRT-RTX 1.7 builds others)", S_QTYPES)


# --------------------------------------------------------------------------------------- shared QDQ rule
def _qdq_dtypes(ctx: _Context) -> Iterator[Finding]:
    for q in ctx.qdq:
        sdt = q.scale.dtype
        if q.node.op_type == _Q:
            x_dt = q.data.dtype
            if ctx.opset is not None and ctx.opset < 23 and None not in (sdt, x_dt) and sdt != x_dt:
                yield _finding("qdq-scale-dtype", "error", q.node, f"scale is {sdt.name} but x is {x_dt.name}: "
                               "before opset 23 both are T1", S_ONNX)
            continue
        out_dtype = _value_dtype(q.node.outputs[0])
        if out_dtype is None:
            continue
        readers = [u for u in q.node.outputs[0].uses() if u.node.op_type in _SAME_TYPE_OPS]
        for use in readers:
            others = _reference_dtypes(use)
            clash = sorted(t.name for t in others & set(_FLOATS) if t != out_dtype)
            if clash:
                yield _finding("qdq-scale-dtype", "error", q.node, f"dequantizes to {out_dtype.name} (the scale's "
                               f"type, or output_dtype) but {_label(use.node)} reads {', '.join(clash)}: store "
                               "the scale in the activation's type", S_ONNX)


def _reference_dtypes(use) -> set[ir.DataType | None]:
    """The float type a same-type node fixes for a DequantizeLinear it reads: its declared output and other
    inputs' types; only when none is declared, the types the spec gives its other DequantizeLinear inputs."""
    others = [v for i, v in enumerate(use.node.inputs) if i != use.idx and v is not None]
    declared = {v.dtype for v in [*others, *use.node.outputs]} - {None}
    return declared or {_value_dtype(v) for v in others}


def _value_dtype(v: ir.Value) -> ir.DataType | None:
    """A value's element type; for an untyped DequantizeLinear output, the type the spec gives it
    (output_dtype, else the scale's type)."""
    prod = v.producer()
    if prod is not None and prod.op_type == _DQ and len(prod.inputs) > 1 and prod.inputs[1] is not None:
        out = _int_attr(prod, "output_dtype", 0)
        return ir.DataType(out) if out else prod.inputs[1].dtype
    return v.dtype


# -------------------------------------------------------------------------------------------- ORT rules
def _ort_domains(ctx: _Context) -> Iterator[Finding]:
    for node in ctx.nodes:
        if node.domain not in _ORT_DOMAINS:
            yield _finding("ort-domain", "warning", node, f"domain {node.domain!r} has no ONNX Runtime kernels "
                           "unless a custom-op library registers them", S_ORT_KERNELS)


def _matmulnbits(ctx: _Context, cuda: bool) -> Iterator[Finding]:
    for node in ctx.nodes:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            yield from _mnb_node(node, cuda)


def _mnb_node(node: ir.Node, cuda: bool) -> Iterator[Finding]:
    attrs = {k: _int_attr(node, k, None) for k in ("K", "N", "bits", "block_size")}
    missing = [k for k, v in attrs.items() if v is None]
    if missing:
        yield _finding("mnb-attributes", "error", node, f"missing required attribute(s) {missing}", S_MNB)
        return
    K, N, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if bits not in (2, 4, 8) or bs < 16 or bs & (bs - 1):
        yield _finding("mnb-attributes", "error", node, f"bits={bits}, block_size={bs}: bits must be 2, 4 or 8 "
                       "and block_size a power of two >= 16", S_MNB)
        return
    kb = -(-K // bs)
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    a, b, scales, zp, bias = ins[0], ins[1], ins[2], ins[3], ins[5]
    per = kb if zp is not None and zp.dtype in _FLOATS else -(-kb * bits // 8)  # zero points: float or packed
    want = [(b, (N, kb, bs * bits // 8), "B"), (scales, (N * kb,), "scales"), (zp, (N * per,), "zero_points"),
            (bias, (N,), "bias")]  # B by shape, the others by element count ([N, k_blocks] or flat)
    for v, shape, what in want:
        dims = None if v is None else _dims(v)
        if dims is None or None in dims:
            continue
        if (dims != shape) if what == "B" else (math.prod(dims) != shape[0]):
            expected = f"shape {list(shape)}" if what == "B" else f"{shape[0]} elements"
            yield _finding("mnb-shapes", "error", node, f"{what} has shape {list(dims)}, expected {expected} for "
                           f"K={K}, N={N}, bits={bits}, block_size={bs}", S_MNB)
    adims = None if a is None else _dims(a)
    if adims and adims[-1] is not None and adims[-1] != K:
        yield _finding("mnb-shapes", "error", node, f"A's last dimension is {adims[-1]}, K is {K}", S_MNB)
    adt = None if a is None else a.dtype
    for v, what in ((scales, "scales"), (bias, "bias"), (zp if zp is not None and zp.dtype in _FLOATS else None,
                                                          "zero_points")):
        if v is not None and None not in (adt, v.dtype) and v.dtype != adt:
            yield _finding("mnb-scale-dtype", "error", node, f"{what} is {v.dtype.name} but A is {adt.name} "
                           "(both are T1)", S_MNB)
    level = _int_attr(node, "accuracy_level", 0)
    if not cuda and not 0 <= level <= 4:
        yield _finding("mnb-accuracy-level", "warning", node, f"accuracy_level {level} is not one of 0..4 (ORT "
                       "clamps it into that range)", S_MNB)
    if cuda and level:
        yield _finding("mnb-accuracy-level", "warning", node, f"accuracy_level {level} is a CPU (MLAS) knob; the "
                       "CUDA kernel reads only K, N, bits and block_size", S_MNB_CUDA)
    if cuda and adt == ir.DataType.FLOAT:
        yield _finding("mnb-cuda-fp32", "warning", node, "float32 A: ORT-CUDA runs its fp32 variant; its "
                       "fpA_intB weight-only GEMM takes fp16/bf16 A only (export in float16)", S_MNB_CUDA)


_Rule = Callable[[_Context], Iterator[Finding]]
_RULES: dict[str, tuple[_Rule, ...]] = {
    "tensorrt": (_trt_graph, _trt_qdq, _qdq_dtypes),
    "ort-cuda": (_ort_domains, lambda ctx: _matmulnbits(ctx, cuda=True), _qdq_dtypes),
    "ort-cpu": (_ort_domains, lambda ctx: _matmulnbits(ctx, cuda=False), _qdq_dtypes),
}


def check_model(model: ir.Model, target: str) -> list[Finding]:
    """Every rule of `target` ("tensorrt", "ort-cuda", "ort-cpu") broken by `model`, in graph order per rule."""
    if target not in _RULES:
        raise ValueError(f"unknown target {target!r}; use one of {list(TARGETS)}")
    nodes = tuple(ir.traversal.RecursiveGraphIterator(model.graph))
    qdq = tuple(_read_qdq(n) for n in nodes if n.op_type in (_Q, _DQ) and n.domain in ("", "ai.onnx")
                and len(n.inputs) >= 2 and n.inputs[0] is not None and n.inputs[1] is not None)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    ctx = _Context(model, nodes, qdq, opset)
    return [f for rule in _RULES[target] for f in rule(ctx)]
