"""Fold each stream RMSNorm's γ into the linear layers that read it, so the norm commutes with a rotation.

For a norm y = n(x) ⊙ γ (n(x) = x / rms(x)) read by linear layers Y_i = y W_i:

    Y_i = (n(x) ⊙ γ) W_i = n(x) (diag(γ) W_i)          W_i[k, :] ← γ_k W_i[k, :],   γ ← 𝟙

Exact for any γ (zero and negative entries included). γ is set to ones rather than removed so the norm
keeps its `Mul` (SmoothQuant / AWQ can still fold a scale into it later). This is the first step of QuaRot
(Ashkboos et al. 2024, sec. 4: "fuse the RMSNorm scale into the next linear layer"): n(x Q) = n(x) Q, but
(n(x) Q) ⊙ γ ≠ (n(x) ⊙ γ) Q, so a rotation of the stream needs γ = 𝟙.

A tied LM head (it reads the embedding table through a Transpose) cannot share the table once the final
norm's γ is folded into it: it gets its own copy (`untied_bytes` counts it; the Gather keeps the original).

Requires: a residual stream found by `ptqonnx.graph.residual.find_residual_stream`; otherwise nothing is
changed and `refusal` says why. Skips norms whose γ is already 𝟙 or absent (`modified` False when all are).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import NameScope, Refusal, trace_const
from ptqonnx.graph.residual import find_residual_stream
from ptqonnx.passes.rotate_edit import edit_channels, read_channels, weight_ref

__all__ = ["FoldNormGammaPass"]

logger = logging.getLogger(__name__)


class FoldNormGammaPass(InPlacePass):
    """W_i ← diag(γ) W_i for each linear layer reading a stream RMSNorm; γ ← 𝟙."""

    def __init__(self) -> None:
        super().__init__()
        self.refusal: Refusal | None = None
        self.folded: list[str] = []  # the γ constants folded
        self.untied_bytes = 0

    def call(self, model: ir.Model) -> PassResult:
        self.refusal, self.folded, self.untied_bytes = None, [], 0
        stream = find_residual_stream(model)
        if not stream:
            self.refusal = stream
            logger.info("fold norm γ: nothing folded: %s", stream.reason)
            return PassResult(model, modified=False)
        graph, names = model.graph, NameScope(model.graph)
        table = stream.embedding.inputs[0]
        for norm in stream.norms:
            if norm.gamma is None:
                continue
            gamma = read_channels(norm.gamma)
            if np.all(gamma == 1.0):
                continue
            for site in norm.readers:
                shared = site.weight_source is table
                written = edit_channels(graph, weight_ref(site), lambda m: gamma[:, None] * m, names)
                if shared and written is not table:
                    self.untied_bytes += written.const_value.nbytes
                    logger.info("fold norm γ: LM head %s untied from the embedding table %s (+%d bytes)",
                                site.name, table.name, written.const_value.nbytes)
            name = trace_const(norm.gamma.node.inputs[norm.gamma.index]).initializer.name
            edit_channels(graph, norm.gamma, np.ones_like, names)
            self.folded.append(name)
        logger.info("fold norm γ: %d of %d norms folded into their readers", len(self.folded), len(stream.norms))
        return PassResult(model, modified=bool(self.folded))
