"""Rotate the residual stream by an orthogonal Q [H, H] (QuaRot / SpinQuant R1), leaving the float model unchanged.

With every stream norm's γ = 𝟙 (`FoldNormGammaPass`), write x̃ = x Q for every stream value x:

    embedding      x̃₀ = E[ids] Q                        E ← E Q
    norm           n(x̃) = x̃ / rms(x̃) = n(x) Q          (rms(x Q) = ‖x Q‖/√H = ‖x‖/√H: Q is orthogonal)
    reader         n(x̃) (Qᵀ W) = n(x) W                  W ← Qᵀ W   (q/k/v, gate/up, LM head)
    writer         x̃ + h (W Q) + b Q = (x + h W + b) Q   W ← W Q, b ← b Q   (o_proj, down_proj)
    scalar scale   c x̃ = (c x) Q

so every reader's output, the logits included, is unchanged (Ashkboos et al. 2024, sec. 4, "computational
invariance"; Liu et al. 2024, sec. 3, R1). Each edit is "the constant, channel axis first, becomes Qᵀ M"
(`ptqonnx.passes.rotate_edit`), computed in float64 and rounded once.

A tied LM head that still shares the table (the final γ was 𝟙 before folding, so nothing untied it) stays
tied: it reads Eᵀ, and (E Q)ᵀ = Qᵀ Eᵀ is what it needs, so the table is rotated once for both. Any other
constant read by a node outside the rewrite is copied, never mutated.

Q: `kind` "random_hadamard" (QuaRot, default), "hadamard" or "random_orthogonal" (SpinQuant's random
start; learning it by Cayley SGD is not done here) of the stream's width, from `seed`; or an explicit
orthogonal `matrix`. Requires γ = 𝟙 on every stream norm (PreconditionError otherwise). When no residual
stream is found nothing is changed and `refusal` says why. Statistics of every stream-norm output x become
those of x Q (`ptqonnx.numerics.rotation.rotate_gram`); per-channel maxima must be re-measured.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from ptqonnx.graph import ConstRef, LinearSite, NameScope, Refusal, trace_const
from ptqonnx.graph.residual import ResidualStream, find_residual_stream
from ptqonnx.numerics.rotation import ROTATION_KINDS, is_orthogonal, rotation_matrix
from ptqonnx.passes.rotate_edit import edit_channels, read_channels, weight_ref

__all__ = ["RotateResidualPass"]

logger = logging.getLogger(__name__)


class RotateResidualPass(InPlacePass):
    """x ↦ x Q on the residual stream: E ← E Q, readers W ← Qᵀ W, writers W ← W Q (b ← b Q)."""

    def __init__(self, kind: str = "random_hadamard", seed: int = 0, matrix: np.ndarray | None = None) -> None:
        super().__init__()
        if kind not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation kind {kind!r}; use one of {list(ROTATION_KINDS)}")
        if matrix is not None and not is_orthogonal(matrix, 1e-6):
            raise ValueError("matrix must be square and orthogonal (QᵀQ = I to 1e-6)")
        self.kind, self.seed = kind, int(seed)
        self.matrix = None if matrix is None else np.asarray(matrix, dtype=np.float64)
        self.refusal: Refusal | None = None
        self.rotated = 0  # constants rewritten
        self._stream: ResidualStream | Refusal | None = None

    def requires(self, model: ir.Model) -> None:
        self._stream = stream = find_residual_stream(model)
        if not stream:
            return
        left = [n.gamma.node.name for n in stream.norms if n.gamma is not None and np.any(read_channels(n.gamma) != 1)]
        if left:
            raise PreconditionError(f"rotating the residual stream needs every norm's γ folded first "
                                    f"(FoldNormGammaPass); {len(left)} norms still scale by γ, e.g. {left[0]}")
        if self.matrix is not None and self.matrix.shape[0] != stream.hidden:
            raise PreconditionError(f"rotation matrix is {self.matrix.shape[0]} wide; the residual stream is "
                                    f"{stream.hidden} wide")

    def call(self, model: ir.Model) -> PassResult:
        stream = self._stream if self._stream is not None else find_residual_stream(model)
        self._stream, self.refusal, self.rotated = None, None, 0
        if not stream:
            self.refusal = stream
            logger.info("rotate residual: nothing rotated: %s", stream.reason)
            return PassResult(model, modified=False)
        q = self.matrix if self.matrix is not None else rotation_matrix(stream.hidden, self.kind, self.seed)
        graph, names = model.graph, NameScope(model.graph)
        rotate = lambda m: q.T @ m  # noqa: E731  (channel axis first: M ← Qᵀ M)

        table, head = stream.embedding.inputs[0], stream.head
        readers = [r for n in stream.norms for r in n.readers]
        if stream.tied and self._only_head_shares(table, stream.embedding, head):
            rotated = rotate(np.asarray(table.const_value.numpy()).astype(np.float64).T).T  # E Q, for both
            table.const_value = ir.tensor(rotated.astype(table.const_value.dtype.numpy()),
                                          dtype=table.const_value.dtype, name=table.name)
            readers = [r for r in readers if r is not head]
            logger.info("rotate residual: LM head %s stays tied to %s", head.name, table.name)
        else:
            edit_channels(graph, ConstRef(stream.embedding, 0, 1), rotate, names)  # E [V, H], H axis
        refs = [weight_ref(r, "K") for r in readers]
        for w in stream.writers:
            refs.append(weight_ref(w.site, "N"))
            refs += [ConstRef(w.site.node, 2, -1)] if w.site.bias is not None else []
            refs += [w.bias] if w.bias is not None else []
        for ref in refs:
            edit_channels(graph, ref, rotate, names)
        self.rotated = len(refs) + 1
        kind = self.kind if self.matrix is None else "given"
        logger.info("rotate residual: %s Q [%d, %d]: embedding, %d readers, %d writers rotated", kind,
                    stream.hidden, stream.hidden, len(readers), len(stream.writers))
        return PassResult(model, modified=True)

    @staticmethod
    def _only_head_shares(table: ir.Value, gather: ir.Node, head: LinearSite) -> bool:
        """The table is read by the Gather and, through private Transpose/Cast nodes or Gemm's transB, by the
        LM head alone, which sees it as Eᵀ [H, V]."""
        found = trace_const(head.weight_input)
        if table.is_graph_output() or not found or found.initializer is not table or not head.weight_transposed:
            return False
        chain = list(found.chain)  # node side first
        if any(len(n.outputs[0].uses()) != 1 or n.outputs[0].is_graph_output() for n in chain):
            return False
        first = chain[-1] if chain else head.node
        return sorted(id(n) for n, _ in table.uses()) == sorted([id(gather), id(first)])
