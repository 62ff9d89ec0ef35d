"""Rotate each attention head's values by one orthogonal R [d, d] (QuaRot / SpinQuant R2), float model unchanged.

For o_proj reading X = layout(P·V), V = layout(Z W_v [+ b_v]) (found by `ptqonnx.graph.value_heads`:
X's channel block b·d + j carries V column g(b)·d + j, mixed over positions only by head b's probabilities P_b):

    V' = V blockdiag(R, ..., R)            W_v[:, g·d:(g+1)·d] ← W_v[:, g·d:(g+1)·d] R   (b_v likewise)
    X'_b = P_b V'_g = (P_b V_g) R = X_b R  (P·V is linear in V and mixes only along the sequence)
    X' (blockdiag(R)ᵀ W_o) = X W_o          W_o[b·d:(b+1)·d, :] ← Rᵀ W_o[b·d:(b+1)·d, :]

Every head uses the same R, so grouped-query attention (several query heads reading one KV head) is exact:
each of them sees V_g R. d = head_dim (64 on SmolLM2); R = `kind` ("random_hadamard" default, "hadamard",
"random_orthogonal") of size d from `seed`, or an explicit `matrix`. R2 and R1 commute: R1 rewrites W_v's rows
and W_o's columns, R2 W_v's columns and W_o's rows (Ashkboos et al. 2024, sec. 4: "Hadamard on the value
heads"; Liu et al. 2024, sec. 3, R2).

A V stored in a KV cache is rotated only with `through_cache`: the present outputs (`cache_outputs`) then hold
V' and the past inputs must too, which they do when this same model wrote them (decode after a prefill equals
the prefill: tested). Skips (`skipped`, one per o_proj) what cannot be proven: fused attention ops, a cached V
without `through_cache`, outputs shared with other consumers, non-block channel maps.
`modified` is False when no pair is found.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import ConstRef, NameScope, Skip
from ptqonnx.graph.value_heads import find_value_heads
from ptqonnx.numerics.rotation import ROTATION_KINDS, block_diagonal, is_orthogonal, rotation_matrix
from ptqonnx.passes.rotate_edit import edit_channels, weight_ref

__all__ = ["RotateValueHeadsPass"]

logger = logging.getLogger(__name__)


class RotateValueHeadsPass(InPlacePass):
    """W_v ← W_v blockdiag(R), W_o ← blockdiag(R)ᵀ W_o for every v_proj → attention → o_proj found."""

    def __init__(self, kind: str = "random_hadamard", seed: int = 0, matrix: np.ndarray | None = None,
                 through_cache: bool = False) -> None:
        super().__init__()
        if kind not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation kind {kind!r}; use one of {list(ROTATION_KINDS)}")
        if matrix is not None and not is_orthogonal(matrix, 1e-6):
            raise ValueError("matrix must be square and orthogonal (RᵀR = I to 1e-6)")
        self.kind, self.seed = kind, int(seed)
        self.matrix = None if matrix is None else np.asarray(matrix, dtype=np.float64)
        self.through_cache = through_cache  # also V stored in a KV cache (the cache then holds rotated values)
        self.rotated: list[str] = []  # o_proj names
        self.cache_outputs: list[str] = []  # present outputs now holding rotated values
        self.skipped: list[Skip] = []

    def call(self, model: ir.Model) -> PassResult:
        pairs, self.skipped = find_value_heads(model, self.through_cache)
        self.rotated, self.cache_outputs = [], []
        graph, names = model.graph, NameScope(model.graph)
        for pair in pairs:
            d = pair.head_dim
            if self.matrix is not None and self.matrix.shape[0] != d:
                self.skipped.append(Skip(pair.o.name, pair.o.node.op_type,
                                         f"rotation matrix is {self.matrix.shape[0]} wide, head_dim is {d}"))
                continue
            r = self.matrix if self.matrix is not None else rotation_matrix(d, self.kind, self.seed)
            v_rot = block_diagonal(r, pair.v.N // d).T  # channel axis first: M ← blockdiag(R)ᵀ M
            o_rot = block_diagonal(r, pair.o.K // d).T
            v_refs = [weight_ref(pair.v, "N")]
            v_refs += [ConstRef(pair.v.node, 2, -1)] if pair.v.bias is not None else []
            v_refs += [pair.v_bias] if pair.v_bias is not None else []
            for ref in v_refs:
                edit_channels(graph, ref, lambda m: v_rot @ m, names)
            edit_channels(graph, weight_ref(pair.o, "K"), lambda m: o_rot @ m, names)
            self.rotated.append(pair.o.name)
            self.cache_outputs += pair.cache_outputs
        for s in self.skipped:
            logger.debug("rotate value heads: %s skipped: %s", s.node, s.reason)
        logger.info("rotate value heads: %d v/o pairs rotated, %d skipped", len(self.rotated), len(self.skipped))
        return PassResult(model, modified=bool(self.rotated))
