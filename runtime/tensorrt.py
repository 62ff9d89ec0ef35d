"""TensorRT-RTX's ONNX parser and ahead-of-time builder, run without a GPU: does TensorRT accept this file?

`tensorrt-rtx` (pip `tensorrt-rtx-cu12`, the `trt-check` extra) splits engine building into an ahead-of-time
(AOT) phase that needs no GPU and a just-in-time phase on the user's device. Its builder therefore runs on a
CPU-only machine: by default (no compute capability set) it builds an engine portable to Ampere and later
RTX devices (SM 8.0/8.6/8.9/12.x; TensorRT-RTX docs, "CPU-Only AOT"); `ComputeCapability.CURRENT` needs a
device and fails here with cudaError 35. TensorRT-RTX networks are strongly typed (the only creation flag
it has), so the ONNX types decide the precisions. Timing caches are no-ops since TensorRT-RTX 1.2 (its JIT
keeps a runtime cache instead), so `build_engine` takes none.

What this checks is TensorRT-RTX 1.7's view. Data-center TensorRT (the `tensorrt` package; A100/H100 — the
ComputeCapability enum here stops at SM89 before SM120, no SM90) has its own build of the onnx-tensorrt
importer and builds only on a GPU, so its verdict can differ. The parser stops at its first failing node;
`ptqonnx.check.check_model(model, "tensorrt")` lists every rule broken, and catches what the parser accepts
silently (a ragged last block).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ptqonnx.errors import UserError, require_module

__all__ = ["BuildResult", "ParseResult", "ShapeRange", "TRT_EXTRA", "TRT_MODULE", "build_engine",
           "default_profile", "parse_onnx", "tensorrt_available"]

logger = logging.getLogger(__name__)

TRT_MODULE = "tensorrt_rtx"
TRT_EXTRA = "trt-check"


def tensorrt_available() -> bool:
    """Whether the TensorRT-RTX Python package can be imported (nothing is imported to find out)."""
    try:
        return importlib.util.find_spec(TRT_MODULE) is not None
    except (ImportError, ValueError):  # a parent package missing, or the module blocked in sys.modules
        return False


def _trt():
    return require_module(TRT_MODULE, TRT_EXTRA)


@dataclass(frozen=True)
class ShapeRange:
    """One optimization-profile entry: the smallest, most common and largest shape of an input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class ParseResult:
    """The parser's verdict: `errors` has one line per parser error, naming the node and its operator."""

    ok: bool
    errors: tuple[str, ...]
    inputs: tuple[tuple[str, tuple[int, ...]], ...]  # network inputs, -1 for a dynamic dimension
    seconds: float


@dataclass(frozen=True)
class BuildResult:
    """An AOT build: `ok` when a serialized plan came back (written to `plan_path` if one was asked for)."""

    ok: bool
    parse: ParseResult
    errors: tuple[str, ...]  # the builder's error log lines
    plan_bytes: int
    plan_path: Path | None
    profile: dict[str, ShapeRange] = field(default_factory=dict)
    seconds: float = 0.0


def _logger_class(trt):
    class _Collect(trt.ILogger):
        """Keep error lines for the result; everything else goes to Python logging at debug."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # called by TensorRT
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(" ".join(str(msg).split()))
            logger.debug("TensorRT %s: %s", getattr(severity, "name", severity), msg)

    return _Collect()


def _error_line(err) -> str:
    node = err.node_name() or (f"node #{err.node()}" if err.node() >= 0 else "<model>")
    op = err.node_operator()
    return f"{node}{f' ({op})' if op else ''}: {' '.join(err.desc().split())}"


def _parse(trt, path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}; pass the path of an .onnx file")
    log = _logger_class(trt)
    builder = trt.Builder(log)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    t0 = time.perf_counter()
    ok = bool(parser.parse_from_file(str(p)))  # from the file, so external data next to it is found
    errors = tuple(_error_line(parser.get_error(i)) for i in range(parser.num_errors))
    inputs = tuple((network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs))
    result = ParseResult(ok and not errors, errors, inputs, time.perf_counter() - t0)
    return result, (log, builder, network, parser)


def parse_onnx(path: str | Path) -> ParseResult:
    """Run TensorRT-RTX's ONNX parser on the file at `path` (UserError when tensorrt_rtx is missing)."""
    result, _ = _parse(_trt(), path)
    return result


def default_profile(
    inputs: Sequence[tuple[str, Sequence[int]]], *, batch: tuple[int, int, int] = (1, 1, 4),
    sequence: tuple[int, int, int] = (1, 128, 512),
) -> dict[str, ShapeRange]:
    """min/opt/max shapes for the inputs with dynamic (-1) dimensions: dimension 0 takes the `batch` range,
    every other dynamic dimension the `sequence` range (input_ids [batch, sequence], attention_mask, a KV
    cache's past length); static dimensions stay as they are."""
    profile = {}
    for name, shape in inputs:
        if all(d >= 0 for d in shape):
            continue
        ranges = [(d, d, d) if d >= 0 else (batch if i == 0 else sequence) for i, d in enumerate(shape)]
        profile[name] = ShapeRange(*(tuple(r[k] for r in ranges) for k in range(3)))
    return profile


def _compute_capabilities(trt, config, names: Sequence[str]) -> None:
    known = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    bad = [n for n in names if n.upper() not in known]
    if bad:
        raise UserError(f"unknown compute capability {bad}; TensorRT-RTX targets {known}")
    config.num_compute_capabilities = len(names)
    for i, n in enumerate(names):
        config.set_compute_capability(getattr(trt.ComputeCapability, n.upper()), i)


def _write_atomically(data, out: Path) -> None:
    """Write `data` to a temporary file beside `out`, then rename it over `out` (no partial plan on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_engine(
    path: str | Path,
    out_plan: str | Path | None = None,
    *,
    profiles: Mapping[str, ShapeRange] | None = None,
    batch: tuple[int, int, int] = (1, 1, 4),
    sequence: tuple[int, int, int] = (1, 128, 512),
    compute_capabilities: Sequence[str] | None = None,
    workspace_bytes: int | None = None,
) -> BuildResult:
    """Parse `path` into a strongly typed network and build it ahead of time (no GPU needed).

    One optimization profile covers the dynamic inputs: `default_profile(batch=, sequence=)`, with any entry
    of `profiles` (input name -> ShapeRange) taking precedence. `compute_capabilities` (e.g. ["SM86",
    "SM89"]) narrows the targets; None keeps TensorRT-RTX's portable default. The serialized plan is
    written to `out_plan` atomically (temporary file beside it, then rename) when the build succeeds.
    """
    trt = _trt()
    parsed, (log, builder, network, _parser) = _parse(trt, path)
    if not parsed.ok:
        return BuildResult(False, parsed, (), 0, None)
    profile = default_profile(parsed.inputs, batch=batch, sequence=sequence)
    names = {n for n, _ in parsed.inputs}
    unknown = sorted(set(profiles or {}) - names)
    if unknown:
        raise UserError(f"profiles name {unknown}, which are not inputs of the network; its inputs: {sorted(names)}")
    profile.update(profiles or {})
    config = builder.create_builder_config()
    if profile:
        opt = builder.create_optimization_profile()
        for name, r in profile.items():
            opt.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(opt)
    if compute_capabilities:
        _compute_capabilities(trt, config, compute_capabilities)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    log.errors.clear()
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        return BuildResult(False, parsed, tuple(log.errors) or ("the builder returned no plan",), 0, None, profile,
                           seconds)
    target = Path(out_plan) if out_plan is not None else None
    if target is not None:
        _write_atomically(plan, target)
    logger.info("TensorRT-RTX: built %s (%d bytes) in %.2f s", Path(path).name, plan.nbytes, seconds)
    return BuildResult(True, parsed, tuple(log.errors), plan.nbytes, target, profile, seconds)
