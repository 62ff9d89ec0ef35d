"""Model files in and out: load an ONNX model for rewriting, and save one checked and atomically.

Load refuses, with one line and before any work, what would otherwise fail later with a traceback: a
folder, an empty or non-ONNX file, an IR version or default-domain opset the installed onnx cannot read
(or older than the rewrite needs), and external data that is not safely inside the model's folder or does
not hold the bytes its tensors declare. Those facts come from a scan of the model file's protobuf wire
format (`ptqonnx.protoscan`), which reads only the model file and never the data files.

Save writes into a temporary folder beside the destination and moves the result into place (data file
first) only after it passed the checks there: no reference leaves that folder, onnx.checker, and an ONNX
Runtime session at its default optimization level. onnx_ir writes every initializer to the output's own
data file one tensor at a time (tensors still in the input's data file are copied file to file, never
loaded); the checks run on that form, where onnx.checker reads only the graph and ORT memory-maps the
weights; a small output (initializers <= EXTERNAL_DATA_THRESHOLD) is then embedded by streaming the data
into the model file (`protoscan.embed_external_data`). No step holds a second copy of the weights, and the
output folder never references the input's files.
SIGINT and SIGTERM during the save remove the temporary folder (`cleanup_on_signal`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path, PureWindowsPath

import onnx_ir as ir

from ptqonnx.errors import Interrupted, UserError
from ptqonnx.progress import Advance, progress_task
from ptqonnx.protoscan import ExternalRef, Scan, ScanError, embed_external_data, scan_model

__all__ = [
    "EXTERNAL_DATA_THRESHOLD", "MIN_IR_VERSION", "MIN_OPSET", "check_output_path", "cleanup_on_signal",
    "data_path", "file_bytes", "load_model", "model_files", "preflight", "save_model",
]

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers above which weights go to a .data file
MIN_OPSET = 13  # the oldest default-domain opset the rewrite is written for (per-axis Q/DQ for W8A8 needs 13)
MIN_IR_VERSION = 4  # below 4 every initializer must also be a graph input, which the new weights are not
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# --- load ---------------------------------------------------------------------------------------------

def data_path(output: Path) -> Path:
    """The external data file `save_model` writes beside `output` when the weights do not fit in it."""
    return output.with_name(output.name + ".data")


def model_files(path: str | Path) -> list[Path]:
    """The model file and each distinct external data file it references (as joined, not resolved)."""
    p = Path(path)
    return [p, *dict.fromkeys(p.parent / r.location for r in _scan(p).refs)]


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of the model file plus the external data files it references."""
    return sum(f.stat().st_size for f in model_files(path) if f.is_file())


def load_model(path: str | Path) -> ir.Model:
    """Load `path` lazily (external data stays memory-mapped) after refusing what cannot be rewritten."""
    p = Path(path)
    scan = _scan(p)
    _check_versions(p, scan.ir_version, scan.opsets)
    _check_external_data(p, scan.refs)
    try:
        return ir.load(str(p))
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for bytes that scan but do not parse
        raise UserError(f"{p} is not a readable ONNX model ({type(exc).__name__}); pass an .onnx file") from None


def _scan(p: Path) -> Scan:
    if p.is_dir():
        inside = sorted(f.name for f in p.glob("*.onnx"))[:3]
        hint = f" ({', '.join(inside)} there)" if inside else ""
        raise UserError(f"{p} is a folder, not a model file; pass the path of the .onnx file inside it{hint}")
    if not p.is_file():
        raise UserError(f"model file not found: {p}; pass the path of an .onnx file")
    if p.stat().st_size == 0:
        raise UserError(f"{p} is empty (0 bytes); re-export or re-download the model")
    try:
        scan = scan_model(p)
    except OSError as exc:
        raise UserError(f"cannot read {p} ({exc.strerror}); check that the file is readable") from None
    except ScanError as exc:
        looks_like_data = p.suffix in (".data", ".onnx_data", ".bin", ".pb")
        hint = "; if it is a model's external data, pass the .onnx file next to it" if looks_like_data else ""
        raise UserError(f"{p} is not a readable ONNX model (not an ONNX protobuf: {exc}); "
                        f"pass an .onnx file{hint}") from None
    return scan


def _check_versions(p: Path, ir_version: int, opsets: dict[str, int]) -> None:
    import onnx
    import onnx.defs

    newest_ir, newest_opset = onnx.IR_VERSION, onnx.defs.onnx_opset_version()
    upgrade = "upgrade them (pip install -U onnx onnxruntime) or re-export the model with an older exporter"
    if ir_version > newest_ir:
        raise UserError(f"{p} has IR version {ir_version}, newer than the installed onnx {onnx.__version__} "
                        f"reads (up to IR {newest_ir}); {upgrade}")
    if ir_version < MIN_IR_VERSION:
        raise UserError(f"{p} has IR version {ir_version}, older than {MIN_IR_VERSION} (initializers must be "
                        f"graph inputs there); re-export the model with a current exporter")
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None:
        raise UserError(f"{p} imports no default-domain (ai.onnx) opset; re-export the model with opset 21")
    if opset > newest_opset:
        raise UserError(f"{p} uses default-domain opset {opset}, newer than the installed onnx "
                        f"{onnx.__version__} knows (up to {newest_opset}); {upgrade}")
    if opset < MIN_OPSET:
        raise UserError(f"{p} uses default-domain opset {opset}; the rewrite needs opset >= {MIN_OPSET}: "
                        f"re-export with opset 21 (ptqonnx export does) or convert it with "
                        f"onnx.version_converter.convert_version(onnx.load(path), 21)")


def _check_external_data(p: Path, refs: Sequence[ExternalRef]) -> None:
    """One line for the first bad reference: each must be relative, resolve (symlinks followed) to a regular
    file inside the model's folder with one hard link (onnx_ir refuses more), and hold [offset, offset +
    nbytes) with any declared length equal to nbytes, the tensor's size from its shape and dtype."""
    folder = p.parent.resolve()
    problems = [(r, why) for r in refs if (why := _external_problem(folder, r))]
    if problems:
        r, why = problems[0]
        more = f" ({len(problems) - 1} more tensors have external-data problems)" if len(problems) > 1 else ""
        raise UserError(f"{p}: tensor {r.tensor!r}: {why}{more}")


def _external_problem(folder: Path, r: ExternalRef) -> str | None:
    keep = "keep the data file itself (not a link to elsewhere) next to the model, e.g. with cp -L"
    if not r.location:
        return "stored as external data but names no file; re-export the model"
    if os.path.isabs(r.location) or r.location.startswith("\\") or PureWindowsPath(r.location).drive:
        return f"external data location {r.location!r} is absolute; it must be relative to the model's folder: {keep}"
    target = (folder / r.location).resolve()
    if not target.is_relative_to(folder):
        return f"external data {r.location!r} resolves to {target}, outside the model's folder {folder}; {keep}"
    if not target.exists():
        return f"external data file {r.location!r} is missing from {folder}; copy it next to the model"
    if not target.is_file():
        return f"external data {r.location!r} is not a regular file; {keep}"
    st = target.stat()
    if st.st_nlink > 1:
        return (f"external data file {r.location!r} has {st.st_nlink} hard links, which onnx_ir refuses to read; "
                f"make it a single copy (cp FILE FILE.tmp && mv FILE.tmp FILE)")
    if r.nbytes is None:
        return f"its dtype {r.data_type} cannot be stored as external data; re-export the model"
    if r.offset is None or r.offset < 0 or (r.length is not None and r.length < 0):
        return f"invalid external data offset/length ({r.offset_text!r}, {r.length_text!r}); re-export the model"
    if r.length is not None and r.length != r.nbytes:
        return (f"declares {r.length} bytes of external data but its shape {list(r.dims)} and dtype need "
                f"{r.nbytes}; the data does not match the model: re-export it")
    if r.offset + r.nbytes > st.st_size:
        return (f"needs bytes {r.offset}..{r.offset + r.nbytes} of {r.location!r}, which has {st.st_size}; "
                f"the data file is truncated or belongs to another model: re-download or re-export it")
    return None


# --- output path checks, before any compute ---------------------------------------------------------

def check_output_path(output: Path, inputs: Sequence[Path], *, force: bool = False) -> None:
    """Refuse an output that would destroy an input, cannot be written, or would silently replace a file.

    `inputs`: every file the run reads (`model_files(model)`); the output and its data file must be none
    of them (compared with os.path.samefile: symlinks and hard links count). An existing output (or its
    data file) is replaced only with `force` (the CLI's --force); even then the new one is complete before
    it replaces the old one. The nearest existing folder must take a new file (probed, so read-only mounts
    and permissions are both caught)."""
    output = Path(output)
    for dst in (output, data_path(output)):
        for src in inputs:
            if dst.exists() and Path(src).exists() and os.path.samefile(dst, src):
                raise UserError(f"output {dst} is the input file {src}; pass a different -o path "
                                f"(the input is never overwritten)")
        if dst.is_dir():
            raise UserError(f"output {dst} is a folder; pass a file path such as {dst / 'model.onnx'}")
        if not force and (dst.exists() or dst.is_symlink()):
            raise UserError(f"output {dst} already exists; pass --force to replace it, or a different -o path")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot create the output folder: {folder} is not a folder; pass a different -o path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ptqonnx-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to {folder} ({exc.strerror}); pass -o in a writable folder") from None


def preflight(output: Path, estimated_bytes: int) -> None:
    """Refuse before compute when the output's disk cannot hold the output's estimated size.

    A small output (embedded, <= EXTERNAL_DATA_THRESHOLD) briefly exists twice in the temporary folder
    (data file, then the model it is streamed into), so it needs twice its size."""
    folder = Path(output).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    needed = estimated_bytes * (2 if estimated_bytes <= EXTERNAL_DATA_THRESHOLD else 1)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"not enough free disk in {folder}: writing the output needs about {_mib(needed)}, "
                        f"{_mib(free)} is free; free some space or pass -o on another disk")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --- signals ------------------------------------------------------------------------------------------

_registered: list[Path] = []
_previous: dict[int, object] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def cleanup_on_signal(*paths: Path) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM remove `paths` (files or folders) at once and raise
    `Interrupted` (exit code 128 + signal). Nestable: the outermost block installs the handlers (main
    thread only; elsewhere the paths are still removed by the caller's own cleanup) and restores the
    previous ones on exit."""
    with _lock:
        outermost = not _previous and threading.current_thread() is threading.main_thread()
        if outermost:  # a signal the process was started ignoring (nohup, background jobs) stays ignored
            _previous.update({s: signal.signal(s, _on_signal) for s in _SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN})
        _registered.extend(paths)
    try:
        yield
    finally:
        with _lock:
            for p in paths:
                _registered.remove(p)
            if outermost:
                for s, handler in _previous.items():
                    signal.signal(s, handler)
                _previous.clear()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block ends (POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _on_signal(signum: int, frame) -> None:
    with _signals_held():  # a second Ctrl-C must not cut the cleanup short
        for p in list(_registered):
            _remove(p)
    raise Interrupted(signum)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --- save ---------------------------------------------------------------------------------------------

def initializer_bytes(model: ir.Model) -> int:
    """Bytes of tensor data the model's initializers hold (its subgraphs' too)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def _tensor_header_bytes(value: ir.Value, external: bool) -> int:
    """An upper bound on an initializer's bytes besides its data: its TensorProto's name, dims, type and field
    tags (and the location, offset and length strings of an external one), and its value_info entry
    (serialized: it carries the value's metadata too)."""
    dims = len(value.shape) if value.shape is not None else 8
    return 32 + len(value.name or "") + 11 * dims + (96 if external else 0) + 8 + ir.serde.serialize_value(
        value).ByteSize()


def structure_bytes(model: ir.Model) -> int:
    """The bytes a saved `model` takes besides its tensors' data: the graph serialized without initializers
    (nodes, value_info, inputs, outputs), an upper bound on each initializer's header, the metadata, doc
    strings and functions, and 1 KiB for the model's own fields (opsets, producer). Subgraphs are serialized
    whole (their tensors counted here as well: an upper bound). Checked against written files in
    tests/test_budget.py."""
    import onnx

    graph = model.graph
    view = ir.GraphView(graph.inputs, graph.outputs, nodes=list(graph), name=graph.name)
    proto = onnx.GraphProto()
    ir.serde.serialize_graph_into(proto, view)
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    headers = sum(_tensor_header_bytes(v, external) for v in graph.initializers.values())
    props = sum(len(k) + len(v) + 8 for p in (graph.metadata_props, model.metadata_props) for k, v in p.items())
    docs = len(graph.doc_string or "") + len(model.doc_string or "")
    functions = sum(ir.serde.serialize_function(f).ByteSize() + 8 for f in model.functions.values())
    return proto.ByteSize() + headers + props + docs + functions + 1024


def predicted_file_bytes(model: ir.Model) -> int:
    """An upper bound on the bytes `save_model` writes for `model` (model file plus external data)."""
    return structure_bytes(model) + initializer_bytes(model)


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and a rename: a reader sees the old file or
    the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it owner-only)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# the files beside a Hugging Face model that loaders read with the ONNX file (optimum's ORTModelForCausalLM,
# transformers' AutoTokenizer / GenerationConfig), and onnxruntime-genai's genai_config.json (which names the
# model file: `_genai_config` points it at the output)
COMPANION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "preprocessor_config.json", "genai_config.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_companions(source: Path, output: Path) -> list[str]:
    """Copy the model folder's companion files (`COMPANION_FILES`) beside `output` when it is written to
    another folder, each atomically and only where the output's folder has none of that name; the names
    copied."""
    src, dst = source.parent.resolve(), output.parent.resolve()
    if src == dst:
        return []
    copied = []
    for name in COMPANION_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            data = (src / name).read_bytes()
            if name == "genai_config.json":
                data = _genai_config(data, output.name)
                if data is None:
                    continue
            write_atomic(dst / name, data)
            copied.append(name)
    return copied


def _genai_config(data: bytes, model_file: str) -> bytes | None:
    """onnxruntime-genai's config with `model.decoder.filename` set to the output's file name; None (not copied)
    when it is not a config of that form."""
    import json

    try:
        config = json.loads(data)
        config["model"]["decoder"]["filename"] = model_file
    except (ValueError, KeyError, TypeError):  # not JSON, no such section, or one that is not an object
        logger.info("genai_config.json has no model.decoder section: not copied")
        return None
    return (json.dumps(config, indent=4) + "\n").encode()


def _external_tensors(model: ir.Model) -> Iterator[tuple[ir.Node | None, str | None, ir.ExternalTensor]]:
    """(node, attribute name, tensor) for each external tensor in an attribute; (None, None, tensor) for
    each external initializer; in the main graph, its subgraphs and the model's functions."""
    for g in model.graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                yield None, None, v.const_value
    for body in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(body):
            for attr in node.attributes.values():
                tensor = None if attr.is_ref() or attr.type != ir.AttributeType.TENSOR else attr.value
                if isinstance(tensor, ir.ExternalTensor):
                    yield node, attr.name, tensor


@contextlib.contextmanager
def _attribute_tensors_in_memory(model: ir.Model) -> Iterator[None]:
    """onnx_ir moves initializers into the output's data file but writes attribute tensors as they are:
    an external one would still point at the input's file. Hold those (small: Constant values) in memory
    for the save, and put the originals back afterwards."""
    swapped = [(node, node.attributes[name]) for node, name, _ in _external_tensors(model) if node is not None]
    for node, attr in swapped:
        node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.Tensor(attr.value.numpy().copy(),
                                                                         dtype=attr.value.dtype, name=attr.value.name))
    try:
        yield
    finally:
        for node, attr in swapped:
            node.attributes[attr.name] = attr


def _release_mappings(model: ir.Model) -> None:
    """Unmap the input's data file before ORT maps the output's: an ExternalTensor maps again when read."""
    gc.collect()  # tensors of replaced initializers sit in node <-> value cycles with their mappings
    for _, _, t in _external_tensors(model):
        with contextlib.suppress(BufferError):  # someone still holds an array view: leave that one mapped
            t.release()


def _refuse_overwriting_sources(model: ir.Model, output: Path) -> None:
    for dst in (output, data_path(output)):
        for _, _, t in _external_tensors(model):
            if dst.exists() and os.path.exists(t.path) and os.path.samefile(dst, t.path):
                raise UserError(f"output {dst} is the input's external data file; pass a different -o path "
                                f"(the input is never overwritten)")


def save_model(model: ir.Model, output: Path, *, verify_ort: bool = True) -> list[str]:
    """Check and write `model` to `output` atomically: a self-contained folder entry (`output`, plus
    `data_path(output)` when the initializers exceed EXTERNAL_DATA_THRESHOLD) or nothing at all.

    The checks run on the external-data form, where onnx.checker reads only the graph and ORT maps the
    weights (on an embedded file both would parse all of it: about 2x its size); a small output is then
    embedded by a byte copy that leaves the graph and every tensor header as checked. Returns the notes the
    checks left for the user (see `_check_saved`). Writing and each check are steps of the "output checks"
    progress task (`ptqonnx.progress`)."""
    output = Path(output)
    _refuse_overwriting_sources(model, output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as exc:
        raise UserError(f"cannot write to {output.parent} ({exc.strerror}); pass -o in a writable folder") from None
    with cleanup_on_signal(tmpdir), progress_task("output checks", 3 if verify_ort else 2) as advance:
        try:
            tmp, tmp_data = tmpdir / output.name, data_path(tmpdir / output.name)
            with _attribute_tensors_in_memory(model):
                ir.save(model, str(tmp), external_data=tmp_data.name)
            advance(info="written")
            probes = _probe_feeds(model) if verify_ort else None
            _release_mappings(model)
            notes = _check_saved(tmp, probes, advance)
            if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
                embed_external_data(tmp, tmp_data)
            _commit(tmp, output)
            return notes
        except OSError as exc:  # disk full, output replaced by a folder meanwhile, input data gone, ...
            where = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
            raise UserError(f"could not write {output} ({where}); nothing was written: free disk space or "
                            f"pass -o elsewhere") from None
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _probe_feeds(model: ir.Model):
    from ptqonnx.calibration.sources import probe_feeds

    return probe_feeds(model, 2)


def _check_saved(tmp: Path, probes, advance: Advance) -> list[str]:
    """The outputs gate: no reference outside the output, onnx.checker's full check (strict shape inference
    too), and, with `probes`, ONNX Runtime at ORT_ENABLE_ALL and ORT_DISABLE_ALL computing the same outputs on
    them (ORT fusions have miscomputed silently before).

    Where the model quantizes activations, a gap that its float-activation view does not have is not a
    miscompute (`explain_gap`: static activation grids amplify float rounding; ORT's int8 GEMM saturates on x86
    CPUs without VNNI): the model is written and the returned note says what was measured."""
    import onnx

    outside = [r for r in _scan(tmp).refs if r.location != data_path(tmp).name]
    assert not outside, f"emitted model references files other than its own data file: {outside[:3]}"
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RuntimeError(f"internal error: the emitted model fails onnx.checker: {first}") from exc
    advance(info="onnx.checker passed")
    if probes is not None:
        from ptqonnx.runtime.ort import GAP_TOLERANCE, explain_gap, optimization_gap

        # from the path: ORT maps external data; a load failure is a UserError with ORT's first line
        gap = optimization_gap(tmp, probes)
        advance(info=f"ORT optimized vs unoptimized: {gap:.2g}")
        if not gap <= GAP_TOLERANCE:
            note = explain_gap(tmp, probes, gap)
            if note is not None:
                logger.warning("%s", note)
                return [note]
            raise RuntimeError(f"internal error: ONNX Runtime's optimized graph computes other outputs than the "
                               f"unoptimized one on a probe input (max relative difference {gap:.3g} > "
                               f"{GAP_TOLERANCE}); nothing was written")
    return []


def _commit(tmp: Path, output: Path) -> None:
    """Data file first, model last, with SIGINT/SIGTERM held back so no half-moved pair is left."""
    moves = [(f, output.parent / f.name) for f in model_files(tmp)[1:]] + [(tmp, output)]
    with _signals_held():
        for src, dst in moves:
            os.replace(src, dst)
    logger.debug("wrote %s", ", ".join(str(d) for _, d in moves))
