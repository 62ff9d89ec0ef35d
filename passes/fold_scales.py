"""Fold per-channel activation scales into linear weights, exactly: the float graph computes the same function.

For a scaling group (linear sites Y_i = X W_i reading X [..., K]; see `ptqonnx.graph.scaling`) and s [K] > 0:

    Y_i = (X diag(1/s)) (diag(s) W_i)          W_i[k, :] *= s[k]   (rows of W [K, N])

and X's producer absorbs the 1/s: `norm_gamma` γ /= s (β /= s); `linear_columns` W_P[:, k] /= s[k] (its
bias too; for an attention output W_v[:, channels[k]] /= s[k], the column X's channel k carries through
P·V); `mul_insert` a new `Mul(X, 1/s)` feeds only the group's sites. This is the shared apply step of
AWQ (Lin et al. 2024, eq. 4: Q(w·s)(x/s)) and SmoothQuant (Xiao et al. 2023, eq. 3: Y = (X diag(s)⁻¹)(diag(s) W)),
whose scale formulas live in `ptqonnx.numerics`.

Storage: constants are scaled in their stored layout (a weight stored [N, K] behind a Transpose is
scaled along axis 1), computed in float64 and rounded once to the type the node reads. A constant
reached through a Cast (e.g. float16 storage cast to float32) is replaced by a copy stored in the Cast's
target type, read directly (Transposes kept, Casts dropped): rounding s·W back to float16 would not be
exact. A constant read by any other node (a tied embedding read by a Gather, γ shared by two norms) is
never mutated: the group gets a copy (`{name}_scaled`, with copies of the Transposes between it and the
group where those are shared as well). Left-over originals are for `RemoveUnusedNodesPass`.

Requires: the groups were found on this model and not yet folded; with `no_insert`, no scaled group
needs an inserted Mul (else PreconditionError listing them). Updates: constants as above; for
`mul_insert` groups the sites read a new value (`renamed[old] = new`). Statistics of X become those of
X / s: the caller applies `Statistics.scaled(group.name, s)` (under the new name for inserted Muls).
Skips groups without a scale and scales that are exactly 1 (no edit, not `modified`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from ptqonnx.graph import FLOAT_TYPES, ConstRef, NameScope, ScalingGroup, gemm_trans_b, trace_const

__all__ = ["FoldScalesPass"]

logger = logging.getLogger(__name__)


class FoldScalesPass(InPlacePass):
    """Fold s into each scaled group: sites' weight rows *= s, the producer absorbs 1/s."""

    def __init__(
        self,
        groups_and_scales: Mapping[str, np.ndarray],
        groups: list[ScalingGroup],
        *,
        no_insert: bool = False,
    ) -> None:
        super().__init__()
        by_name = {g.name: g for g in groups}
        if len(by_name) != len(groups):
            raise ValueError("two scaling groups share one activation name")
        unknown = sorted(set(groups_and_scales) - set(by_name))
        if unknown:
            raise ValueError(f"scales given for activations that head no scaling group: {unknown}")
        self.scales: dict[str, np.ndarray] = {}
        for name, s in groups_and_scales.items():
            arr = np.asarray(s, dtype=np.float64)
            k = by_name[name].K
            if arr.shape != (k,):
                raise ValueError(f"scale for {name!r} has shape {arr.shape}, expected ({k},)")
            if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise ValueError(f"scale for {name!r} must be finite and > 0")
            self.scales[name] = arr
        self.groups = list(groups)
        self.no_insert = no_insert
        self.folded: list[str] = []
        self.inserted: list[str] = []
        self.renamed: dict[str, str] = {}
        self._names: NameScope | None = None

    def _scaled_groups(self) -> list[tuple[ScalingGroup, np.ndarray]]:
        out = []
        for g in self.groups:
            s = self.scales.get(g.name)
            if s is not None and not np.all(s == 1.0):
                out.append((g, s))
        return out

    def requires(self, model: ir.Model) -> None:
        todo = self._scaled_groups()
        for g, _ in todo:
            stale = [s.name for s in g.sites if s.node.graph is not model.graph or s.node.inputs[0] is not g.activation]
            if stale:
                raise PreconditionError(f"scaling group {g.name}: sites {stale} no longer read it (already folded?)")
        refused = [g.name for g, _ in todo if g.kind == "mul_insert"]
        if self.no_insert and refused:
            raise PreconditionError(
                f"no_insert: {len(refused)} scaling groups have no producer to absorb 1/s and would need an "
                f"inserted Mul: {refused}"
            )

    # -- constant edits ----------------------------------------------------------------------------

    def _private_const(self, graph: ir.Graph, ref: ConstRef) -> tuple[ir.Value, int]:
        """The initializer behind `ref`, read by nothing else (copied where shared); its channel axis."""
        found = trace_const(ref.node.inputs[ref.index])
        assert found, f"{ref.node.name}: input {ref.index} is no longer a constant"
        init, chain = found.initializer, list(found.chain)
        values = [ref.node.inputs[ref.index]] + [n.inputs[0] for n in chain]  # chain[i] produces values[i]
        transposes = sum(n.op_type == "Transpose" for n in chain)
        axis = ref.axis if ref.axis < 0 or transposes % 2 == 0 else 1 - ref.axis
        casts = [n for n in chain if n.op_type == "Cast"]
        if casts:  # store the copy in the type the node reads: rounding to the stored type is not exact
            dtype = ir.DataType(casts[0].attributes["to"].value)
            kept = [(n, values[i]) for i, n in enumerate(chain) if n.op_type != "Cast"]
            return self._copy(graph, init, kept, ref.node, ref.index, dtype), axis
        shared = next((j for j, v in enumerate(values) if len(v.uses()) != 1 or v.is_graph_output()), None)
        if shared is None:
            return init, axis
        consumer, idx = (ref.node, ref.index) if shared == 0 else (chain[shared - 1], 0)
        kept = [(chain[i], values[i]) for i in range(shared, len(chain))]
        return self._copy(graph, init, kept, consumer, idx, init.const_value.dtype), axis

    def _copy(self, graph: ir.Graph, init: ir.Value, chain: list[tuple[ir.Node, ir.Value]],
              consumer: ir.Node, index: int, dtype: ir.DataType) -> ir.Value:
        """A private copy of `init` (as `dtype`) and of the `chain` nodes (node side first) feeding `consumer`."""
        data = np.asarray(init.const_value.numpy()).astype(dtype.numpy())
        copy = ir.val(self._names.fresh(f"{init.name}_scaled"), const_value=ir.tensor(data, dtype=dtype))
        copy.const_value.name = copy.name
        graph.register_initializer(copy)
        new_nodes, prev = [], copy
        for old, value in reversed(chain):  # from the initializer towards the consumer
            shape = None if value.shape is None else ir.Shape(value.shape)
            out = ir.Value(name=self._names.fresh(f"{value.name}_scaled"), type=ir.TensorType(dtype), shape=shape)
            new_nodes.append(ir.Node(old.domain, old.op_type, [prev], old.attributes.values(),
                                     outputs=[out], name=self._names.fresh(f"{old.name or old.op_type}_scaled")))
            prev = out
        if new_nodes:
            graph.insert_before(consumer, new_nodes)
        consumer.replace_input_with(index, prev)
        logger.debug("%s: scaling a private copy %s of %s", consumer.name, copy.name, init.name)
        return copy

    def _scale_const(self, graph: ir.Graph, ref: ConstRef, factor: np.ndarray) -> None:
        """Multiply the constant behind `ref` by `factor` [K] along its channel axis, in its stored dtype."""
        init, axis = self._private_const(graph, ref)
        tensor = init.const_value
        arr = np.asarray(tensor.numpy()).astype(np.float64)
        if axis < 0 or arr.ndim == 1:
            f = factor
        else:
            f = factor.reshape([-1 if a == axis else 1 for a in range(arr.ndim)])
        assert arr.shape[axis] == factor.size, f"{init.name}: axis {axis} of {arr.shape} is not K={factor.size}"
        init.const_value = ir.tensor((arr * f).astype(tensor.dtype.numpy()), dtype=tensor.dtype, name=init.name)

    def _insert_mul(self, graph: ir.Graph, group: ScalingGroup, s: np.ndarray, order: dict[int, int]) -> None:
        x = group.activation
        dtype = x.dtype if x.dtype in FLOAT_TYPES else ir.DataType.FLOAT
        inv_s = (1.0 / s).astype(dtype.numpy())  # [K]
        inv = ir.val(self._names.fresh(f"{group.name}_inv_scale"), const_value=ir.tensor(inv_s, dtype=dtype))
        inv.const_value.name = inv.name
        graph.register_initializer(inv)
        out = ir.Value(name=self._names.fresh(f"{group.name}_scaled"), type=x.type,
                       shape=None if x.shape is None else ir.Shape(x.shape))
        mul = ir.node("Mul", [x, inv], outputs=[out], name=self._names.fresh(f"{group.name}_inv_scale_Mul"))
        first = min((s.node for s in group.sites), key=lambda n: order[id(n)])
        graph.insert_before(first, [mul])
        for site in group.sites:
            site.node.replace_input_with(0, out)
        self.renamed[group.name] = out.name

    # -- the pass ------------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        self._names = NameScope(graph)
        order = {id(n): i for i, n in enumerate(graph)}
        todo = self._scaled_groups()
        for group, s in todo:
            if group.kind == "mul_insert":
                self._insert_mul(graph, group, s, order)
                self.inserted.append(group.name)
            else:
                for ref in group.absorb:
                    self._scale_const(graph, ref, 1.0 / group.producer_scales(s))
                self.folded.append(group.name)
            for site in group.sites:
                k_axis = 1 if gemm_trans_b(site.node) else 0  # the K axis of W as the node sees it
                self._scale_const(graph, ConstRef(site.node, 1, k_axis), s)
        logger.info("fold scales: %d groups folded into their producer, %d with an inserted Mul, %d unscaled",
                    len(self.folded), len(self.inserted), len(self.groups) - len(todo))
        return PassResult(model, modified=bool(todo))
