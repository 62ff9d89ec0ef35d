"""RTN: round to nearest on ONNX Runtime's own blockwise grid (`ptqonnx.numerics.quant`); needs no data."""

from __future__ import annotations

from ptqonnx.config import RtnConfig
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.plan import plan_weights, rtn_solver
from ptqonnx.registry import register_method
from ptqonnx.report import WeightsSummary

__all__ = ["run_rtn"]


@register_method(RtnConfig)
def run_rtn(ctx: MethodContext, cfg: RtnConfig) -> MethodResult:
    plan = plan_weights(ctx.sites, rtn_solver(cfg))
    return MethodResult(WeightsSummary(cfg.stage, layers=len(plan)), plan=plan)
