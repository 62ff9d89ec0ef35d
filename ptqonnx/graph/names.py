"""The one unique-name helper: deterministic new names derived from the original (`{w}_Q4`, `{w}_scales`).

New initializers, values and nodes get `base`, or `base_1`, `base_2`, ... when `base` is taken by any value
(graph input, initializer, node output) or node of the main graph. A pass that adds many names builds one
`NameScope` and reuses it; `add_initializer` builds one per call when none is given.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["NameScope", "add_initializer", "unique_name"]


class NameScope:
    """The names in use in `graph`; `fresh(base)` returns an unused one and reserves it."""

    def __init__(self, graph: ir.Graph) -> None:
        names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
            if node.name:
                names.add(node.name)
        self._names = names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name


def unique_name(graph: ir.Graph, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... if the graph already uses that name."""
    return NameScope(graph).fresh(base)


def add_initializer(graph: ir.Graph, base_name: str, array: np.ndarray | ir.TensorProtocol,
                    scope: NameScope | None = None) -> ir.Value:
    """Register a new initializer under a deterministic unique name derived from `base_name`."""
    name = (scope or NameScope(graph)).fresh(base_name)
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
    tensor.name = name
    value = ir.val(name, const_value=tensor)
    graph.register_initializer(value)
    return value
