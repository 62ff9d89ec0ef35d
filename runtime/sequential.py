"""Sequential (block-by-block) calibration: each stage's statistics come from the partly quantized model.

GPTQ's reference quantizes a transformer layer by layer, feeding each layer the outputs of the already
quantized layers before it, and inside a layer sub-layer by sub-layer ("true sequential"). Here the model is
cut into blocks along its residual stream (`ptqonnx.blocks`); for each block:

1. the block's subgraph is extracted once (inputs: the cut value, cached side values, graph inputs);
2. for each stage (linear layers sharing an activation), one ORT run over the cached block inputs of every
   calibration sample reduces the stage's activation into statistics; `solve` turns them into weights that
   are written back into the block (so later stages see quantized earlier ones);
3. one more run produces the block's outputs, which become the next block's cached inputs.

Every block runs (stages + 1) times over the calibration set: compute grows linearly with depth, and memory
holds one block's cached inputs, never all activations of all layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ptqonnx.blocks import Block, Stage
from ptqonnx.calibration.observers import Stat, TensorObserver, TensorStats
from ptqonnx.graph import LinearSite
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
    holder, index = node, 1
    value = node.inputs[1]
    while value.const_value is None:  # walk the Transpose/Cast chain back to the initializer
        holder, index = value.producer(), 0
        value = holder.inputs[0]
    private = ir.val(f"{value.name}__seq", const_value=value.const_value)
    private.const_value.name = private.name
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


def _inputs_needed(bmodel: ir.Model, activation: str) -> list[str]:
    """The inputs of the block model that `activation` depends on (for a narrower extraction)."""
    graph = bmodel.graph
    inputs = {v.name for v in graph.inputs}
    needed: set[str] = set()
    todo = [activation]
    seen: set[str] = set()
    values = {v.name: v for n in graph for v in n.outputs}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            needed.add(name)
            continue
        prod = values[name].producer()
        todo.extend(v.name for v in prod.inputs if v is not None and v.const_value is None)
    return sorted(needed)


def run_sequential(
    model: ir.Model,
    blocks: Sequence[Block],
    feeds: Sequence[Mapping[str, np.ndarray]],
    solve: StageSolver,
    *,
    threads: int | None = None,
    progress: Callable[[Block, Stage, float], None] | None = None,
) -> None:
    """Run `solve` on every stage of every block, in order, on sequentially calibrated statistics.

    `model` is not modified (blocks are extracted copies; written-back weights live in those copies).
    """
    graph_inputs = {v.name for v in model.graph.inputs}
    cache: dict[str, list[np.ndarray]] = {
        name: [np.asarray(f[name]) for f in feeds] for name in graph_inputs if all(name in f for f in feeds)
    }
    n = len(feeds)
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

        def feed(i: int) -> dict[str, np.ndarray]:
            return {name: cache[name][i] for name in block.inputs}

        for stage in block.stages:
            t0 = time.perf_counter()
            observer = TensorObserver({Stat.XTX}, xtx_chunk_dtype=np.float32)
            chunk = _Chunker(observer)
            if stage.activation in produced:
                # only the part of the block the activation needs (q/k/v's input is just the norm)
                smodel = _block_model(bmodel, _inputs_needed(bmodel, stage.activation), [stage.activation])
                sess = make_session(ir.to_proto(smodel).SerializeToString(), threads=threads)
                names = [v.name for v in smodel.graph.inputs]
                for i in range(n):
                    (x,) = sess.run([stage.activation], {name: cache[name][i] for name in names})
                    chunk.add(x)
                del sess, smodel
            else:  # the activation is itself a block input (e.g. a side value): read it from the cache
                for i in range(n):
                    chunk.add(cache[stage.activation][i])
            chunk.flush()
            updates = solve(block, stage, observer.finalize())
            for site in stage.sites:
                if site.name in updates and privates[site.name] is not None:
                    _write_back(privates[site.name], site, updates[site.name])
            if progress is not None:
                progress(block, stage, time.perf_counter() - t0)

        if keep:
            sess = make_session(ir.to_proto(bmodel).SerializeToString(), threads=threads)
            results = [sess.run(keep, feed(i)) for i in range(n)]
            del sess
            for j, name in enumerate(keep):
                cache[name] = [r[j] for r in results]
        for name in list(cache):  # drop what no later block reads
            if name not in later:
                del cache[name]
