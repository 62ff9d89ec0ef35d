"""What a compile did to each layer, measured: the numbers behind `compile --report DIR`.

Pure functions of arrays (the per-layer error, the outlier ratio, a layer's depth and kind) plus the one
graph walk that sorts the output's initializers by what reads them (`size_breakdown`). The pipeline runs
the measurements (`measure_layers`) on a second draw of calibration rows of the *float* model the weights
stage quantized (after any rotation or scale folding), so a layer's number is the error of its quantized weight
alone, on the inputs it sees:

    rel_mse = ||X (W_hat - W)^T||^2 / ||X W^T||^2        X: rows of the layer's input, W [N, K]

With no calibration data (RTN without --calib-*), the weight-space twin ||W_hat - W||^2 / ||W||^2 is given
and said to be data-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "LayerMeasure", "KINDS", "layer_position", "relative_output_mses", "relative_weight_mse", "outlier_ratio",
    "size_breakdown", "measure_layers",
]

# A layer's role, read from its name (Hugging Face module names as exporters keep them), checked in order.
KINDS = (
    ("qkv", ("qkv_proj", "query_key_value", "c_attn", "Wqkv")),
    ("q", ("q_proj", "query", "/q/")),
    ("k", ("k_proj", "/key", "/k/")),
    ("v", ("v_proj", "value", "/v/")),
    ("o", ("o_proj", "out_proj", "attn/c_proj", "attention/dense", "attention/output/dense", "self_attn/dense",
           "dense_proj")),
    ("gate_up", ("gate_up_proj",)),
    ("gate", ("gate_proj",)),
    ("up", ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "intermediate/dense")),
    ("down", ("down_proj", "fc2", "mlp/c_proj", "dense_4h_to_h", "output/dense")),
    ("head", ("lm_head", "classifier", "pooler", "score")),
)
_DEPTH = re.compile(r"(?:^|[/._])(?:layers|layer|h|blocks|block)[._/](\d+)(?:[._/]|$)")


@dataclass(frozen=True)
class LayerMeasure:
    """One quantized linear layer in the report."""

    name: str
    weight: str  # the weight initializer's name
    kind: str  # q, k, v, o, qkv, gate, up, gate_up, down, head, other
    depth: int | None  # transformer block index read from the name (None: not in a numbered block)
    shape: tuple[int, int]  # (N, K)
    bits: int
    block_size: int
    rel_mse: float
    on_data: bool  # True: relative output MSE on data rows; False: the data-free weight-space twin
    outlier_before: float | None = None  # max / median of the input's per-channel absmax, input model
    outlier_after: float | None = None  # the same on the model the weights were quantized in
    act_rel_mse: float | None = None  # W8A8 static: ||Q(X) W_hat^T - X W^T||^2 / ||X W^T||^2 (input quantized too)


def layer_position(*names: str) -> tuple[int | None, str]:
    """(block index, kind) of a linear layer from its node name, e.g. '/model/layers.3/mlp/down_proj/MatMul'
    -> (3, 'down'), or from the next name given (its weight's, 'model.layers.3.mlp.down_proj.weight') where
    the node's says nothing (torch.onnx's dynamo export names nodes 'node_linear_7'); (None, 'other')."""
    depth, kind = None, "other"
    for name in names:
        m = _DEPTH.search(name)
        path = name.replace(".", "/")
        depth = depth if depth is not None or not m else int(m.group(1))
        if kind == "other":
            kind = next((k for k, keys in KINDS if any(key in path for key in keys)), "other")
    return depth, kind


def relative_output_mses(x: np.ndarray, w: np.ndarray,
                         variants: list[tuple[np.ndarray | None, np.ndarray]]) -> list[float]:
    """||X_hat W_hat^T - X W^T||^2 / ||X W^T||^2 for each (X_hat, W_hat) in `variants` (X_hat None: X itself),
    rows X [R, K], weights [N, K], float64 sums, the float output X W^T computed once; 0 when it is all zero."""
    x64 = np.asarray(x, np.float64)
    ref = x64 @ np.asarray(w, np.float64).T
    den = float(np.sum(ref * ref))
    out = []
    for x_hat, w_hat in variants:
        err = (x64 if x_hat is None else np.asarray(x_hat, np.float64)) @ np.asarray(w_hat, np.float64).T - ref
        out.append(float(np.sum(err * err) / den) if den > 0 else 0.0)
    return out


def relative_weight_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||W_hat - W||^2 / ||W||^2 (the data-free stand-in)."""
    w64 = np.asarray(w, np.float64)
    den = float(np.sum(w64 * w64))
    return float(np.sum((np.asarray(w_hat, np.float64) - w64) ** 2) / den) if den > 0 else 0.0


def outlier_ratio(absmax: np.ndarray) -> float:
    """max / median of an input's per-channel absolute maxima: ~1-3 for a flat input, tens to hundreds where a
    few channels carry outliers (what smoothing and rotation remove). inf when the median channel is 0."""
    a = np.asarray(absmax, np.float64)
    med = float(np.median(a))
    return float(a.max() / med) if med > 0 else float("inf")


def measure_layers(
    plan: Mapping[str, object],
    weights: Mapping[str, np.ndarray],
    rows: Mapping[str, np.ndarray] | None,
    before: Mapping[str, np.ndarray] | None = None,
    after: Mapping[str, np.ndarray] | None = None,
    act_grids: Mapping[str, object] | None = None,
) -> list[LayerMeasure]:
    """One `LayerMeasure` per planned layer (graph order). `plan`: node name -> PlannedWeight; `weights`: the
    float W [N, K] each was quantized from; `rows`: node name -> input rows [R, K] (None: data-free);
    `before`/`after`: node name -> per-channel absmax of its input in the input / quantized-from model;
    `act_grids`: node name -> the static per-tensor grid of its input (W8A8), for the error with the input
    fake-quantized too. The weight's name (for `layer_position`) is read from the planned site."""
    from ptqonnx.numerics.quant import dequantize_weight
    from ptqonnx.numerics.smoothquant import fake_quantize_activation

    out = []
    for name, planned in plan.items():
        qw = planned.qweight
        w, w_hat = weights[name], dequantize_weight(qw)
        x = None if rows is None else rows.get(name)
        grid = None if act_grids is None or x is None else act_grids.get(name)
        if x is None:
            err, act = relative_weight_mse(w, w_hat), None
        else:
            errs = relative_output_mses(x, w, [(None, w_hat)] + (
                [(fake_quantize_activation(x, grid), w_hat)] if grid is not None else []))
            err, act = errs[0], (errs[1] if grid is not None else None)
        wname = planned.site.weight_name
        depth, kind = layer_position(name, wname)
        ratio = lambda m: outlier_ratio(m[name]) if m is not None and name in m else None  # noqa: E731
        out.append(LayerMeasure(name, wname, kind, depth, (int(w.shape[0]), int(w.shape[1])), qw.bits, qw.block_size,
                                err, x is not None, ratio(before), ratio(after), act))
    return out


# -- sizes ------------------------------------------------------------------------------------------------

_QUANTIZED_READERS = {"MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear", "QLinearMatMul",
                      "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def size_breakdown(model: ir.Model) -> dict[str, int]:
    """Bytes of the model's initializers by what they are: `quantized` (read by MatMulNBits / Q-DQ / integer
    ops: codes, scales, zero points), `embeddings` (a float Gather table), `float` (everything else)."""
    sizes = {"quantized": 0, "embeddings": 0, "float": 0}
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        ops = {use.node.op_type for use in value.uses()}
        if ops & _QUANTIZED_READERS:
            kind = "quantized"
        elif any(u.node.op_type == "Gather" and u.idx == 0 for u in value.uses()):
            kind = "embeddings"
        else:
            kind = "float"
        sizes[kind] += value.const_value.nbytes
    return sizes
