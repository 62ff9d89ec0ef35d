"""An online Hadamard transform before each MLP down projection (QuaRot / SpinQuant R4), float model unchanged.

For down_proj y = x W (x [..., K], W [K, N]) and the orthonormal Hadamard H = A ⊗ B [K, K] (A [a, a], B [b, b],
K = a·b; `ptqonnx.numerics.rotation.kronecker_factors`, e.g. 1536 = 12 · 128):

    y = (x H) (Hᵀ W)                                       W ← Hᵀ W   (float64, rounded once)

x H is computed at run time with standard ONNX ops on x viewed as X [rows, a, b] (row-major: channel
i = i_a·b + i_b), using (A ⊗ B)ᵢⱼ = A[i_a, j_a] B[i_b, j_b] so that x (A ⊗ B) = flatten(Aᵀ X B):

    Reshape [rows, a, b] → Transpose → MatMul(Bᵀ, ·) = (X B)ᵀ → Transpose → MatMul(Aᵀ, ·) = Aᵀ X B
    → Reshape to Shape(x)

a·b·(a + b) multiply-adds per row instead of K². Both MatMuls take the constant as their first input, so no
quantizer treats them as linear layers (weight x activation) and their inputs stay float; TensorRT and every
ONNX runtime run them. The nodes carry metadata `ptqonnx.role = online_hadamard`. The activation x H has
no outlier channels: a channel of size c becomes c/√K in every channel (QuaRot sec. 4, "online Hadamard
before down_proj"), so a static per-tensor INT8 grid and W's INT4 groups both see flat inputs.

Targets: the linear layers writing into the residual stream whose input is not an attention output (the
MLP down projections; `ptqonnx.graph.residual`). Skips (`skipped`): K with no Hadamard construction, a
site already fed by an online Hadamard (so running twice changes nothing).
When no residual stream is found nothing is changed and `refusal` says why.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ptqonnx.graph import FLOAT_TYPES, LinearSite, NameScope, Refusal, Skip
from ptqonnx.graph.sites import ONLINE_HADAMARD_ROLE, ROLE_KEY
from ptqonnx.graph.attention import attention_path
from ptqonnx.graph.residual import find_residual_stream
from ptqonnx.numerics.rotation import apply_kronecker, has_hadamard, kronecker_factors
from ptqonnx.passes.rotate_edit import edit_channels, weight_ref

__all__ = ["ROLE_KEY", "ONLINE_HADAMARD_ROLE", "OnlineHadamardPass"]

logger = logging.getLogger(__name__)



class OnlineHadamardPass(InPlacePass):
    """x ↦ x H inserted before each MLP down projection, W_down ← Hᵀ W_down."""

    def __init__(self) -> None:
        super().__init__()
        self.refusal: Refusal | None = None
        self.rotated: list[str] = []
        self.skipped: list[Skip] = []

    def _skip_reason(self, site: LinearSite) -> str | None:
        x = site.activation
        prod = x.producer()
        if prod is not None and prod.metadata_props.get(ROLE_KEY) == ONLINE_HADAMARD_ROLE:
            return "its input already passes through an online Hadamard"
        if not has_hadamard(site.K):
            return f"no Hadamard construction for K={site.K}"
        return None

    def _insert(self, graph: ir.Graph, site: LinearSite, names: NameScope) -> None:
        x, k = site.activation, site.K
        a_mat, b_mat = kronecker_factors(k)
        a, b = a_mat.shape[0], b_mat.shape[0]
        dtype = x.dtype if x.dtype in FLOAT_TYPES else ir.DataType.FLOAT
        base = x.name or site.name

        def const(suffix: str, arr: np.ndarray) -> ir.Value:
            v = ir.val(names.fresh(f"{base}_{suffix}"), const_value=ir.tensor(arr))
            v.const_value.name = v.name
            graph.register_initializer(v)
            return v

        def value(suffix: str, dims: list | None, dt: ir.DataType = dtype) -> ir.Value:
            return ir.Value(name=names.fresh(f"{base}_{suffix}"), type=ir.TensorType(dt),
                            shape=None if dims is None else ir.Shape(dims))

        grid = const("hadamard_grid_shape", np.array([-1, a, b], dtype=np.int64))
        bt = const("hadamard_Bt", b_mat.T.astype(dtype.numpy()))  # [b, b]
        at = const("hadamard_At", a_mat.T.astype(dtype.numpy()))  # [a, a]
        shape = value("shape", [len(x.shape)] if x.shape is not None else [None], ir.DataType.INT64)
        v1, v2 = value("hadamard_grid", [None, a, b]), value("hadamard_t", [None, b, a])
        v3, v4 = value("hadamard_xb_t", [None, b, a]), value("hadamard_xb", [None, a, b])
        v5 = value("hadamard_axb", [None, a, b])
        out = value("hadamard", None if x.shape is None else list(x.shape))
        nodes = [
            ir.node("Shape", [x], outputs=[shape]),
            ir.node("Reshape", [x, grid], outputs=[v1]),  # X [rows, a, b]
            ir.node("Transpose", [v1], {"perm": [0, 2, 1]}, outputs=[v2]),
            ir.node("MatMul", [bt, v2], outputs=[v3]),  # Bᵀ Xᵀ = (X B)ᵀ   [rows, b, a]
            ir.node("Transpose", [v3], {"perm": [0, 2, 1]}, outputs=[v4]),
            ir.node("MatMul", [at, v4], outputs=[v5]),  # Aᵀ X B           [rows, a, b]
            ir.node("Reshape", [v5, shape], outputs=[out]),  # back to x's shape
        ]
        for n in nodes:
            n.name = names.fresh(f"{site.name or base}_hadamard_{n.op_type}")
            n.metadata_props[ROLE_KEY] = ONLINE_HADAMARD_ROLE
        graph.insert_before(site.node, nodes)
        site.node.replace_input_with(0, out)
        # W ← Hᵀ W = (Wᵀ H)ᵀ, K axis first
        edit_channels(graph, weight_ref(site, "K"), lambda m: apply_kronecker(m.T, (a_mat, b_mat)).T, names)

    def call(self, model: ir.Model) -> PassResult:
        self.refusal, self.rotated, self.skipped = None, [], []
        stream = find_residual_stream(model)
        if not stream:
            self.refusal = stream
            logger.info("online Hadamard: nothing inserted: %s", stream.reason)
            return PassResult(model, modified=False)
        graph, names = model.graph, NameScope(model.graph)
        for writer in stream.writers:
            site = writer.site
            if attention_path(site.activation) is not None:
                continue  # o_proj: its input is rotated per head by RotateValueHeadsPass instead
            why = self._skip_reason(site)
            if why is not None:
                self.skipped.append(Skip(site.name, site.node.op_type, why))
                logger.debug("online Hadamard: %s skipped: %s", site.name, why)
                continue
            self._insert(graph, site, names)
            self.rotated.append(site.name)
        logger.info("online Hadamard: inserted before %d linear layers, %d skipped", len(self.rotated),
                    len(self.skipped))
        return PassResult(model, modified=bool(self.rotated))
