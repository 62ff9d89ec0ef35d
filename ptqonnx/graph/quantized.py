"""Linear layers and embeddings as they are stored, float or quantized, by us or by another tool (pure IR queries).

A linear layer is `Y = X @ W` with a constant W [K, N] (params = K * N), in whichever form it is stored (a Conv
with a float or DequantizeLinear weight [M, C/group, *kernel] counts as one with K = C/group * prod(kernel), N = M):

  | node                                        | W is                                                 |
  |---------------------------------------------|------------------------------------------------------|
  | MatMul / Gemm                               | a float initializer (`find_linear_sites`' sites)      |
  | MatMul / Gemm                               | DequantizeLinear(initializer, scale, zero_point?),   |
  |                                             | through Transpose / Cast / Reshape (QDQ)             |
  | com.microsoft MatMulNBits                   | packed codes B uint8 [N, k_blocks, blob]; K, N, bits |
  | MatMulInteger, QLinearMatMul, QGemm,        | an int8 / uint8 initializer with its scale and zero  |
  | DynamicQuantizeMatMul, MatMulIntegerToFloat | point (ORT's `quantize_dynamic`, QOperator format)   |

Its activation X is quantized when it comes from QuantizeLinear -> DequantizeLinear (static: a constant
scale), from DynamicQuantizeLinear (dynamic, per tensor, uint8), when MatMulNBits has `accuracy_level` 4
(ORT quantizes X to int8 per block of K inside the kernel), or through the integer ops' a_scale /
a_zero_point inputs. Embeddings: Gather(axis 0) of a float table or of a DequantizeLinear'd one, and
com.microsoft GatherBlockQuantized (uint8 data packs 8 / bits codes per byte along the last axis, so
H = last dim * 8 / bits; int4 / uint4 data is stored unpacked).

Each layer also names the initializers holding its scales and zero points (`qparams`) and its storage in
bytes (data + qparams), so a model-level summary can count every tensor once. Only the main graph is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ptqonnx.graph.sites import CONV_OPS, LinearSite, Skip, conv_kn, find_embedding_gathers, find_linear_sites
from ptqonnx.graph.trace import ONNX_DOMAINS, attr, gemm_trans_b, quantize_output_type

__all__ = [
    "ActivationQuant", "Embedding", "LinearLayer", "MS_DOMAIN", "WeightQuant", "activation_qparams",
    "dequantized_constants", "dtype_name", "find_embeddings", "find_linear_layers",
]

MS_DOMAIN = "com.microsoft"
_LAYOUT_OPS = ("Transpose", "Cast", "Reshape", "Identity")  # allowed between a weight's DequantizeLinear and its reader
# integer linear ops -> (A, B, b_scale, b_zero_point, a_scale, a_zero_point) input indices (None: no such input)
_INTEGER_OPS = {
    "MatMulInteger": (0, 1, None, 3, None, 2),
    "QLinearMatMul": (0, 3, 4, 5, 1, 2),
    "QGemm": (0, 3, 4, 5, 1, 2),
    "DynamicQuantizeMatMul": (0, 1, 2, 3, None, None),
    "MatMulIntegerToFloat": (0, 1, 3, 5, 2, 4),
}
# ops whose inputs are quantization parameters, except at these indices (data, weights, bias)
_QPARAM_READERS = {"QuantizeLinear": (0,), "DequantizeLinear": (0,), "QLinearMatMul": (0, 3), "QGemm": (0, 3, 6),
                   "MatMulInteger": (0, 1), "MatMulIntegerToFloat": (0, 1, 6)}


@dataclass(frozen=True)
class WeightQuant:
    """How a weight is stored. `format`: float | QDQ | MatMulNBits | GatherBlockQuantized | an integer op."""

    format: str
    dtype: str  # FLOAT, FLOAT16, INT4, UINT4, INT8, UINT8, FLOAT8E4M3FN, ...
    bits: int
    granularity: str | None = None  # per-tensor | per-channel | blocked (None: float)
    block_size: int | None = None
    axis: int | None = None  # the quantized axis of the stored tensor (per-channel / blocked)
    zero_point: str | None = None  # dtype of explicit zero points; None: absent (the format's default)
    scale_dtype: str | None = None
    accuracy_level: int | None = None  # MatMulNBits only

    def describe(self) -> str:
        if self.format == "float":
            return self.dtype
        parts = [self.format, self.dtype, self.granularity or ""]
        if self.block_size:
            parts[-1] += f" {self.block_size}"
        if self.axis is not None:
            parts.append(f"axis {self.axis}")
        parts.append(f"zero points {self.zero_point}" if self.zero_point else "no zero points")
        if self.scale_dtype:
            parts.append(f"scales {self.scale_dtype}")
        if self.accuracy_level is not None:
            parts.append(f"accuracy_level {self.accuracy_level}")
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class ActivationQuant:
    """How a linear layer's input is quantized. `kind`: static | dynamic | in-kernel."""

    kind: str
    dtype: str | None  # code type: UINT8 / INT8 / FLOAT8E4M3FN
    granularity: str  # per-tensor | per-channel | per block of K
    scale: float | None = None  # static per-tensor scale
    zero_point: int | None = None

    def describe(self) -> str:
        s = f"{self.kind} {self.dtype or ''} {self.granularity}".replace("  ", " ")
        if self.scale is not None:
            s += f", scale {self.scale:.4g}"
        if self.zero_point is not None:
            s += f", zero point {self.zero_point}"
        return s


@dataclass(frozen=True)
class LinearLayer:
    node: str
    op_type: str
    weight: str  # the initializer holding the (packed) weight
    K: int
    N: int
    params: int  # K * N
    bytes: int  # the weight's storage, scales and zero points included
    weight_quant: WeightQuant
    activations: ActivationQuant | None = None
    qparams: tuple[str, ...] = ()  # the initializers holding the weight's scales and zero points


@dataclass(frozen=True)
class Embedding:
    node: str
    op_type: str
    table: str
    V: int
    H: int
    params: int
    bytes: int
    weight_quant: WeightQuant
    qparams: tuple[str, ...] = ()


def dtype_name(v: ir.Value | None) -> str:
    """The ONNX type name (FLOAT, INT4, ...) of a constant's tensor or a value's declared type."""
    t = None if v is None else (v.const_value.dtype if v.const_value is not None else v.dtype)
    return t.name if t is not None else "UNKNOWN"


def _init(v: ir.Value | None) -> ir.Value | None:
    """`v` if it is an initializer (holds a constant), else None."""
    return v if v is not None and v.const_value is not None else None


def _input(node: ir.Node, i: int | None) -> ir.Value | None:
    return node.inputs[i] if i is not None and i < len(node.inputs) else None


def _granularity(scale: ir.Value | None, block_size: int) -> str:
    if block_size:
        return "blocked"
    if scale is None or scale.const_value is None or scale.const_value.size == 1:
        return "per-tensor"
    return "per-channel"


def _scalar(v: ir.Value | None) -> float | None:
    if v is None or v.const_value is None or v.const_value.size != 1:
        return None
    return float(v.const_value.numpy().reshape(-1)[0])


def _storage(data: ir.Value, *qparams: ir.Value | None) -> tuple[int, tuple[str, ...]]:
    """Bytes of a weight's data plus its constant scales / zero points, and those initializers' names."""
    meta = [m for m in qparams if _init(m) is not None and m is not data]
    return data.const_value.nbytes + sum(m.const_value.nbytes for m in meta), tuple(m.name for m in meta)


def activation_qparams(graph: ir.Graph) -> set[str]:
    """Names of the values read as quantization parameters (scales, zero points) by Q/DQ and integer ops."""
    return {
        v.name for node in graph if node.op_type in _QPARAM_READERS
        for i, v in enumerate(node.inputs) if v is not None and i not in _QPARAM_READERS[node.op_type]
    }


def dequantized_constants(graph: ir.Graph) -> list[tuple[ir.Value, tuple[str, ...]]]:
    """Every initializer a DequantizeLinear reads as data (weights, tables, int32 biases) and its qparams."""
    out = []
    for node in graph:
        if node.op_type == "DequantizeLinear" and node.inputs and _init(node.inputs[0]) is not None:
            out.append((node.inputs[0], _storage(node.inputs[0], _input(node, 1), _input(node, 2))[1]))
    return out


def _dequantized(value: ir.Value | None) -> tuple[ir.Node, int] | None:
    """The DequantizeLinear of an initializer behind `value` (through layout ops) and the Transposes passed."""
    transposes = 0
    for _ in range(4):
        prod = None if value is None else value.producer()
        if prod is None:
            return None
        if prod.op_type == "DequantizeLinear" and prod.domain in (*ONNX_DOMAINS, MS_DOMAIN):
            return (prod, transposes) if _init(prod.inputs[0]) is not None else None
        if prod.op_type not in _LAYOUT_OPS or prod.domain not in ONNX_DOMAINS:
            return None
        transposes += prod.op_type == "Transpose"
        value = prod.inputs[0]
    return None


def _qdq_weight(dq: ir.Node) -> WeightQuant:
    x, scale, zp = dq.inputs[0], _input(dq, 1), _input(dq, 2)
    block = int(attr(dq, "block_size", 0))
    gran = _granularity(scale, block)
    dt = x.const_value.dtype
    return WeightQuant(
        format="QDQ", dtype=dt.name, bits=dt.bitwidth, granularity=gran, block_size=block or None,
        axis=int(attr(dq, "axis", 1)) if gran != "per-tensor" else None,
        zero_point=dtype_name(zp) if zp is not None else None, scale_dtype=dtype_name(scale),
    )


def _kn(node: ir.Node, b: ir.Value, stored: tuple[int, ...], transposed: bool) -> tuple[int, int] | None:
    """K and N of the weight the node reads as B (its shape if known, else the stored one and the layout)."""
    shape = b.shape
    if shape is not None and len(shape) == 2 and all(isinstance(d, int) for d in shape):
        k, n = shape
    elif len(stored) == 2:
        k, n = stored[::-1] if transposed else stored
    else:
        return None
    return (n, k) if gemm_trans_b(node) else (k, n)


def _conv_kn(stored: tuple[int, ...]) -> tuple[int, int] | None:
    """`conv_kn` of a stored Conv weight, None when it is not one (rank below 3)."""
    return conv_kn(stored) if len(stored) >= 3 else None


def _qdq_activation(x: ir.Value | None) -> ActivationQuant | None:
    """QuantizeLinear -> DequantizeLinear (static scale) or DynamicQuantizeLinear -> DequantizeLinear."""
    dq = None if x is None else x.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer()
    if q is None or _init(dq.inputs[0]) is not None:
        return None
    if q.op_type == "DynamicQuantizeLinear":
        return ActivationQuant("dynamic", "UINT8", "per-tensor")
    if q.op_type != "QuantizeLinear":
        return None
    scale, zp = _input(q, 1), _input(q, 2)
    return ActivationQuant(
        "static", dtype_name(zp) if zp is not None else quantize_output_type(q).name,
        _granularity(scale, int(attr(q, "block_size", 0))),
        _scalar(scale), None if _scalar(zp) is None else int(_scalar(zp)),
    )


def _float_or_qdq(node: ir.Node, site: LinearSite | None) -> LinearLayer | None:
    b = _input(node, 1)
    found = _dequantized(b)
    act = _qdq_activation(node.inputs[0])
    if found is not None:
        dq, transposes = found
        x = dq.inputs[0]
        stored = tuple(x.const_value.shape)
        kn = _conv_kn(stored) if node.op_type == "Conv" else _kn(node, b, stored, transposes % 2 == 1)
        if kn is None:
            return None
        nbytes, qparams = _storage(x, _input(dq, 1), _input(dq, 2))
        return LinearLayer(node.name or "", node.op_type, x.name, *kn, kn[0] * kn[1], nbytes, _qdq_weight(dq), act,
                           qparams)
    if site is None:
        return None
    w = site.weight_source
    wq = WeightQuant("float", w.const_value.dtype.name, w.const_value.dtype.bitwidth)
    return LinearLayer(site.name, node.op_type, w.name, site.K, site.N, site.K * site.N, w.const_value.nbytes, wq, act)


def _matmulnbits(node: ir.Node) -> LinearLayer | None:
    b, scales, zp = _init(_input(node, 1)), _input(node, 2), _input(node, 3)
    if b is None:
        return None
    k, n, bits = int(attr(node, "K", 0)), int(attr(node, "N", 0)), int(attr(node, "bits", 4))
    level = int(attr(node, "accuracy_level", 0))
    wq = WeightQuant(
        "MatMulNBits", f"UINT{bits}", bits, "blocked", int(attr(node, "block_size", 0)), None,
        dtype_name(zp) if zp is not None else None, dtype_name(scales), level,
    )
    act = ActivationQuant("in-kernel", "INT8", "per block of K") if level == 4 else None
    nbytes, qparams = _storage(b, scales, zp)
    return LinearLayer(node.name or "", node.op_type, b.name, k, n, k * n, nbytes, wq, act, qparams)


def _integer_scale(node: ir.Node) -> ir.Value | None:
    """MatMulInteger has no scale input: ORT's QOperator form multiplies Cast(Y) by Mul(a_scale, b_scale)."""
    for cast in node.outputs[0].consumers():
        for mul in cast.outputs[0].consumers() if cast.op_type == "Cast" else ():
            for v in mul.inputs if mul.op_type == "Mul" else ():
                inner = None if v is None else v.producer()
                cands = [v] if _init(v) is not None else list(inner.inputs) if inner is not None else []
                found = [c for c in cands if _init(c) is not None]
                if found:
                    return found[-1]
    return None


def _integer_op(node: ir.Node) -> LinearLayer | None:
    ia, ib, ibs, ibz, ias, iaz = _INTEGER_OPS[node.op_type]
    b = _init(_input(node, ib))
    if b is None or len(b.const_value.shape) != 2:
        return None
    scale = _input(node, ibs) if ibs is not None else _integer_scale(node)
    zp = _input(node, ibz)
    transposed = node.op_type == "QGemm" and bool(attr(node, "transB", 0))
    k, n = b.const_value.shape[::-1] if transposed else b.const_value.shape
    dt = b.const_value.dtype
    gran = _granularity(scale if scale is not None else zp, 0)
    wq = WeightQuant(node.op_type, dt.name, dt.bitwidth, gran, None, None,
                     dtype_name(zp) if zp is not None else None, dtype_name(scale) if scale is not None else None)
    a = _input(node, ia)
    a_prod = None if a is None else a.producer()
    if node.op_type == "DynamicQuantizeMatMul" or (a_prod is not None and a_prod.op_type == "DynamicQuantizeLinear"):
        act = ActivationQuant("dynamic", "UINT8" if a is None or a.dtype is None else a.dtype.name, "per-tensor")
    else:
        a_scale, a_zp = _input(node, ias), _input(node, iaz)
        zp_value = _scalar(a_zp)
        act = ActivationQuant("static", dtype_name(a_zp) if a_zp is not None else dtype_name(a), "per-tensor",
                              _scalar(a_scale), None if zp_value is None else int(zp_value))
    nbytes, qparams = _storage(b, scale, zp)
    return LinearLayer(node.name or "", node.op_type, b.name, int(k), int(n), int(k * n), nbytes, wq, act, qparams)


def find_linear_layers(model: ir.Model) -> tuple[list[LinearLayer], list[Skip]]:
    """Every linear layer of the main graph (float or quantized, in graph order), and the MatMul/Gemm nodes
    that are neither, with `find_linear_sites`' reason."""
    scan = find_linear_sites(model)
    sites = {id(s.node): s for s in scan.sites + scan.convs}
    skips = iter(scan.skipped)  # find_linear_sites walks the same nodes in the same order
    layers, skipped = [], []
    for node in model.graph:
        layer = None
        if node.domain in ONNX_DOMAINS and node.op_type in ("MatMul", "Gemm", *CONV_OPS):
            skip = None if id(node) in sites else next(skips)
            assert skip is None or (skip.node, skip.op_type) == (node.name or "", node.op_type)
            layer = _float_or_qdq(node, sites.get(id(node)))
            if layer is None and skip is not None:
                skipped.append(skip)
        elif node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            layer = _matmulnbits(node)
        elif node.domain in (*ONNX_DOMAINS, MS_DOMAIN) and node.op_type in _INTEGER_OPS:
            layer = _integer_op(node)
        if layer is not None:
            layers.append(layer)
    return layers, skipped


def find_embeddings(model: ir.Model) -> list[Embedding]:
    """Embedding tables: Gather(axis 0) of a float or DequantizeLinear table, and GatherBlockQuantized."""
    floats = {id(n) for n in find_embedding_gathers(model)}
    out = []
    for node in model.graph:
        if node.op_type == "Gather" and id(node) in floats:
            t = node.inputs[0]
            v, h = t.const_value.shape
            wq = WeightQuant("float", t.const_value.dtype.name, t.const_value.dtype.bitwidth)
            out.append(Embedding(node.name or "", "Gather", t.name, v, h, v * h, t.const_value.nbytes, wq))
        elif node.op_type == "Gather" and attr(node, "axis", 0) == 0 and (found := _dequantized(node.inputs[0])):
            dq = found[0]
            x = dq.inputs[0]
            if len(x.const_value.shape) == 2:
                v, h = x.const_value.shape
                nbytes, qparams = _storage(x, _input(dq, 1), _input(dq, 2))
                out.append(Embedding(node.name or "", "Gather", x.name, v, h, v * h, nbytes, _qdq_weight(dq), qparams))
        elif node.op_type == "GatherBlockQuantized" and node.domain == MS_DOMAIN and _init(node.inputs[0]) is not None:
            data, scales, zp = node.inputs[0], _input(node, 2), _input(node, 3)
            bits, dt = int(attr(node, "bits", 4)), data.const_value.dtype
            v, last = data.const_value.shape[0], data.const_value.shape[-1]
            h = last * 8 // bits if dt == ir.DataType.UINT8 else last
            wq = WeightQuant("GatherBlockQuantized", dt.name if dt != ir.DataType.UINT8 else f"UINT{bits}", bits,
                             "blocked", int(attr(node, "block_size", 128)), int(attr(node, "quantize_axis", 1)),
                             dtype_name(zp) if zp is not None else None, dtype_name(scales))
            nbytes, qparams = _storage(data, scales, zp)
            out.append(Embedding(node.name or "", node.op_type, data.name, v, h, v * h, nbytes, wq, qparams))
    return out
