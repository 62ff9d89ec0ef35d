"""Read and write an ONNX model file's protobuf wire format in pieces, never the whole model at once.

The protobuf encoding (https://protobuf.dev/programming-guides/encoding/) is a sequence of fields, each a
varint key `field_number << 3 | wire_type` followed by a varint (type 0), 8 or 4 bytes (types 1, 5) or a
varint length and that many bytes (type 2: strings, bytes, sub-messages, packed repeated scalars). A
parser accepts fields in any order, and a repeated field's elements may be spread among other fields.

`scan_model` walks only the messages that can hold tensors (onnx.proto: ModelProto.graph = 7,
.training_info = 20, .functions = 25; GraphProto.node = 1, .initializer = 5, .sparse_initializer = 15;
NodeProto.attribute = 5; AttributeProto.t/g/tensors/graphs = 5/6/10/11, sparse_tensor(s) = 22/23;
SparseTensorProto.values/indices = 1/2) and skips every other payload by its length, so tensor data is
never read: a memory-mapped scan of a 2 GB embedded model touches the headers only.

`embed_external_data` uses the same two facts to stream a model with its initializers in a data file
into one self-contained file: ModelProto = (its fields but graph) ‖ field 7 holding GraphProto = (its
fields but initializer) ‖ one field 5 per initializer, each = (TensorProto without external_data and
data_location) ‖ field 9 (raw_data) = the data file's bytes [offset, offset + length), copied file to
file. The external data spec (onnx/docs/ExternalData.md) stores exactly the bytes raw_data would hold.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

__all__ = ["ExternalRef", "Scan", "ScanError", "embed_external_data", "scan_model"]

_CHILDREN = {  # message kind -> {field number: kind of the sub-message it holds}
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class ScanError(ValueError):
    """The bytes are not a protobuf ModelProto."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor stored as external data (TensorProto.data_location == EXTERNAL)."""

    tensor: str
    location: str
    offset_text: str | None
    length_text: str | None
    data_type: int
    dims: tuple[int, ...]

    @property
    def offset(self) -> int | None:
        return _int_or_none(self.offset_text, default=0)

    @property
    def length(self) -> int | None:
        return _int_or_none(self.length_text, default=None)

    @property
    def nbytes(self) -> int | None:
        """ceil(elements * bits / 8) from dims and data_type; None for strings and unknown types."""
        try:
            dtype = ir.DataType(self.data_type)
            bits = dtype.bitwidth
        except (ValueError, TypeError):
            return None
        if dtype == ir.DataType.STRING or not bits:
            return None
        return math.ceil(math.prod(self.dims) * bits / 8)


@dataclass
class Scan:
    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    refs: list[ExternalRef] = field(default_factory=list)


def _int_or_none(text: str | None, default: int | None) -> int | None:
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return None


def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ScanError("malformed varint")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value): an int for a varint, the (start, end) span of a length-delimited
    payload; fixed-width fields are skipped."""
    i = start
    try:
        while i < end:
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise ScanError("field number 0")
            if wire == 0:
                value, i = _varint(buf, i)
                yield number, wire, value
            elif wire == 2:
                n, i = _varint(buf, i)
                if i + n > end:
                    raise ScanError("a field runs past the end of its message")
                yield number, wire, (i, i + n)
                i += n
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                raise ScanError(f"wire type {wire} is not used by ONNX")
    except IndexError:
        raise ScanError("truncated") from None
    if i != end:
        raise ScanError("truncated")


def _text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _tensor(buf, span: tuple[int, int]) -> ExternalRef | None:
    name, data_type, dims, location, entries = "", 0, [], 0, {}
    for number, wire, value in _fields(buf, *span):
        if number == 1:  # dims: int64, unpacked (proto2) or packed
            if wire == 0:
                dims.append(value - (1 << 64) if value >= 1 << 63 else value)
            elif wire == 2:
                dims += [d - (1 << 64) if d >= 1 << 63 else d for _, _, d in _packed(buf, value)]
        elif number == 2 and wire == 0:
            data_type = value
        elif number == 8 and wire == 2:
            name = _text(buf, value)
        elif number == 14 and wire == 0:
            location = value
        elif number == 13 and wire == 2:  # StringStringEntryProto: key = 1, value = 2
            kv = {n: _text(buf, v) for n, w, v in _fields(buf, *value) if w == 2}
            entries[kv.get(1, "")] = kv.get(2, "")
    if location != _EXTERNAL:
        return None
    return ExternalRef(name, entries.get("location", ""), entries.get("offset"), entries.get("length"),
                       data_type, tuple(dims))


def _packed(buf, span: tuple[int, int]):
    i, end = span
    while i < end:
        value, i = _varint(buf, i)
        yield 1, 0, value


def _walk(buf, span: tuple[int, int], kind: str, refs: list[ExternalRef]) -> None:
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf, *span):
        if wire == 2 and number in children:
            if children[number] == "tensor":
                if (ref := _tensor(buf, value)) is not None:
                    refs.append(ref)
            else:
                _walk(buf, value, children[number], refs)


def scan_model(path: Path) -> Scan:
    """The IR version, opset imports (domain -> version) and external tensors of the model at `path`."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        scan, has_graph = Scan(), False
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number == 1 and wire == 0:
                scan.ir_version = value
            elif number == 8 and wire == 2:  # OperatorSetIdProto: domain = 1, version = 2
                parts = {n: v for n, _, v in _fields(buf, *value)}
                domain = _text(buf, parts[1]) if isinstance(parts.get(1), tuple) else ""
                scan.opsets[domain] = parts.get(2, 0) if isinstance(parts.get(2), int) else 0
            elif number == 7 and wire == 2:
                has_graph = True
        if not has_graph or scan.ir_version == 0:
            raise ScanError("no graph or IR version")
        _walk(buf, (0, len(buf)), "model", scan.refs)
        return scan


def _key(number: int, wire: int = 2) -> bytes:
    return _encode(number << 3 | wire)


def _encode(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _copy_range(src, dst, offset: int, length: int) -> None:
    src.seek(offset)
    while length > 0:
        chunk = src.read(min(length, 1 << 20))
        if not chunk:
            raise OSError(f"{src.name} ends before byte {offset + length}")
        dst.write(chunk)
        length -= len(chunk)


def embed_external_data(model_path: Path, data_file: Path) -> None:
    """Rewrite `model_path` (whose graph keeps its initializers in `data_file`) with those initializers
    embedded as raw_data, holding one header in memory at a time; `data_file` is removed unless a tensor
    outside the main graph's initializers (a subgraph's) still references it."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)  # small: the weights are in data_file
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.ClearField("initializer")
    pieces = []  # (serialized header, (offset, length) of raw_data in data_file or None)
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location != onnx.TensorProto.EXTERNAL or ext.get("location") != data_file.name:
            pieces.append((t.SerializeToString(), None))
            continue
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        bare.ClearField("external_data")
        bare.ClearField("data_location")
        pieces.append((bare.SerializeToString(), (int(ext.get("offset", 0)), int(ext["length"]))))
    fields = [(h, 0 if r is None else len(_key(9)) + len(_encode(r[1])) + r[1], r) for h, r in pieces]
    graph_bytes = graph.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(_key(5)) + len(_encode(len(h) + n)) + len(h) + n for h, n, _ in fields)
    tmp = model_path.with_name(model_path.name + ".embedding")
    with open(data_file, "rb") as src, open(tmp, "wb") as dst:
        dst.write(head.SerializeToString() + _key(7) + _encode(graph_len) + graph_bytes)
        for header, n, raw in fields:
            dst.write(_key(5) + _encode(len(header) + n) + header)
            if raw is not None:
                dst.write(_key(9) + _encode(raw[1]))
                _copy_range(src, dst, *raw)
    os.replace(tmp, model_path)
    if not any(r.location == data_file.name for r in scan_model(model_path).refs):
        data_file.unlink()
