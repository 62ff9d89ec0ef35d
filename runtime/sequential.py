"""Sequential (block-by-block) calibration: each stage's statistics come from the partly quantized model.

GPTQ's reference quantizes a transformer layer by layer, feeding each layer the outputs of the already
quantized layers before it, and inside a layer sub-layer by sub-layer ("true sequential"). Here the model is
cut into blocks along its residual stream (`ptqonnx.graph.blocks`); for each block:

1. the block's subgraph is extracted once (inputs: the cut value, cached side values, graph inputs);
2. for each stage (linear layers sharing an activation), one ORT run over every calibration sample computes
   the stage's activation from the nearest values already known (block inputs, earlier stages'
   activations), which is kept for the rest of the block and reduced into statistics; `solve` turns them
   into weights that are written back into the block (so later stages see quantized earlier ones);
3. one more run produces the block's outputs from the kept activations, and they become the next block's
   cached inputs.

Each block costs about one forward pass over the calibration set (plus re-running the linear layers after
its last stages): compute grows linearly with depth, and memory holds one block's inputs and stage
activations, never all activations of all layers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqonnx.graph import Block, LinearSite, Stage, trace_const
from ptqonnx.calibration.observers import DEFAULT_SAMPLE_ROWS, Stat, TensorObserver, TensorStats, parse_stats
from ptqonnx.progress import progress_task
from ptqonnx.runtime.collect import serialize_for_session
from ptqonnx.runtime.ort import make_session

__all__ = ["StageSolver", "run_sequential"]

logger = logging.getLogger(__name__)

# (block, stage, statistics of the stage's activation) -> {site name: W_hat [N, K] float32 to write back}
StageSolver = Callable[[Block, Stage, TensorStats], Mapping[str, np.ndarray]]


def _block_model(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str]) -> ir.Model:
    graph = ir.convenience.extract(model.graph, inputs=list(inputs), outputs=list(outputs))
    return ir.Model(graph, ir_version=model.ir_version)


def _private_weight(block_model: ir.Model, site: LinearSite) -> ir.Value | None:
    """Give the site its own copy of its weight initializer inside the block model (never mutate a constant
    another node reads) and return the copy; the site's Transpose/Cast chain is kept. None when the block
    model does not contain the site (nothing it computes reads the site's output)."""
    graph = block_model.graph
    node = next((n for n in graph if n.name == site.node.name), None)
    if node is None:
        return None
    found = trace_const(node.inputs[1])
    assert found, f"{site.name}: the weight is no longer a constant"
    value = found.initializer
    holder, index = (found.chain[-1], 0) if found.chain else (node, 1)  # the node reading the initializer
    name = f"{value.name}__seq"  # a new tensor object: renaming the shared one would rename the caller's weight
    private = ir.val(name, const_value=ir.Tensor(np.asarray(value.const_value.numpy()), name=name))
    graph.register_initializer(private)
    holder.replace_input_with(index, private)
    return private


def _write_back(private: ir.Value, site: LinearSite, w_hat_nk: np.ndarray) -> None:
    stored = np.asarray(w_hat_nk if site.weight_transposed else w_hat_nk.T)
    dtype = private.const_value.dtype.numpy()
    private.const_value = ir.tensor(np.ascontiguousarray(stored).astype(dtype), name=private.name)


class _Chunker:
    """Feeds an observer row blocks of about `rows` rows: one large float32 GEMM per block instead of one per
    sample, and one float64 accumulation of XᵀX per block (the float32 partial sum covers <= `rows` rows)."""

    def __init__(self, observer: TensorObserver, rows: int = 4096) -> None:
        self.observer, self.rows = observer, rows
        self.parts: list[np.ndarray] = []
        self.held = 0

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.parts.append(x)
        self.held += x.shape[0]
        if self.held >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.observer.update(np.concatenate(self.parts))
            self.parts, self.held = [], 0


def _inputs_needed(bmodel: ir.Model, targets: Sequence[str], available: set[str]) -> list[str]:
    """The values in `available` (block inputs, cached stage activations) that `targets` are computed from,
    walking back from `targets` and stopping at the first available value on every path."""
    graph = bmodel.graph
    values = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
    needed: set[str] = set()
    todo = list(targets)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in available:
            needed.add(name)
            continue
        prod = values[name].producer()
        if prod is None:
            raise RuntimeError(f"sequential calibration: {name!r} is neither computed in the block nor available")
        todo.extend(v.name for v in prod.inputs if v is not None and v.const_value is None)
    return sorted(needed)


def run_sequential(
    model: ir.Model,
    blocks: Sequence[Block],
    feeds: Sequence[Mapping[str, np.ndarray]],
    solve: StageSolver,
    *,
    kinds: Iterable[str | Stat] = (Stat.XTX,),
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    threads: int | None = None,
    progress: Callable[[Block, Stage, float], None] | None = None,
    task: str = "block",
    block_info: Callable[[Block], str] | None = None,
    provider: str = "cpu",
) -> None:
    """Run `solve` on every stage of every block, in order, on sequentially calibrated statistics (`kinds`
    of each stage's activation; `sample_rows` rows for a `sample`).

    `model` is not modified (blocks are extracted copies; written-back weights live in those copies).
    Each stage's activation is kept for the rest of its block: a later stage's activation and the block's
    outputs are computed from the nearest kept values (the o-projection's input from the attention inputs
    already computed, the block output from the last stage's activation), so every block costs about one
    forward pass in ORT plus its linear layers after the stages, not one pass per stage.

    `progress(block, stage, seconds)` is called after each stage; each block is a step of the progress task
    `task` (`ptqonnx.progress`), shown with `block_info(block)` once the block is done. `provider`: the ORT
    execution provider of the block runs.
    """
    kinds = parse_stats(kinds)
    graph_inputs = {v.name for v in model.graph.inputs}
    cache: dict[str, list[np.ndarray]] = {
        name: [np.asarray(f[name]) for f in feeds] for name in graph_inputs if all(name in f for f in feeds)
    }
    n = len(feeds)

    def run(bmodel: ir.Model, outputs: list[str], local: dict[str, list[np.ndarray]]) -> list[list[np.ndarray]]:
        """`outputs` for every sample, from the nearest values held in `local` (block inputs and stage
        activations so far); per output a list over samples."""
        inputs = _inputs_needed(bmodel, outputs, set(local))
        smodel = _block_model(bmodel, inputs, outputs)
        for v in smodel.graph.inputs:  # exporters may leave intermediate values untyped; ORT needs input types
            if v.dtype is None:
                v.dtype = ir.DataType.from_numpy(local[v.name][0].dtype)
        with tempfile.TemporaryDirectory(prefix="ptqonnx-block-") as tmp:  # external data: linked in there
            sess = make_session(serialize_for_session(smodel, Path(tmp)), threads=threads, provider=provider)
            names = [v.name for v in smodel.graph.inputs]
            results = [sess.run(outputs, {name: local[name][i] for name in names}) for i in range(n)]
            del sess
        return [[r[j] for r in results] for j in range(len(outputs))]

    with progress_task(task, len(blocks)) as advance:
        for bi, block in enumerate(blocks):
            later = {name for b in blocks[bi + 1 :] for name in b.inputs}
            produced = {v.name for node in block.nodes for v in node.outputs}
            keep = sorted(later & produced)
            stage_outputs = [s.activation for s in block.stages if s.activation in produced]
            outputs = list(dict.fromkeys(keep + stage_outputs)) or [block.nodes[-1].outputs[0].name]
            bmodel = _block_model(model, block.inputs, outputs)
            privates = {s.name: _private_weight(bmodel, s) for st in block.stages for s in st.sites}
            missing = [name for name in block.inputs if name not in cache]
            if missing:
                raise RuntimeError(f"block {bi}: inputs {missing} were not produced by earlier blocks")
            local = {name: cache[name] for name in block.inputs}  # grows by each stage's activation

            for stage in block.stages:
                t0 = time.perf_counter()
                if stage.activation not in local:  # else: a block input (e.g. a side value), or computed already
                    (local[stage.activation],) = run(bmodel, [stage.activation], local)
                bad = next((i for i, x in enumerate(local[stage.activation])
                            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all()), None)
                if bad is not None:  # name the node from the partly quantized model as far as it is built
                    from ptqonnx.runtime.collect import raise_nonfinite

                    raise_nonfinite(model, feeds[bad], bad)
                observer = TensorObserver(kinds, sample_rows=sample_rows, xtx_chunk_dtype=np.float32)
                chunk = _Chunker(observer)
                for x in local[stage.activation]:
                    chunk.add(x)
                chunk.flush()
                updates = solve(block, stage, observer.finalize())
                for site in stage.sites:
                    if site.name in updates and privates[site.name] is not None:
                        _write_back(privates[site.name], site, updates[site.name])
                if progress is not None:
                    progress(block, stage, time.perf_counter() - t0)

            if keep:
                for name, per_sample in zip(keep, run(bmodel, keep, local)):
                    cache[name] = per_sample
            del local
            for name in list(cache):  # drop what no later block reads
                if name not in later:
                    del cache[name]
            advance(info=block_info(block) if block_info is not None else "")
