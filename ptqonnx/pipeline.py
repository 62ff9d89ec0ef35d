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
from onnx_ir.passes import PassError, PassManager, PreconditionError
from onnx_ir.passes import common as common_passes

from ptqonnx.errors import UserError
from ptqonnx.graph import LinearSite, Skip, find_linear_sites
from ptqonnx.passes.embeddings import QuantizeEmbeddingsPass
from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
from ptqonnx.passes.qdq import LowerToQdqPass
from ptqonnx.plan import PlannedWeight, gptq_solver, plan_weights, rtn_solver
from ptqonnx.recipe import CompileConfig

__all__ = ["CompileReport", "compile_model", "load_model", "save_model", "default_output_path", "run_passes"]

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers above which weights go to a .data file
FOLD_TOLERANCE = 1e-4  # max relative change of the float outputs allowed when folding scales


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


def _file_bytes(path: Path) -> int:
    """The model file plus any external-data files next to it that it references."""
    total = path.stat().st_size
    for data in path.parent.glob(path.name + ".data"):
        total += data.stat().st_size
    return total


def load_model(path: str | Path) -> ir.Model:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}; pass the path of an .onnx file")
    try:
        return ir.load(str(p))
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for non-ONNX bytes
        raise UserError(f"{p} is not a readable ONNX model ({type(exc).__name__}); pass an .onnx file") from None


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, output: Path, *, verify_ort: bool = True) -> None:
    """Check and write `model` to `output` atomically (temp folder beside it, then rename)."""
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp = tmpdir / output.name
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        ir.save(model, str(tmp), external_data=f"{output.name}.data" if external else None)
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise RuntimeError(f"internal error: the emitted model fails onnx.checker: {first}") from exc
        if verify_ort:
            from ptqonnx.runtime.ort import make_session

            make_session(tmp)  # raises UserError with ORT's first line if it cannot load
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, model last
            os.replace(f, output.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def run_passes(passes: list, model: ir.Model) -> None:
    """Run passes in a PassManager; a failed precondition (something the user can fix) becomes a UserError."""
    try:
        PassManager(passes)(model)
    except PassError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, PreconditionError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UserError(str(cause).splitlines()[0]) from None


def _select_sites(sites: list[LinearSite], cfg: CompileConfig) -> tuple[list[LinearSite], list[Skip]]:
    chosen, skipped = [], []
    for s in sites:
        if cfg.weights.keep_lm_head and s.is_lm_head:
            skipped.append(Skip(s.name, s.node.op_type, "LM head kept in float (--keep-lm-head)"))
        elif s.name in cfg.weights.exclude:
            skipped.append(Skip(s.name, s.node.op_type, "excluded by --exclude"))
        else:
            chosen.append(s)
    return chosen, skipped


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _plan_gptq(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report: CompileReport,
               progress: Callable[[str], None] | None,
               weight_of: Callable[[LinearSite], object] | None = None) -> dict[str, PlannedWeight]:
    """GPTQ plan: block by block on the partly quantized model, or one-shot Hessians when the graph has no
    residual-stream cut (or `sequential` is off). `weight_of(site)` is the W [N, K] GPTQ starts from
    (default: the graph's weight; AWQ passes the clipped one)."""
    from ptqonnx.blocks import find_blocks
    from ptqonnx.numerics.gptq import hessian_from_xtx
    from ptqonnx.numerics.quant import dequantize_weight

    weight_of = weight_of or LinearSite.weight_nk
    blocks = find_blocks(model, sites) if cfg.gptq.sequential else []
    if len(blocks) >= 2:
        from ptqonnx.runtime.sequential import run_sequential

        plan: dict[str, PlannedWeight] = {}
        hessians: dict[str, object] = {}
        solve = gptq_solver(cfg.weights, cfg.gptq, lambda site: hessians[site.activation.name], report.losses)

        def solve_stage(block, stage, stats):
            hessians[stage.activation] = hessian_from_xtx(stats.xtx, stats.count)
            updates = {}
            for site in stage.sites:
                qw = solve(site, weight_of(site))
                plan[site.name] = PlannedWeight(site, qw)
                updates[site.name] = dequantize_weight(qw)
            del hessians[stage.activation]
            return updates

        def on_stage(block, stage, seconds):
            if progress is not None:
                losses = ", ".join(f"{s.weight_name} {report.losses[s.weight_name]:.4g}" for s in stage.sites)
                progress(f"block {block.index + 1}/{len(blocks)} ({seconds:.1f} s) GPTQ loss: {losses}")

        run_sequential(model, blocks, feeds, solve_stage, progress=on_stage)
        report.calibration = f"sequential, {len(blocks)} blocks, {len(feeds)} samples"
        return plan
    if cfg.gptq.sequential:
        logger.warning("no residual-stream cut found in the graph: GPTQ falls back to one-shot Hessians "
                       "from the float model")
    from ptqonnx.runtime.collect import collect_statistics

    stats = collect_statistics(model, feeds, {s.activation.name: {"xtx"} for s in sites})
    report.calibration = f"one-shot, {len(feeds)} samples"

    def hessian_of(site):
        st = stats[site.activation.name]
        return hessian_from_xtx(st.xtx, st.count)

    solve = gptq_solver(cfg.weights, cfg.gptq, hessian_of, report.losses)
    return plan_weights(sites, lambda site, _: solve(site, weight_of(site)))


def _float_outputs(model: ir.Model, feeds: list) -> list[list]:
    """The float model's graph outputs on `feeds` (an ORT session on a clone; the model is untouched)."""
    from ptqonnx.runtime.collect import instrumented_session

    with instrumented_session(model, []) as (sess, _):
        names = [i.name for i in sess.get_inputs()]
        return [sess.run(None, {k: f[k] for k in names}) for f in feeds]


def _plan_awq(model: ir.Model, sites: list[LinearSite], cfg: CompileConfig, feeds: list, report: CompileReport,
              progress: Callable[[str], None] | None) -> tuple[list[LinearSite], dict[str, PlannedWeight]]:
    """AWQ (`ptqonnx.numerics.awq`): mean |x| and a row sample of every site's activation from one float
    calibration run; a scale search per scaling group, folded exactly (checked in ORT on two calibration
    feeds: max |y' - y| / max |y| <= FOLD_TOLERANCE per output, else RuntimeError); a clip search per site
    on the rescaled sample; then RTN with the clip ratios (`awq`) or GPTQ on the scaled weights clamped to
    their clipped ranges (`awq+gptq`). The LM head's group is not scaled unless `scale_lm_head` (as llm-awq,
    which leaves lm_head alone); it is still clipped. Returns the sites re-scanned after folding and the plan.
    """
    import numpy as np

    from ptqonnx.numerics.awq import clip_weight, search_clip, search_scales
    from ptqonnx.passes.fold_scales import FoldScalesPass
    from ptqonnx.plan import block_size_for
    from ptqonnx.runtime.collect import collect_statistics
    from ptqonnx.scaling import find_scaling_groups

    acfg, w = cfg.awq, cfg.weights
    groups, _ = find_scaling_groups(model, sites)
    if not acfg.scale_lm_head:
        groups = [g for g in groups if not any(s.is_lm_head for s in g.sites)]
    refused = [g.name for g in groups if g.kind == "mul_insert"]
    if acfg.no_insert and refused:
        raise UserError(f"--no-insert: {len(refused)} scaling groups have no producer that can absorb 1/s "
                        f"(their activation has other consumers or is a graph input) and would need an inserted "
                        f"Mul: {refused[:5]}; drop --no-insert or --exclude their MatMuls")
    stats = collect_statistics(model, feeds, {s.activation.name: {"mean_abs", "sample"} for s in sites},
                               sample_rows=acfg.sample_rows)
    report.calibration = f"one-shot, {len(feeds)} samples"
    check_feeds = feeds[:2]
    reference = _float_outputs(model, check_feeds)

    scales: dict[str, np.ndarray] = {}
    for i, g in enumerate(groups):
        st = stats[g.name]
        res = search_scales(st.sample, [s.weight_nk() for s in g.sites], bits=w.bits,
                            block_size=block_size_for(w, g.K), symmetric=w.symmetric, grid=acfg.grid,
                            mean_abs=st.mean_abs, device=acfg.device)
        scales[g.name] = res.s
        report.awq_alpha[g.name] = res.alpha
        line = (f"AWQ scales {i + 1}/{len(groups)} {g.name} ({len(g.sites)} sites, {g.kind}): alpha={res.alpha:.2f}, "
                f"output error {res.rtn_error:.4g} -> {res.error:.4g} ({res.error / max(res.rtn_error, 1e-30):.1%})")
        logger.info(line)
        if progress is not None:
            progress(line)
    fold = FoldScalesPass(scales, groups, no_insert=acfg.no_insert)
    run_passes([fold], model)
    report.scales_folded, report.scales_inserted = list(fold.folded), list(fold.inserted)
    err = 0.0
    for ref, out in zip(reference, _float_outputs(model, check_feeds)):
        for y, y2 in zip(ref, out):
            err = max(err, float(np.abs(y2 - y).max() / max(float(np.abs(y).max()), 1e-30)))
    report.fold_max_rel_err = err
    if not err <= FOLD_TOLERANCE:
        raise RuntimeError(f"internal error: the float model changed when AWQ scales were folded (max relative "
                           f"output error {err:.3g} > {FOLD_TOLERANCE:g} on {len(check_feeds)} calibration feeds)")
    logger.info("AWQ: %d groups folded into their producer, %d with an inserted Mul; float outputs unchanged "
                "(max relative error %.2g)", len(fold.folded), len(fold.inserted), err)
    for name, s in scales.items():  # the sites now read x / s (under a new name where a Mul was inserted)
        if name in fold.folded or name in fold.inserted:
            stats = stats.replace(fold.renamed.get(name, name), stats[name].scaled(s))

    names = {s.name for s in sites}
    sites = [s for s in find_linear_sites(model).sites if s.name in names]  # weights are the scaled copies now
    assert len(sites) == len(names), "folding changed the set of linear sites"
    ratios: dict[str, np.ndarray] = {}
    if acfg.clip:
        for site in sites:
            ratios[site.name] = search_clip(stats[site.activation.name].sample, site.weight_nk(), bits=w.bits,
                                            block_size=block_size_for(w, site.K), symmetric=w.symmetric,
                                            grid=acfg.grid, device=acfg.device)
            logger.debug("AWQ clip %s: mean ratio %.3f", site.name, float(ratios[site.name].mean()))
        clipped = sum(int((r < 1).sum()) for r in ratios.values())
        logger.info("AWQ clip: %d of %d blocks clipped", clipped, sum(r.size for r in ratios.values()))
    if cfg.method == "awq":
        return sites, plan_weights(sites, rtn_solver(w, ratios))

    def weight_of(site: LinearSite) -> np.ndarray:
        r = ratios.get(site.name)
        return site.weight_nk() if r is None else clip_weight(site.weight_nk(), r, bits=w.bits,
                                                              block_size=block_size_for(w, site.K), symmetric=w.symmetric)

    return sites, _plan_gptq(model, sites, cfg, feeds, report, progress, weight_of)


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
    report = CompileReport(src, dst, input_bytes=_file_bytes(src))

    PassManager([
        common_passes.LiftConstantsToInitializersPass(), common_passes.NameFixPass(),
        common_passes.TopologicalSortPass(),
    ])(model)
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
        from ptqonnx.w8a8 import prepare_w8a8

        passes, sites, w8a8_skipped = prepare_w8a8(model, sites, cfg, feeds, report)
        report.skipped += w8a8_skipped
    else:
        if cfg.method in ("awq", "awq+gptq"):
            sites, plan = _plan_awq(model, sites, cfg, feeds, report, progress)
        elif cfg.method == "gptq":
            plan = _plan_gptq(model, sites, cfg, feeds, report, progress)
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
    report.output_bytes = _file_bytes(dst)
    report.peak_rss_mib = _peak_rss_mib()
    report.seconds = time.perf_counter() - t0
    logger.info("compiled %s -> %s: %d linear layers quantized, %d skipped in %.1f s",
                src, dst, len(report.quantized), len(report.skipped), report.seconds)
    return report
