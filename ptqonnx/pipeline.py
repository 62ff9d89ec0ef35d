"""One compile: load -> [calibrate] -> plan -> lowering passes -> clean up -> check -> atomic save.

The input file is only ever read. The output is written into a temporary folder beside the destination,
checked there (onnx.checker, then an ONNX Runtime session at its default optimization level), and only
then moved into place; a failure anywhere leaves no partial output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ptqonnx.errors import UserError
from ptqonnx.io import file_bytes, load_model, save_model
from ptqonnx.graph import LinearSite, Skip, find_linear_sites
from ptqonnx.passes import run_passes
from ptqonnx.passes.embeddings import QuantizeEmbeddingsPass
from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
from ptqonnx.passes.qdq import LowerToQdqPass
from ptqonnx.plan import plan_weights, rtn_solver
from ptqonnx.config import CompileConfig, matches_any

__all__ = ["CompileReport", "compile_model", "load_model", "save_model", "default_output_path"]

logger = logging.getLogger(__name__)

@dataclass
class CompileReport:
    input_path: Path
    output_path: Path
    quantized: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    embeddings_quantized: int = 0
    calibration: str = "none"
    losses: dict[str, float] = field(default_factory=dict)
    scales_folded: list[str] = field(default_factory=list)  # activations whose 1/s a producer absorbed
    scales_inserted: list[str] = field(default_factory=list)  # activations given an explicit Mul(x, 1/s)
    awq_alpha: dict[str, float] = field(default_factory=dict)  # AWQ: chosen alpha per scaling group
    fold_max_rel_err: float | None = None  # float outputs after vs before folding scales
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0

    def skip_summary(self) -> list[tuple[str, int]]:
        return Counter(s.reason for s in self.skipped).most_common()


def default_output_path(input_path: Path, cfg: CompileConfig) -> Path:
    w = cfg.weights
    if cfg.w8a8 is not None:
        return input_path.with_name(f"{input_path.stem}.{cfg.method}_w8a8.onnx")
    tag = f"{cfg.method}_w{w.bits}" + (f"g{w.group_size}" if w.group_size else "") + ("" if w.symmetric else "_asym")
    return input_path.with_name(f"{input_path.stem}.{tag}.onnx")


def _select_sites(sites: list[LinearSite], cfg: CompileConfig) -> tuple[list[LinearSite], list[Skip]]:
    chosen, skipped = [], []
    for s in sites:
        if cfg.weights.keep_lm_head and s.is_lm_head:
            skipped.append(Skip(s.name, s.node.op_type, "LM head kept in float (--keep-lm-head)"))
        elif matches_any(cfg.weights.exclude, s.name, s.weight_name):
            skipped.append(Skip(s.name, s.node.op_type, "excluded by --exclude"))
        else:
            chosen.append(s)
    return chosen, skipped


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def compile_model(
    input_path: str | Path,
    output_path: str | Path | None,
    cfg: CompileConfig,
    *,
    calibration=None,
    verify_ort: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CompileReport:
    """Quantize the model at `input_path` per `cfg` and write it to `output_path` (or a default beside it).

    `calibration` (a `ptqonnx.calibration.CalibConfig`) says where calibration data comes from, for the
    methods that need it; `progress` receives one line per step of long methods (GPTQ: per block)."""
    t0 = time.perf_counter()
    src = Path(input_path)
    model = load_model(src)
    dst = Path(output_path) if output_path else default_output_path(src, cfg)
    if dst.resolve() == src.resolve():
        raise UserError(f"output {dst} is the input file; pass a different -o path (the input is never overwritten)")
    report = CompileReport(src, dst, input_bytes=file_bytes(src))

    run_passes([
        common_passes.LiftConstantsToInitializersPass(), common_passes.NameFixPass(),
        common_passes.TopologicalSortPass(),
    ], model)
    scan = find_linear_sites(model)
    sites, skipped = _select_sites(scan.sites, cfg)
    report.skipped = scan.skipped + skipped
    if not sites and not cfg.weights.quantize_embeddings:
        why = "; ".join(f"{r} ({n}x)" for r, n in Counter(s.reason for s in report.skipped).most_common(3))
        raise UserError(
            f"{src} has no quantizable MatMul/Gemm (a float weight initializer [K, N])"
            + (f": {why}" if why else "")
            + "; pass a model with linear layers"
        )

    w = cfg.weights
    if cfg.needs_calibration:
        from ptqonnx.calibration.sources import CalibConfig, calibration_batches

        feeds = calibration_batches(calibration or CalibConfig(), src.parent, [v.name for v in model.graph.inputs])
    if cfg.w8a8 is not None:
        from ptqonnx.methods.w8a8 import prepare_w8a8

        passes, sites, w8a8_skipped = prepare_w8a8(model, sites, cfg, feeds, report)
        report.skipped += w8a8_skipped
    else:
        if cfg.method in ("awq", "awq+gptq"):
            from ptqonnx.methods.awq import plan_awq

            sites, plan = plan_awq(model, sites, cfg, feeds, report, progress)
        elif cfg.method == "gptq":
            from ptqonnx.methods.gptq import plan_gptq

            plan = plan_gptq(model, sites, cfg, feeds, report, progress)
        else:
            plan = plan_weights(sites, rtn_solver(w))
        passes = [LowerToMatMulNBitsPass(plan, w.accuracy_level) if w.format == "matmulnbits" else LowerToQdqPass(plan)]
    emb = QuantizeEmbeddingsPass(4, w.group_size or 128, w.symmetric) if w.quantize_embeddings else None
    if emb is not None:
        passes.append(emb)
    passes += [common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()]
    run_passes(passes, model)
    report.quantized = [s.name for s in sites]
    if emb is not None:
        report.embeddings_quantized = sum(
            1 for n in model.graph if n.op_type == "GatherBlockQuantized"
        )
        report.skipped += [Skip(n, "Gather", r) for n, r in emb.skipped]

    save_model(model, dst, verify_ort=verify_ort)
    report.output_bytes = file_bytes(dst)
    report.peak_rss_mib = _peak_rss_mib()
    report.seconds = time.perf_counter() - t0
    logger.info("compiled %s -> %s: %d linear layers quantized, %d skipped in %.1f s",
                src, dst, len(report.quantized), len(report.skipped), report.seconds)
    return report
