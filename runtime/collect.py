"""One ONNX Runtime pass over the calibration feeds, reduced to the requested statistics.

The model is cloned (`ir.Model.clone` shares tensors, so no weight is copied), every requested
intermediate value is appended to the clone's graph outputs, and the clone runs once per feed. ORT's graph
optimizers leave a value that is a graph output computed as in the unoptimized graph (fusions check
`NodeProducesGraphOutput` and skip), so the default level ORT_ENABLE_ALL is safe; the price is that
fusions across a requested value do not happen during calibration. Each output is reduced by its
`TensorObserver` and dropped before the next feed: memory is the statistics plus one feed's activations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ptqonnx.calibration.observers import DEFAULT_SAMPLE_ROWS, Stat, TensorObserver, parse_stats
from ptqonnx.calibration.stats import Statistics
from ptqonnx.errors import UserError
from ptqonnx.progress import progress_task
from ptqonnx.runtime.ort import make_session

__all__ = ["collect_statistics", "instrumented_session", "first_nonfinite", "raise_nonfinite", "serialize_for_session"]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 1_800_000_000  # stay clear of protobuf's 2 GiB message limit

Progress = Callable[[int, "int | None"], None]


def collect_statistics(
    model: ir.Model | str | Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    requests: Mapping[str, Iterable[str | Stat]],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
    opt_level: str = "all",
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    label: str = "calibration",
    provider: str = "cpu",
) -> Statistics:
    """Run `model` once over `batches` and return the requested statistics per value name.

    `requests` maps value names (graph inputs or intermediate values) to statistic kinds
    (`"absmax"`, `"mean_abs"`, `"minmax"`, `"xtx"`, `"sample"`). The caller's model object and file are
    never modified. `progress(done, total)` is called after each feed (`total` is None for iterators), and
    each feed is a step of the `label` task (`ptqonnx.progress`). `provider`: the ORT execution provider
    (`ptqonnx.runtime.ort.PROVIDERS`; a GPU one never falls back to the CPU).
    """
    reqs = {name: parse_stats(kinds) for name, kinds in requests.items()}
    reqs = {k: v for k, v in reqs.items() if v}
    if not reqs:
        return Statistics()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    observers = {
        name: TensorObserver(kinds, sample_rows=sample_rows, seed=seed + i)
        for i, (name, kinds) in enumerate(sorted(reqs.items()))
    }
    with instrumented_session(model, list(reqs), threads=threads, opt_level=opt_level, provider=provider) as (
            sess, fetched), \
            progress_task(label, total) as advance:
        graph_inputs = [i.name for i in sess.get_inputs()]
        from_feed = [n for n in reqs if n in graph_inputs]
        t0 = time.perf_counter()
        done = 0
        for feed in batches:
            missing = [n for n in graph_inputs if n not in feed]
            if missing:
                raise UserError(f"calibration feed lacks model inputs {missing}; provide them in the data")
            outs = sess.run(fetched, {k: feed[k] for k in graph_inputs})
            if not all(_finite(a) for a in outs):
                raise_nonfinite(model, feed, done)
            for name, arr in [*zip(fetched, outs), *((n, feed[n]) for n in from_feed)]:
                _observe(observers[name], name, arr, done)
            del outs
            done += 1
            advance()
            if progress is not None:
                progress(done, total)
    if done == 0:
        raise UserError("calibration data is empty; pass at least one sample")
    stats = Statistics({name: obs.finalize() for name, obs in observers.items()})
    logger.info(
        "collected statistics of %d values over %d feeds in %.1f s", len(stats), done, time.perf_counter() - t0
    )
    return stats


def _observe(observer: TensorObserver, name: str, arr: np.ndarray, index: int) -> None:
    """One feed's value into its observer; a last axis that changes between feeds (statistics are per channel
    of the last axis) is the data's problem, said in one line."""
    if observer.channels is not None and arr.ndim and arr.shape[-1] != observer.channels:
        raise UserError(f"calibration sample {index + 1} gives {name!r} a last axis of {arr.shape[-1]} where the "
                        f"samples before gave {observer.channels} (images of different widths, or sequences of "
                        "different lengths?); give samples of one shape (resize, crop or pad them)")
    observer.update(arr)


@contextlib.contextmanager
def instrumented_session(
    model: ir.Model | str | Path,
    value_names: list[str],
    *,
    threads: int | None = None,
    opt_level: str = "all",
    provider: str = "cpu",
):
    """Context manager: (ORT session, names of its fetched outputs) for a clone of `model` whose graph
    outputs include `value_names` (graph inputs among them are not fetched; read them from the feed)."""
    clone = ir.load(os.fspath(model)) if isinstance(model, (str, Path)) else model.clone()
    fetched = _expose_values(clone, value_names)
    with tempfile.TemporaryDirectory(prefix="ptqonnx-calib-") as tmp:
        src = serialize_for_session(clone, Path(tmp))
        sess = make_session(src, opt_level=opt_level, threads=threads, provider=provider)
        have = {o.name for o in sess.get_outputs()}
        lost = [n for n in fetched if n not in have]
        if lost:  # pragma: no cover - ORT keeps graph outputs; guard against a future optimizer
            raise UserError(f"ONNX Runtime dropped calibration outputs {lost[:5]}; retry with opt_level='basic'")
        try:
            yield sess, fetched
        finally:
            del sess


def _expose_values(model: ir.Model, names: list[str]) -> list[str]:
    """Append the requested intermediate values to the graph outputs; returns the names to fetch."""
    graph = model.graph
    produced: dict[str, ir.Value] = {}
    for node in graph:  # main graph only: subgraph values cannot be graph outputs
        for out in node.outputs:
            if out.name:
                produced[out.name] = out
    inputs = {v.name for v in graph.inputs}
    consts = set(graph.initializers) - inputs
    const_req = sorted(n for n in names if n in consts)
    if const_req:
        raise UserError(
            f"calibration values {const_req[:5]} are constant initializers, not activations; request the "
            "activation that feeds the MatMul instead"
        )
    unknown = sorted(n for n in names if n not in produced and n not in inputs)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserError(
            f"the model has no values named {unknown[:5]}{more}; request names of graph inputs or node outputs"
        )
    fetch = [n for n in names if n not in inputs]
    untyped = [n for n in fetch if produced[n].dtype is None]
    if untyped:
        ShapeInferencePass()(model)
        still = [n for n in untyped if produced[n].dtype is None]
        for n in still:
            logger.warning("no type known for %s; assuming float32", n)
            produced[n].type = ir.TensorType(ir.DataType.FLOAT)
    present = {v.name for v in graph.outputs}
    for n in fetch:
        if n not in present:
            graph.outputs.append(produced[n])
            present.add(n)
    return fetch


def serialize_for_session(model: ir.Model, tmp: Path) -> bytes | str:
    """Bytes for an in-memory session, or a path in `tmp` when external data or > 2 GB is involved.

    External tensors are hard-linked into `tmp` when possible (ORT refuses data outside the model's
    folder); otherwise the whole model is re-saved there with external data.
    """
    external = [
        v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
    ]
    in_memory = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )
    if not external and in_memory < _PROTO_LIMIT:
        return ir.to_proto(model).SerializeToString()
    path = tmp / "model.onnx"
    if external and in_memory < _PROTO_LIMIT and _link_external(external, tmp):
        path.write_bytes(ir.to_proto(model).SerializeToString())
        return str(path)
    logger.info("writing a temporary copy of the model with external data to %s", tmp)
    ir.save(model, path, external_data="model.onnx.data")
    return str(path)


def _link_external(tensors: list[ir.ExternalTensor], tmp: Path) -> bool:
    files = {}
    for t in tensors:
        files[t.location] = Path(t.base_dir) / t.location
    try:
        for loc, src in files.items():
            dst = tmp / loc
            if tmp.resolve() not in dst.resolve().parents:
                return False
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    except OSError as exc:  # e.g. cross-device link
        logger.debug("cannot hard-link external data (%s); copying the model instead", exc)
        for loc in files:
            with contextlib.suppress(OSError):
                (tmp / loc).unlink()
        return False
    return True


def _finite(a) -> bool:
    a = np.asarray(a)
    return not np.issubdtype(a.dtype, np.floating) or bool(np.isfinite(a).all())


def first_nonfinite(model: ir.Model | str | Path, feed: Mapping[str, np.ndarray]) -> ir.Node | None:
    """The first node (graph order) whose float output holds NaN/Inf on `feed` while its inputs do not: every
    node output is fetched once (a diagnosis on the error path, not a calibration run)."""
    clone = ir.load(os.fspath(model)) if isinstance(model, (str, Path)) else model
    nodes = list(clone.graph)
    names = [v.name for n in nodes for v in n.outputs if v.name and (v.dtype is None or v.dtype.is_floating_point())]
    with instrumented_session(clone, names, opt_level="disable") as (sess, fetched):
        graph_inputs = [i.name for i in sess.get_inputs()]
        values = dict(zip(fetched, sess.run(fetched, {k: feed[k] for k in graph_inputs})))
    bad = {k for k, v in values.items() if not _finite(v)}
    for n in nodes:
        if any(v.name in bad for v in n.outputs) and not any(v is not None and v.name in bad for v in n.inputs):
            return n
    return None


def raise_nonfinite(model: ir.Model | str | Path, feed: Mapping[str, np.ndarray], index: int) -> None:
    """UserError naming the first node that produced NaN/Inf on calibration sample `index`."""
    node = first_nonfinite(model, feed)
    where = f"node {node.name!r} ({node.op_type})" if node is not None else "the model"
    raise UserError(f"calibration sample {index}: {where} produced NaN/Inf from finite inputs; the float model "
                    "overflows on this data (an fp16 model? out-of-range inputs?): check the data or the model")
