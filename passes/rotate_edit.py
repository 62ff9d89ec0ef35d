"""The one constant edit the rotation passes make: M ← f(M) along a node's channel axis, on a private copy.

Every rotation rewrite is "the constant a node reads, seen with one channel axis first, becomes f(M)":
for x' = x Q a reader's W [K, N] becomes Qᵀ W (K first), a writer's W becomes W Q, i.e. Qᵀ Wᵀ with N
first, an embedding table E [V, H] becomes E Q (H first: Qᵀ Eᵀ), a bias b [H] becomes b Q (Qᵀ b);
folding γ is diag(γ) W (K first). `edit_channels` applies f in float64 in the node's view and rounds once to
the stored type.

Which initializer to write is `FoldScalesPass`'s rule (reused, not copied): a constant also read by another
node is never mutated (the node gets a copy, with copies of the Transposes between them where those are
shared); a constant behind a Cast is replaced by a copy stored in the Cast's target type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ptqonnx.graph import ConstRef, LinearSite, NameScope, gemm_trans_b, trace_const
from ptqonnx.passes.fold_scales import FoldScalesPass

__all__ = ["edit_channels", "read_channels", "weight_ref"]


def weight_ref(site: LinearSite, axis: str = "K") -> ConstRef:
    """A linear site's weight with its K (input) or N (output) axis, as the node sees it, as the channel axis."""
    k_axis = 1 if gemm_trans_b(site.node) else 0
    return ConstRef(site.node, 1, k_axis if axis == "K" else 1 - k_axis)


def _private(graph: ir.Graph, ref: ConstRef, names: NameScope) -> tuple[ir.Value, int]:
    """FoldScalesPass's private-copy rule: (an initializer only `ref.node` reads, the stored axis of ref.axis)."""
    helper = FoldScalesPass({}, [])
    helper._names = names
    return helper._private_const(graph, ref)


def read_channels(ref: ConstRef) -> np.ndarray:
    """The constant `ref` points at, float64, channel axis first ([C] for vectors, [C, rest] for matrices)."""
    found = trace_const(ref.node.inputs[ref.index])
    assert found, f"{ref.node.name}: input {ref.index} is not a constant"
    arr = np.asarray(found.initializer.const_value.numpy()).astype(np.float64)
    if ref.axis < 0 or arr.ndim == 1:
        return arr.reshape(-1)
    return arr.T if (ref.axis == 1) != found.transposed else arr


def edit_channels(graph: ir.Graph, ref: ConstRef, fn: Callable[[np.ndarray], np.ndarray],
                  names: NameScope) -> ir.Value:
    """Replace the constant behind `ref` by fn(M), M = the constant as `ref.node` sees it with `ref.axis`
    first (a vector with a last-axis channel is passed as [C, 1]); returns the initializer written."""
    init, axis = _private(graph, ref, names)
    tensor = init.const_value
    arr = np.asarray(tensor.numpy()).astype(np.float64)
    if ref.axis < 0 or arr.ndim == 1:
        out = fn(arr.reshape(-1, 1)).reshape(arr.shape)
    else:
        assert arr.ndim == 2, f"{init.name}: rank {arr.ndim}"
        out = fn(arr) if axis == 0 else fn(arr.T).T
    assert out.shape == arr.shape, f"{init.name}: edit changed shape {arr.shape} -> {out.shape}"
    init.const_value = ir.tensor(np.ascontiguousarray(out).astype(tensor.dtype.numpy()), dtype=tensor.dtype,
                                 name=init.name)
    return init
