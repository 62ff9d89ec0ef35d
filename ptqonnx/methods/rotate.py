"""The rotate stage (QuaRot / SpinQuant): exact orthogonal rewrites before anything is measured or quantized.

Runs `FoldNormGammaPass` (every residual-stream norm's γ into the linear layers reading it; a tied LM head is
untied), `RotateResidualPass` (R1), `RotateValueHeadsPass` (R2, optional) and `OnlineHadamardPass` (R4,
optional) — see their module docstrings for the algebra — then checks in ONNX Runtime that the float model's
outputs did not move (max |y' - y| / max |y| <= ROTATE_TOLERANCE on the check feeds), else nothing is written;
where R2 rotated V in a KV cache, the present values are left out of that comparison (they hold V R by design)
and one decode step after a prefill, fed the rotated model's own cache, must give the original's logits.
It runs before the other stages select their sites and request statistics (`before_statistics`), so every
statistic later stages read is measured on the rotated graph (nothing stale to transform).
"""

from __future__ import annotations

import logging

from ptqonnx.config import RotateConfig
from ptqonnx.errors import UserError
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.methods.folding import (DECODE_CHECKS, check_decode, check_rewrite, decode_outputs, model_outputs,
                                     rewrite_tolerance, through_cache, without)
from ptqonnx.passes import run_passes
from ptqonnx.registry import register_method
from ptqonnx.report import RotationSummary

__all__ = ["ROTATE_TOLERANCE", "run_rotate"]

logger = logging.getLogger(__name__)

ROTATE_TOLERANCE = 1e-4  # fp32: measured 3.5e-6 on SmolLM2 for R1+R2+R4


@register_method(RotateConfig)
def run_rotate(ctx: MethodContext, cfg: RotateConfig) -> MethodResult:
    from ptqonnx.passes.rotate_fold_gamma import FoldNormGammaPass
    from ptqonnx.passes.rotate_heads import RotateValueHeadsPass
    from ptqonnx.passes.rotate_online import OnlineHadamardPass
    from ptqonnx.passes.rotate_residual import RotateResidualPass

    feeds = ctx.check_feeds()
    before = model_outputs(ctx.model, feeds)
    cache = cfg.heads and through_cache(ctx.model, ctx.recipe.keep_cache_values, "rotate (R2)")
    decoded = decode_outputs(ctx.model, feeds[:DECODE_CHECKS]) if cache else None
    tol = rewrite_tolerance(ctx.model, feeds, before, ROTATE_TOLERANCE, "rotate")
    fold, r1 = FoldNormGammaPass(), RotateResidualPass(cfg.rotation, cfg.seed)
    run_passes([fold], ctx.model)
    if fold.refusal is not None:
        raise UserError(f"rotate: {fold.refusal.reason}; drop --rotate for this model")
    run_passes([r1], ctx.model)
    if r1.refusal is not None:
        raise UserError(f"rotate: {r1.refusal.reason}; drop --rotate for this model")
    r2 = RotateValueHeadsPass(cfg.rotation, cfg.seed + 1, through_cache=cache) if cfg.heads else None
    r4 = OnlineHadamardPass() if cfg.online else None
    run_passes([p for p in (r2, r4) if p is not None], ctx.model)
    # present outputs holding rotated V are not the float model's by design: the logits and the rest are checked
    cached = set(r2.cache_outputs) if r2 else set()
    err = check_rewrite(without(before, ctx.model, cached), without(model_outputs(ctx.model, feeds), ctx.model, cached),
                        tol, "it was rotated", len(feeds))
    if cached:  # the rotated cache read back: one decode step after a prefill gives the same logits
        err = max(err, check_decode(decoded, ctx.model, feeds[:DECODE_CHECKS], tol, "it was rotated"))
    skipped = tuple((r2.skipped if r2 else []) + (r4.skipped if r4 else []))
    summary = RotationSummary(cfg.stage, rotation=cfg.rotation, residual=True, heads=len(r2.rotated) if r2 else 0,
                              online=len(r4.rotated) if r4 else 0, untied_bytes=fold.untied_bytes,
                              rotated_cache=tuple(sorted(cached)),
                              not_rotated=skipped, fold_max_rel_err=err)
    logger.info("rotate: %s R1%s%s; float outputs unchanged to %.2g", cfg.rotation,
                f" + R2 ({summary.heads} heads)" if r2 else "", f" + R4 ({summary.online} layers)" if r4 else "", err)
    return MethodResult(summary)
