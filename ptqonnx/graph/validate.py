"""Model-level preconditions of a compile, found before any work (pure IR queries).

* an already-quantized model (MatMulNBits, QDQ weights, ORT's integer ops, GatherBlockQuantized): said by
  what, and refused unless the recipe asks to quantize the float layers only (`only_float_layers`);
* weights holding NaN/Inf: refused with the tensor's name, or those layers left in float
  (`nonfinite_weights: keep-float`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from ptqonnx.graph.quantized import find_embeddings, find_linear_layers
from ptqonnx.graph.sites import LinearSite

__all__ = ["NONFINITE_REASON", "describe_quantized", "nonfinite_sites"]

NONFINITE_REASON = "weight holds NaN/Inf values; kept in float (nonfinite_weights: keep-float)"


def describe_quantized(model: ir.Model) -> str | None:
    """'15 linear layers as MatMulNBits (4-bit), 1 embedding as GatherBlockQuantized', or None if nothing in the
    model is quantized."""
    layers, _ = find_linear_layers(model)
    forms = Counter(f"{la.weight_quant.format} ({la.weight_quant.bits}-bit)" for la in layers
                    if la.weight_quant.format != "float")
    emb = Counter(e.weight_quant.format for e in find_embeddings(model) if e.weight_quant.format != "float")
    parts = [f"{n} linear layer{'s' if n > 1 else ''} as {form}" for form, n in forms.most_common()]
    parts += [f"{n} embedding{'s' if n > 1 else ''} as {form}" for form, n in emb.most_common()]
    return ", ".join(parts) or None


def nonfinite_sites(sites: list[LinearSite]) -> list[LinearSite]:
    """The sites whose weight initializer holds a NaN or an Inf (read once, block by block of rows)."""
    bad = []
    for s in sites:
        w = np.asarray(s.weight_source.const_value.numpy())
        rows = max(1, (1 << 22) // max(w.shape[-1], 1))
        if any(not np.isfinite(w[i : i + rows]).all() for i in range(0, w.shape[0], rows)):
            bad.append(s)
    return bad
