"""`ptqonnx inspect`: what an ONNX model is and how it is quantized, ours or another tool's (pure onnx_ir).

Read from the graph alone (nothing is run; external weights are not read, only small scales):

* the file: IR version, opsets, producer, size of the model file and of every external-data file;
* the interface: inputs and outputs (dtype, shape), and a KV cache when the names follow optimum's and
  onnxruntime-genai's convention `past_key_values.{i}.key/.value` -> `present.{i}.key/.value` (the
  GPT-2 convention `past_{i}` -> `present_{i}`, K and V stacked on axis 0, is recognized too);
* every linear layer and embedding table and how it is stored (float, QDQ, MatMulNBits, the integer ops
  of ORT's QOperator format, GatherBlockQuantized) with its activations' quantization:
  `ptqonnx.graph.quantized` documents the forms;
* what is not quantizable and why: `ptqonnx.graph.find_linear_sites`' skip reasons (attention's
  activation x activation MatMuls, weights computed at run time, ...), minus the layers found quantized;
* a summary over initializers, each counted once (a tied embedding / LM head table is one tensor; once the
  head is quantized the float table and the head's codes are two, and both count). Quantized parameters are
  the logical weights behind quantized tensors (MatMulNBits' K * N, whatever the packing; every
  DequantizeLinear'd initializer) and their bytes include scales and zero points; float parameters are the
  other float initializers; bits per weight = 8 * bytes / parameters. Activation scales / zero points and
  integer constants (shapes, axes) are not parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from ptqonnx.graph import Skip
from ptqonnx.graph.quantized import (
    ActivationQuant, Embedding, LinearLayer, WeightQuant, activation_qparams, dequantized_constants, dtype_name,
    find_embeddings, find_linear_layers,
)
from ptqonnx.io import load_model
from ptqonnx.kvcache import CONVENTIONS

__all__ = [
    "ActivationQuant", "Embedding", "FileEntry", "KvCache", "LinearLayer", "ModelInfo", "Summary", "TensorSpec",
    "WeightQuant", "inspect_model", "model_files",
]


Dim = int | str | None


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int | None  # None: the external-data file is missing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # ONNX type name: FLOAT, INT64, ...
    shape: tuple[Dim, ...] | None  # ints, symbolic names, None for unnamed dims; None for unknown rank


@dataclass(frozen=True)
class KvCache:
    convention: str
    layers: int
    past: tuple[str, ...]  # cache inputs, in layer order
    present: tuple[str, ...]  # the matching outputs found
    missing_present: tuple[str, ...]  # expected outputs the model lacks
    dtype: str
    kv_heads: Dim
    head_dim: Dim
    other_inputs: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    parameters: int
    quantized_parameters: int
    quantized_bytes: int
    float_parameters: int
    float_bytes: int

    @property
    def bits_per_weight(self) -> float | None:
        """Over the quantized parameters (scales and zero points included)."""
        return 8 * self.quantized_bytes / self.quantized_parameters if self.quantized_parameters else None

    @property
    def bits_per_weight_all(self) -> float | None:
        total = self.quantized_bytes + self.float_bytes
        return 8 * total / self.parameters if self.parameters else None


@dataclass(frozen=True)
class ModelInfo:
    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kv_cache: KvCache | None
    linear_layers: tuple[LinearLayer, ...]
    embeddings: tuple[Embedding, ...]
    skipped: tuple[Skip, ...]
    summary: Summary

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes or 0 for f in self.files)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["total_bytes"] = self.total_bytes
        d["summary"].update(bits_per_weight=self.summary.bits_per_weight,
                            bits_per_weight_all=self.summary.bits_per_weight_all)
        return json.dumps(d, indent=2)

    def lines(self) -> list[str]:
        """The same, as text: a header, the interface, one line per linear layer, skips grouped by reason."""
        s = self.summary
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items()))
        out = [f"{Path(self.path).name}: IR {self.ir_version}, opsets {opsets}"
               + (f"; producer {self.producer}" if self.producer else "")]
        files = " + ".join(f"{f.name} {_size(f.bytes)}" for f in self.files)
        out.append(f"files: {files}" + (f" = {_size(self.total_bytes)}" if len(self.files) > 1 else ""))
        line = f"parameters: {_count(s.parameters)}"
        if s.quantized_parameters:
            line += (f" (quantized {_count(s.quantized_parameters)}, {_size(s.quantized_bytes)}, "
                     f"{s.bits_per_weight:.2f} bits/weight; "
                     f"float {_count(s.float_parameters)}, {_size(s.float_bytes)})")
        out.append(line + (f"; {s.bits_per_weight_all:.2f} bits/weight overall" if s.parameters else ""))
        for title, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            cache = (*self.kv_cache.past, *self.kv_cache.present) if self.kv_cache else ()
            shown = [t for t in specs if t.name not in cache]
            out.append(f"{title}: " + "; ".join(f"{t.name} {t.dtype} {_shape(t.shape)}" for t in shown))
        kv = self.kv_cache
        if kv is not None:
            out.append(f"KV cache ({kv.convention}): {kv.layers} layers, {len(kv.past)} inputs {kv.past[0]} ... "
                       f"-> {len(kv.present)} outputs, {kv.dtype}, kv_heads {kv.kv_heads}, head_dim {kv.head_dim}"
                       + (f"; missing outputs {list(kv.missing_present)}" if kv.missing_present else ""))
        kinds = _tally(layer.weight_quant.format for layer in self.linear_layers)
        convs = sum(layer.op_type == "Conv" for layer in self.linear_layers)
        title = f"linear layers ({convs} of them Conv)" if convs else "linear layers"
        out.append(f"{title}: {len(self.linear_layers)}" + (f" ({kinds})" if kinds else ""))
        width = max([len(layer.node or layer.weight) for layer in self.linear_layers] + [4])
        for layer in self.linear_layers:
            act = f"; activations {layer.activations.describe()}" if layer.activations else ""
            out.append(f"  {layer.node or layer.weight:<{width}}  {layer.K:>6} x {layer.N:<6} "
                       f"{_count(layer.params):>10}  {'Conv, ' if layer.op_type == 'Conv' else ''}"
                       f"{layer.weight_quant.describe()}{act}")
        for e in self.embeddings:
            text = e.weight_quant.describe()
            text = text if text.startswith(e.op_type) else f"{e.op_type}, {text}"
            out.append(f"embedding {e.node or e.table}: {e.V} x {e.H}, {text}")
        reasons: dict[str, list[str]] = {}
        for skip in self.skipped:
            reasons.setdefault(skip.reason, []).append(skip.node or skip.op_type)
        for reason, nodes in reasons.items():
            more = f", ... (+{len(nodes) - 3})" if len(nodes) > 3 else ""
            out.append(f"not quantizable: {len(nodes)} {reason}: {', '.join(nodes[:3])}{more}")
        return out


def model_files(model: ir.Model, path: Path) -> tuple[FileEntry, ...]:
    """The model file and every external-data file its initializers reference, with their sizes."""
    files = [FileEntry(path.name, path.stat().st_size)]
    seen: set[str] = set()
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and t.location not in seen:
            seen.add(t.location)
            f = Path(t.base_dir or path.parent) / t.location
            files.append(FileEntry(t.location, f.stat().st_size if f.is_file() else None))
    return tuple(files)


def inspect_model(path: str | Path) -> ModelInfo:
    """Describe the model at `path` (see the module docstring). Bad paths and non-ONNX files are UserErrors."""
    p = Path(path)
    model = load_model(p)
    graph = model.graph
    layers, skipped = find_linear_layers(model)
    embeddings = find_embeddings(model)
    return ModelInfo(
        path=str(p), ir_version=model.ir_version, opsets=dict(model.opset_imports),
        producer=" ".join(s for s in (model.producer_name, model.producer_version) if s),
        files=model_files(model, p),
        inputs=tuple(_spec(v) for v in graph.inputs if v.name not in graph.initializers),
        outputs=tuple(_spec(v) for v in graph.outputs), kv_cache=_kv_cache(graph),
        linear_layers=tuple(layers), embeddings=tuple(embeddings), skipped=tuple(skipped),
        summary=_summary(graph, [*layers, *embeddings]),
    )


def _summary(graph: ir.Graph, weights: list[LinearLayer | Embedding]) -> Summary:
    data: dict[str, int] = {}  # quantized initializer -> logical parameters
    qparams: set[str] = set()
    for w in weights:
        if w.weight_quant.format != "float":
            name = w.weight if isinstance(w, LinearLayer) else w.table
            data[name] = w.params
            qparams.update(w.qparams)
    for x, meta in dequantized_constants(graph):  # anything else dequantized, e.g. an int32 bias
        if x.name not in data:
            data[x.name] = x.const_value.size
            qparams.update(meta)
    activations = activation_qparams(graph) - qparams - set(data)
    qp = qb = fp = fb = 0
    for name, v in graph.initializers.items():
        t = v.const_value
        if t is None or name in activations:
            continue
        if name in data:
            qp, qb = qp + data[name], qb + t.nbytes
        elif name in qparams:
            qb += t.nbytes
        elif t.dtype.is_floating_point():
            fp, fb = fp + t.size, fb + t.nbytes
    return Summary(qp + fp, qp, qb, fp, fb)


def _spec(v: ir.Value) -> TensorSpec:
    shape = None if v.shape is None else tuple(d if isinstance(d, int) else d.value for d in v.shape)
    return TensorSpec(v.name or "", dtype_name(v), shape)


# --- the KV-cache interface ------------------------------------------------------------------------------

def _kv_cache(graph: ir.Graph) -> KvCache | None:
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    outputs = {v.name for v in graph.outputs}
    for convention, pattern, present_fmt in CONVENTIONS:
        past = [(m, v) for v in inputs if (m := pattern.fullmatch(v.name or ""))]
        if not past:
            continue
        past.sort(key=lambda mv: (int(mv[0].group(1)), mv[0].group(2)))
        expected = [present_fmt.format(i=m.group(1), kind=m.group(2)) for m, _ in past]
        first = _spec(past[0][1])
        shape = first.shape or ()
        return KvCache(
            convention=convention, layers=len({m.group(1) for m, _ in past}),
            past=tuple(v.name for _, v in past), present=tuple(n for n in expected if n in outputs),
            missing_present=tuple(n for n in expected if n not in outputs), dtype=first.dtype,
            kv_heads=shape[-3] if len(shape) >= 3 else None, head_dim=shape[-1] if shape else None,
            other_inputs=tuple(v.name for v in inputs if not pattern.fullmatch(v.name or "")),
        )
    return None


# --- text ------------------------------------------------------------------------------------------------

def _size(n: int | None) -> str:
    if n is None:
        return "(missing)"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _count(n: int) -> str:
    return f"{n:,}"


def _shape(shape: tuple[Dim, ...] | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _tally(items) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())
