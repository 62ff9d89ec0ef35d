"""Cut a model into sequential blocks along its residual stream, found structurally.

A *cut* is a point in the (topologically sorted) node order where exactly one live value depends on a
linear layer's output: everything after the cut sees the linear layers before it only through that
value, or where every such live value is an output of the node just before the cut (a fused residual norm,
ORT's SkipSimplifiedLayerNormalization, returns the normalized value and the residual sum: the block after
reads both). In a decoder-only transformer these are the residual-stream values after each residual Add or
fused norm (after attention and after the MLP of every layer); no node or value names are used.

Other values live across a cut ("side" values: graph inputs and values that depend on no linear layer,
such as rotary cos/sin tables or attention masks computed from `input_ids`) are the same for the float
and the quantized model, so a sequential quantizer can cache them once per sample.

Each block lists its linear sites in *stages*: sites sharing an activation form one stage (q/k/v, then o,
then gate/up, then down), in graph order; GPTQ's true-sequential order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from ptqonnx.graph.sites import LinearSite

__all__ = ["Block", "Stage", "find_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    activation: str  # the value name all its sites read
    sites: tuple[LinearSite, ...]


@dataclass(frozen=True)
class Block:
    """Nodes between two cuts. `inputs` = values read from outside (cut value, side values, graph inputs)."""

    index: int
    nodes: tuple[ir.Node, ...]
    inputs: tuple[str, ...]
    output: str | None  # the cut value after the block (None for the last block: its outputs are the graph's;
    # where the live values are several outputs of the block's last node, the first of them)
    stages: tuple[Stage, ...] = field(default=())


def _value_names_read(nodes: list[ir.Node]) -> list[str]:
    produced = {v.name for n in nodes for v in n.outputs}
    seen: dict[str, None] = {}
    for n in nodes:
        for v in n.inputs:
            if v is not None and v.const_value is None and v.name not in produced:
                seen.setdefault(v.name, None)
    return list(seen)


def find_blocks(model: ir.Model, sites: list[LinearSite]) -> list[Block]:
    """Blocks in graph order; a graph with no cut gives one block holding every site.

    Requires a topologically sorted graph (onnx_ir's TopologicalSortPass gives one).
    """
    graph = model.graph
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    site_nodes = {id(s.node) for s in sites}

    # does each value depend (transitively) on the output of a linear site?
    tainted: set[str] = set()
    for n in nodes:
        if id(n) in site_nodes or any(v is not None and v.name in tainted for v in n.inputs):
            tainted.update(v.name for v in n.outputs)

    # last position at which each value is read by a node. Graph outputs are sinks: what later nodes compute
    # does not depend on them, so a KV graph's present.* (a Concat of the cache and this layer's k/v, read
    # by the attention after it and then returned) does not hold every cut open to the end.
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v is not None:
                last_use[v.name] = i

    cuts: list[tuple[int, str]] = []  # (index of the last node before the cut, cut value)
    live_tainted: set[str] = set()
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v is not None and v.name in live_tainted and last_use.get(v.name, -1) <= i:
                live_tainted.discard(v.name)
        for v in n.outputs:
            if v.name in tainted and last_use.get(v.name, -1) > i:
                live_tainted.add(v.name)
        outs = [v.name for v in n.outputs]
        if live_tainted and i < len(nodes) - 1 and (len(live_tainted) == 1 or live_tainted <= set(outs)):
            cut = next(iter(live_tainted)) if len(live_tainted) == 1 else next(o for o in outs if o in live_tainted)
            if not cuts or cuts[-1][1] != cut:
                cuts.append((i, cut))

    blocks: list[Block] = []
    start = 0
    bounds = [(i, c) for i, c in cuts] + [(len(nodes) - 1, None)]
    for end, cut in bounds:
        block_nodes = nodes[start : end + 1]
        ids = {id(n) for n in block_nodes}
        block_sites = [s for s in sites if id(s.node) in ids]
        if not block_sites and cut is not None:
            continue  # no linear layer before this cut yet: merge into the next block
        by_act: dict[str, list[LinearSite]] = {}
        for s in sorted(block_sites, key=lambda s: position[id(s.node)]):
            by_act.setdefault(s.activation.name, []).append(s)
        stages = tuple(Stage(a, tuple(ss)) for a, ss in by_act.items())
        blocks.append(Block(len(blocks), tuple(block_nodes), tuple(_value_names_read(block_nodes)), cut, stages))
        start = end + 1
    # debug: a query, called by more than one stage per compile; the block progress lines say the count
    logger.debug("found %d sequential blocks (%d cuts along the residual stream)", len(blocks), len(cuts))
    return blocks
