"""IR queries: linear sites, scaling groups, attention channel maps, sequential blocks; one constant-tracing
helper (`trace`) and one unique-name helper (`names`). Pure onnx_ir: nothing here runs a model."""

from __future__ import annotations

from ptqonnx.graph.blocks import Block, Stage, find_blocks
from ptqonnx.graph.names import NameScope, add_initializer, unique_name
from ptqonnx.graph.scaling import ATTENTION_SKIP_REASON, ConstRef, ScalingGroup, find_scaling_groups
from ptqonnx.graph.sites import (
    ACTIVATION_MATMUL_REASON, LinearSite, SiteScan, Skip, find_embedding_gathers, find_linear_sites,
)
from ptqonnx.graph.trace import (
    FLOAT_TYPES, ONNX_DOMAINS, ConstTrace, Refusal, attr, gemm_trans_b, quantize_output_type, trace_const,
    upstream_any,
)

__all__ = [
    "ACTIVATION_MATMUL_REASON", "ATTENTION_SKIP_REASON", "FLOAT_TYPES", "ONNX_DOMAINS", "Block", "ConstRef",
    "ConstTrace", "LinearSite", "NameScope", "Refusal", "ScalingGroup", "SiteScan", "Skip", "Stage",
    "add_initializer", "attr", "find_blocks", "find_embedding_gathers", "find_linear_sites",
    "find_scaling_groups", "gemm_trans_b", "quantize_output_type", "trace_const", "unique_name", "upstream_any",
]
