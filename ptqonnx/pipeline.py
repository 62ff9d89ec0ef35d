"""One compile: load -> select sites -> [statistics] -> stages -> lowering passes -> clean up -> check -> save.

    recipe (frozen configs)
      -> select: the recipe's layer selection, then each stage's `select` hook (W8A8: LM head, GEMV stay float)
      -> statistics: every stage's one-shot `requests` merged, one ONNX Runtime run over the calibration data
         (or `--stats`); stages that must see the partly quantized model calibrate block by block themselves
      -> stages in order (`ptqonnx.registry`): transforms rewrite the float graph exactly, the weights stage (or
         awq driving it) plans every weight, w8a8 plans the activations
      -> lowering: MatMulNBits or QDQ weights, activation Q/DQ, dynamic-activation MatMulNBits, embeddings
      -> RemoveUnusedNodes, TopologicalSort -> `ptqonnx.io.save_model` (onnx.checker + ORT load, atomic)

`quantize` does it in memory and returns the rewritten `onnx_ir.Model` (the caller's model is never
modified); `compile_model` goes file to file and writes the recipe it ran beside the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ptqonnx.calibration.stats import Statistics
from ptqonnx.config import CalibConfig, ConfigError, Recipe, StageConfig, as_recipe, matches_any
from ptqonnx.errors import UserError, require_module
from ptqonnx.graph import LinearSite, Skip, find_linear_sites
from ptqonnx.graph.trace import infer_shapes
from ptqonnx.graph.validate import NONFINITE_REASON, describe_quantized, nonfinite_sites
from ptqonnx.io import check_output_path, copy_companions, file_bytes, load_model, model_files, preflight, save_model
from ptqonnx.methods.base import ActivationResult, Calibration, MethodContext, Progress
from ptqonnx.passes import run_passes
from ptqonnx.registry import method_spec
from ptqonnx.report import CompileReport

__all__ = ["compile_model", "quantize", "prepare_model", "default_output_path", "recipe_path_for", "SAMPLE_ROWS"]

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 1024  # rows kept per requested `sample` statistic
REPORT_SAMPLES = 4  # calibration samples (a second draw) the report's per-layer measurements run on
REPORT_ROWS = 256  # input rows per layer kept for its error
LOWERED_NODE_BYTES = 384  # --max-size-mb's allowance per quantized layer: its node, tensor names and headers
CalibrationArg = CalibConfig | Sequence[Mapping[str, np.ndarray]] | None


def default_output_path(input_path: Path, recipe: Recipe) -> Path:
    """`{stem}.{method}_w{bits}g{group}[_asym]_{format}.onnx`, or `{stem}.{method}_w8a8_{target}[_dynamic].onnx`."""
    w, w8a8 = recipe.weights, recipe.w8a8
    if w8a8 is not None:
        tag = f"{recipe.method}_w8a8_{recipe.target}" + ("_dynamic" if w8a8.act_scales == "dynamic" else "")
    else:
        tag = (f"{recipe.method}_w{w.bits}" + (f"g{w.group_size}" if w.group_size else "")
               + ("" if w.symmetric else "_asym") + f"_{recipe.format}")
    return input_path.with_name(f"{input_path.stem}.{tag}.onnx")


def recipe_path_for(output: Path) -> Path:
    """The recipe written beside an output: `out.onnx` -> `out.recipe.yaml`."""
    return output.with_name(f"{output.stem}.recipe.yaml")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _select_sites(sites: list[LinearSite], recipe: Recipe) -> tuple[list[LinearSite], list[Skip]]:
    chosen, skipped = [], []
    for s in sites:
        if recipe.keep_lm_head and s.is_lm_head:
            skipped.append(Skip(s.name, s.node.op_type, f"{s.head_label} kept in float (keep_lm_head)"))
        elif matches_any(recipe.exclude, s.name, s.weight_name):
            skipped.append(Skip(s.name, s.node.op_type, "excluded: matches an exclude pattern"))
        else:
            chosen.append(s)
    return chosen, skipped


def _check_model(model: ir.Model, recipe: Recipe, sites: list[LinearSite]) -> tuple[list[LinearSite], list[Skip]]:
    """Refuse an already-quantized model (unless only its float layers are asked for) and NaN/Inf weights
    (unless asked to leave those layers float), before any work."""
    from ptqonnx.graph.dtype import low_float_type

    if low_float_type(model) == ir.DataType.BFLOAT16:
        raise UserError("the model computes in bfloat16, which ONNX Runtime's CPU build cannot run (calibration and "
                        "the output checks run there); export or convert it to float16 or float32 first")
    quantized = describe_quantized(model)
    if quantized and not recipe.only_float_layers:
        rest = (f"pass --only-float-layers (only_float_layers) to quantize its {len(sites)} float layers and keep the "
                "rest as they are" if sites else "there is nothing left to quantize; pass the float model")
        raise UserError(f"the model is already quantized ({quantized}); {rest}")
    bad = nonfinite_sites(sites)
    if not bad:
        return sites, []
    if recipe.nonfinite_weights == "error":
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise UserError(f"weight {bad[0].weight_name} of {bad[0].name} holds NaN/Inf values{more}; fix the model, or "
                        "pass --nonfinite-weights keep-float to leave such layers in float")
    logger.warning("%d layers have NaN/Inf weights and stay in float: %s", len(bad), ", ".join(s.name for s in bad[:5]))
    names = {s.name for s in bad}
    return [s for s in sites if s.name not in names], [Skip(s.name, s.node.op_type, NONFINITE_REASON) for s in bad]


CONV_ONLY_STAGES = ("rtn", "w8a8")  # the stages that have work to do on a model whose only layers are Conv


def _select_convs(convs: list[LinearSite], recipe: Recipe) -> tuple[list[LinearSite], list[Skip]]:
    """The Conv layers to quantize (`keep_conv` keeps them all float, `exclude` patterns some), the rest skipped.
    (Per-channel DequantizeLinear needs opset 13, which `io.load_model` requires of every model.)"""
    if recipe.keep_conv:
        return [], [Skip(c.name, c.node.op_type, "Conv layer kept in float (keep_conv)") for c in convs]
    return _select_sites(convs, recipe)


def _check_conv_only(recipe: Recipe, n: int) -> None:
    """A model whose only quantizable layers are Conv: the MatMul methods would have nothing to work on."""
    extra = [st.stage for st in recipe.stages if st.stage not in CONV_ONLY_STAGES]
    if extra:
        raise UserError(f"only {n} Conv layers are left to quantize (no MatMul/Gemm, or those left float: see -v), "
                        f"which {'+'.join(extra)} does not quantize (Conv layers get INT8 weights per output channel "
                        "by round to nearest); use --method rtn, with --w8a8 for static INT8 activations")


def conv_grid(recipe: Recipe):
    """The grid of the Conv layers: the weights stage's own when it is 8 bits per output channel (W8A8 INT8 or
    FP8, INT8 weight-only), else 8 bits per output channel on its symmetry and scale convention."""
    w = recipe.weights
    return w if w.bits == 8 and w.group_size is None and not w.high_bits else w.high_grid()


def _plan_convs(ctx: MethodContext, report: CompileReport) -> dict:
    """Round to nearest for every selected Conv layer (`conv_grid`); its summary in the report."""
    from ptqonnx.plan import plan_weights, rtn_solver
    from ptqonnx.report import ConvSummary

    if not ctx.convs:
        return {}
    grid = conv_grid(ctx.recipe)
    plan = plan_weights(ctx.convs, rtn_solver(grid))
    grids = ctx.activations.grids if ctx.activations is not None else {}
    kind = "FP8 E4M3" if grid.fp8 else f"INT8 {'symmetric' if grid.symmetric else 'asymmetric'}"
    report.stages.append(ConvSummary("conv", layers=len(plan), grid=f"{kind} per output channel",
                                     static_activations=sum(1 for n in plan if n in grids)))
    return plan


def _check_tensorrt_blocks(sites: list[LinearSite], group: int | None) -> None:
    """TensorRT infers a weight's block from the shapes (K / number of scales), so a K that the block does not
    divide would be read with another block (a silent miscompute) or refused: say so before any work."""
    ragged = [s for s in sites if group is not None and s.K > group and s.K % group]
    if ragged:
        from ptqonnx.config import TRT_INT4_BLOCKS

        fits = next((b for b in sorted(TRT_INT4_BLOCKS, reverse=True) if all(s.K <= b or s.K % b == 0 for s in sites)),
                    None)
        fix = f"set --group-size {fits}" if fits is not None else "use --target ort-cpu"
        raise UserError(f"{len(ragged)} layers have K not a multiple of the block {group} (e.g. {ragged[0].name}: "
                        f"K={ragged[0].K}), which TensorRT cannot read; {fix}, or --exclude those layers")


def _check_target(model: ir.Model, target: str) -> list[str]:
    """The target's rules (`ptqonnx.check`) on the lowered graph: an error refuses the output (nothing is
    written), warnings come back as report notes."""
    from ptqonnx.check import check_model, errors, format_findings

    findings = check_model(model, target)
    bad = errors(findings)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"the output breaks a {target} rule: {format_findings(bad)[0]}{more}; nothing was written "
                        f"(`ptqonnx check --target {target}` on a written model lists every rule)")
    warned = sorted({f.rule for f in findings})
    if warned:
        logger.info("%s rules: %d warnings: %s", target, len(findings), "; ".join(format_findings(findings)[:5]))
        return [f"{target} checker: {len(findings)} warnings ({', '.join(warned)}); `ptqonnx check --target {target} "
                "OUTPUT` lists them"]
    return []


def _check_requirements(recipe: Recipe) -> None:
    """Each stage's optional dependencies, before any work (one line with the install hint)."""
    for stage in recipe.stages:
        for module in stage.requires:
            try:
                require_module(module, "torch")
            except UserError as exc:
                raise UserError(f"{stage.stage} needs {module}: {exc}") from None


def _statistics(ctx: MethodContext, requests: dict[str, set], stats_path: Path | None) -> tuple[Statistics, str]:
    if stats_path is None:
        from ptqonnx.runtime.collect import collect_statistics

        feeds = ctx.feeds()
        return (collect_statistics(ctx.model, feeds, requests, sample_rows=SAMPLE_ROWS,
                                   provider=ctx.calibration.provider), f"{len(feeds)} samples")
    saved = Statistics.load(stats_path)
    missing = [f"{name} ({', '.join(sorted(k.value for k in kinds - saved[name].kinds))})" if name in saved else name
               for name, kinds in requests.items() if name not in saved or not kinds <= saved[name].kinds]
    if missing:
        hint = " (run `ptqonnx calibrate` on this model with --hessian / --sample-rows as needed)"
        raise UserError(f"{stats_path} lacks statistics the recipe needs for {len(missing)} values, e.g. "
                        f"{'; '.join(missing[:3])}{hint}")
    return saved, str(stats_path)


def _lowering_passes(recipe: Recipe, plan: dict, act: ActivationResult | None,
                     convs: dict | None = None) -> tuple[list, Any]:
    from ptqonnx.passes.embeddings import QuantizeEmbeddingsPass
    from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
    from ptqonnx.passes.qdq import LowerToQdqPass
    from ptqonnx.passes.w8a8 import QuantizeActivationsPass

    dynamic = act.dynamic if act is not None else frozenset()
    static = {name: p for name, p in plan.items() if name not in dynamic}
    passes: list = [LowerToMatMulNBitsPass(static, recipe.accuracy_level) if recipe.format == "matmulnbits"
                    else LowerToQdqPass(static, blocked_4bit=recipe.target == "tensorrt")]
    if convs:  # DequantizeLinear whatever the format: MatMulNBits has no convolution
        passes.append(LowerToQdqPass(convs))
    if act is not None:
        passes.append(QuantizeActivationsPass(act.grids))
        if dynamic:
            passes.append(LowerToMatMulNBitsPass({n: p for n, p in plan.items() if n in dynamic},
                                                 act.dynamic_accuracy_level))
    emb = None
    if recipe.quantize_embeddings:
        w = recipe.weights
        emb = QuantizeEmbeddingsPass(4, w.group_size or 128, w.symmetric)
        passes.append(emb)
    return passes + [common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()], emb


def _as_model(model: ir.Model | Any | str | Path) -> tuple[ir.Model, Path | None]:
    """A private copy to rewrite, and the folder the model came from (for the tokenizer)."""
    if isinstance(model, (str, Path)):
        return load_model(model), Path(model).parent
    if isinstance(model, ir.Model):
        return model.clone(), None
    import onnx

    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model), None
    raise UserError(f"model must be a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}")


def _recipe(config: Recipe | StageConfig | Sequence[StageConfig]) -> Recipe:
    try:
        return as_recipe(config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def quantize(
    model: ir.Model | Any | str | Path,
    config: Recipe | StageConfig | Sequence[StageConfig],
    calibration: CalibrationArg = None,
    *,
    stats: str | Path | None = None,
    progress: Progress | None = None,
    model_dir: str | Path | None = None,
    analyze: bool = False,
    sensitivity: bool = False,
) -> ir.Model:
    """Quantize `model` (a path, an `onnx.ModelProto` or an `onnx_ir.Model`, never modified) with `config`
    (a `Recipe`, one stage config such as `GptqConfig(bits=4)`, or a list of them) and return the rewritten
    `onnx_ir.Model`; its `meta["ptqonnx.report"]` holds the `CompileReport`.

    `calibration`: a `CalibConfig` (text windows or an npz) or the feeds themselves (a list of {input name:
    array}); a recipe's own `calibration` is used when this is None. `stats`: a `.npz` written by `ptqonnx
    calibrate`, used instead of a collection run for the one-shot statistics. `model_dir`: where the
    tokenizer is looked for (default: the model's folder when `model` is a path). `analyze`: measure every
    layer's quantization error and input outliers into the report (`CompileReport.layers`, `sizes`), on
    a second draw of calibration rows (two or three extra ONNX Runtime runs over `REPORT_SAMPLES` samples).
    `sensitivity`: rank the layers by their RTN error on the weights stage's grid (and at 8 bits) from the
    one-shot statistics' sample rows (`CompileReport.sensitivity`, most sensitive first; no extra full-model
    run when the compile collects statistics anyway).
    """
    recipe = _recipe(config)
    _check_requirements(recipe)
    ir_model, folder = _as_model(model)
    report = CompileReport(Path(model) if isinstance(model, (str, Path)) else None, None, recipe=recipe)
    _quantize_in_place(ir_model, recipe, calibration if calibration is not None else recipe.calibration,
                       Path(model_dir) if model_dir is not None else folder, stats, progress, report, analyze,
                       sensitivity)
    ir_model.meta["ptqonnx.report"] = report
    return ir_model


def prepare_model(model: ir.Model) -> ir.Model:
    """Constants as initializers (scalars too: optimum's exports keep a norm's exponent, axes and ε as Constant
    nodes, and the graph matchers read constants through `trace_const`), every value named, ORT's
    default-domain SimplifiedLayerNormalization as standard ops (`StandardNormsPass`), nodes sorted: the
    graph every stage and `calibrate` see (statistics are keyed by value name, so both must name values
    alike)."""
    from ptqonnx.passes.standard_norms import StandardNormsPass

    run_passes([
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.NameFixPass(),
        StandardNormsPass(),
        common_passes.TopologicalSortPass(),
    ], model)
    infer_shapes(model)
    return model


def _quantize_in_place(model: ir.Model, recipe: Recipe, calibration: CalibrationArg, model_dir: Path | None,
                       stats_path: str | Path | None, progress: Progress | None, report: CompileReport,
                       analyze: bool = False, sensitivity: bool = False) -> None:
    timed = _Timer(report)
    if isinstance(calibration, CalibConfig) and calibration.provider != "cpu":
        from ptqonnx.runtime.ort import provider_names

        provider_names(calibration.provider)  # a missing GPU provider: one line before any work
    with timed("prepare"):
        prepare_model(model)
    scan = find_linear_sites(model)
    sites, skipped = _select_sites(scan.sites, recipe)
    convs, kept_convs = _select_convs(scan.convs, recipe)
    skipped = scan.skipped + skipped + kept_convs
    checked, more = _check_model(model, recipe, sites + convs)
    if recipe.w8a8 is not None and recipe.w8a8.qtype == "fp8":  # before any run (rotations, the report's profile)
        from ptqonnx.passes.w8a8 import fp8_opset_problem

        problem = fp8_opset_problem(model.opset_imports.get("", 0))
        if problem:
            raise UserError(problem)
    sites, convs = [s for s in checked if not s.is_conv], [s for s in checked if s.is_conv]
    skipped += more
    ctx = MethodContext(model, recipe, sites, Calibration(calibration, model_dir, list(model.graph.inputs)),
                        progress=progress, convs=convs)
    specs = [(method_spec(stage), stage) for stage in recipe.stages]
    held, before = None, None
    if analyze:
        with timed("report: input profile"):
            held, report.analysis = _held_feeds(ctx)
            if held is not None and any(cfg.kind in ("transform", "scaling") for cfg in recipe.stages):
                before = _input_absmax(model, ctx.sites, held, ctx.calibration.provider)
    early = [(spec, cfg) for spec, cfg in specs if cfg.before_statistics]
    if early:  # rotations: every later stage selects, measures and quantizes the rewritten graph
        if more:
            raise UserError("rotations would spread the NaN/Inf weights of "
                            f"{', '.join(s.node for s in more[:3])} into every layer; fix the model or drop --rotate")
        for spec, cfg in early:
            with timed(cfg.stage):
                _run_stage(spec, cfg, ctx, report, skipped)
        scan = find_linear_sites(model)
        ctx.sites, selected = _select_sites(scan.sites, recipe)
        skipped = scan.skipped + selected + kept_convs
    for spec, cfg in specs:
        if spec.select is not None:
            ctx.sites, more = spec.select(ctx, cfg, ctx.sites)
            skipped += more
    if not ctx.sites and not ctx.convs and not recipe.quantize_embeddings:
        why = "; ".join(f"{r} ({n}x)" for r, n in Counter(s.reason for s in skipped).most_common(3))
        raise UserError("the model has no quantizable MatMul/Gemm (a float weight initializer [K, N]) or Conv"
                        + (f": {why}" if why else "") + "; pass a model with linear or convolution layers")
    if not ctx.sites and ctx.convs:
        _check_conv_only(recipe, len(ctx.convs))

    sized = next((st for st in recipe.stages if st.kind == "weights" and st.max_size_mb is not None), None)
    fixed = None  # --max-size-mb: the bytes that are not quantized weights (the graph is final from here on)
    if sized is not None:  # a size the grid alone exceeds: refused before any calibration run
        from ptqonnx.budget import LayerCost, bits_for_size, stored_bits

        if recipe.quantize_embeddings:
            raise UserError("--max-size-mb does not count quantized embeddings yet; drop --quantize-embeddings, or "
                            "give --budget-bits (bits per quantized linear weight) instead")
        fixed = _unquantized_bytes(model, ctx.sites, recipe, ctx.convs)
        bits_for_size(sized.max_size_mb * 2**20, fixed, [
            LayerCost(s.name, s.N * s.K, stored_bits(sized, s.K, 8 * s.float_dtype.itemsize, recipe.format), 0.0,
                      0.0, 0.0) for s in ctx.sites])
    requests: dict[str, set] = {}
    for spec, cfg in specs:
        for name, kinds in (spec.requests(ctx, cfg) if spec.requests is not None else {}).items():
            requests.setdefault(name, set()).update(kinds)
    budget = any(st.kind == "weights" and st.budgeted for st in recipe.stages)
    ranks = budget or (sensitivity and any(st.kind == "weights" for st in recipe.stages))
    if ranks and (ctx.calibration.supplied or stats_path is not None):
        for s in ctx.sites:  # the budget and --sensitivity rank layers by their error on these rows
            requests.setdefault(s.activation.name, set()).add("sample")
    requests = {k: v for k, v in requests.items() if v}
    if stats_path is not None and not requests:
        raise UserError(f"{recipe.method} calibrates block by block on the partly quantized model and reads no "
                        "saved statistics; drop --stats (one-shot stages read them: smoothquant, w8a8, gptq "
                        "--one-shot)")
    if requests:
        with timed("statistics"):
            ctx.stats, ctx.stats_origin = _statistics(ctx, requests, Path(stats_path) if stats_path else None)

    if ranks:
        with timed("budget" if budget else "sensitivity"):
            costs, measured = _layer_costs(ctx)
            if sensitivity:
                report.sensitivity = sorted(costs, key=lambda c: c.base_error, reverse=True)
                report.sensitivity_measured = measured
            if budget:
                recipe = _spend_budget(ctx, report, costs, measured, fixed)
                specs = [(method_spec(stage), stage) for stage in recipe.stages]
    driven = any(s.kind == "scaling" for s in recipe.stages)  # awq runs the weights stage itself
    for spec, cfg in specs:
        if not (cfg.kind == "weights" and driven) and not cfg.before_statistics:
            with timed(cfg.stage):
                _run_stage(spec, cfg, ctx, report, skipped)
    if analyze and ctx.plan:
        with timed("report: layer errors"):
            report.layers = _measure_layers(ctx, held, before)
    convs = _plan_convs(ctx, report)

    if recipe.target == "tensorrt" and recipe.w8a8 is None:
        _check_tensorrt_blocks([st for st in ctx.sites if recipe.weights.for_site(st.name) is recipe.weights],
                               recipe.weights.group_size)  # raised layers are per channel
    passes, emb = _lowering_passes(recipe, dict(ctx.plan or {}), ctx.activations, convs)
    with timed("lowering"):
        run_passes(passes, model)
        if recipe.target is not None:
            report.notes += _check_target(model, recipe.target)
    if analyze:
        from ptqonnx.analysis import size_breakdown

        report.sizes = size_breakdown(model)
    report.quantized = [s.name for s in ctx.sites]
    report.convs = list(convs)
    report.skipped = skipped
    if emb is not None:
        report.embeddings_quantized = sum(1 for n in model.graph if n.op_type == "GatherBlockQuantized")
        report.skipped += [Skip(n, "Gather", r) for n, r in emb.skipped]


class _Timer:
    """`with timed("step"):` adds the step's wall time to `report.timings` (seconds, in run order)."""

    def __init__(self, report: CompileReport) -> None:
        self.report = report

    @contextlib.contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.report.timings[step] = self.report.timings.get(step, 0.0) + time.perf_counter() - t0


def _layer_costs(ctx: MethodContext) -> tuple[list, str]:
    """Each selected layer's stored cost and RTN error on the weights stage's grid and at 8 bits per channel
    (`ptqonnx.budget.layer_cost`) on the statistics' sample rows, or on the weights alone without data; and
    how they were measured, in words."""
    from ptqonnx.budget import layer_cost

    w = ctx.recipe.weights
    on_data = all(s.activation.name in ctx.stats and ctx.stats[s.activation.name].sample is not None
                  for s in ctx.sites)
    costs = [layer_cost(s.name, s.weight_nk(), ctx.stats[s.activation.name].sample if on_data else None, w,
                        8 * s.float_dtype.itemsize, ctx.recipe.format) for s in ctx.sites]
    measured = (f"relative output MSE of RTN on {ctx.stats_origin}" if on_data
                else "relative weight MSE of RTN (no calibration data)")
    return costs, measured


def _spend_budget(ctx: MethodContext, report: CompileReport, costs: list, measured: str,
                  fixed: int | None) -> Recipe:
    """`--budget-bits` / `--max-size-mb`: raise the layers with the most error removed per added bit to 8 bits
    (`ptqonnx.budget`) and return the recipe with that choice as the weights stage's `high_bits` (which every
    later stage, the report and the written recipe read). A size in MiB becomes bits per weight once the
    bytes that are not quantized weights (`fixed`, `_unquantized_bytes`; None for --budget-bits) are counted."""
    from ptqonnx.budget import bits_for_size, choose_high_bits
    from ptqonnx.report import BudgetSummary

    recipe, w = ctx.recipe, ctx.recipe.weights
    bits = w.budget_bits if fixed is None else bits_for_size(w.max_size_mb * 2**20, fixed, costs)
    high, reached, floor = choose_high_bits(costs, bits, "--budget-bits" if fixed is None else "--max-size-mb")
    raised = dataclasses.replace(w, budget_bits=None, max_size_mb=None,
                                 high_bits=tuple(_exact_pattern(n) for n in high))
    recipe = dataclasses.replace(recipe, stages=tuple(raised if st is w else st for st in recipe.stages))
    planned = None if fixed is None else int(fixed + sum(c.weights * (c.high_bits if c.name in high else c.base_bits)
                                                         for c in costs) / 8)
    report.stages.append(BudgetSummary("budget", budget_bits=w.budget_bits, max_size_mb=w.max_size_mb,
                                       planned_bytes=planned, bits_per_weight=reached, grid_bits=floor,
                                       high=tuple(high), errors={c.name: c.base_error for c in costs},
                                       measured=measured))
    logger.info("budget %s: %d of %d layers at 8 bits, %.3f bits per weight reached",
                f"{w.max_size_mb:g} MiB" if fixed is not None else f"{w.budget_bits:g} bits per weight", len(high),
                len(costs), reached)
    ctx.recipe = report.recipe = recipe
    return recipe


def _unquantized_bytes(model: ir.Model, sites: Sequence[LinearSite], recipe: Recipe,
                       convs: Sequence[LinearSite] = ()) -> int:
    """An upper bound on the bytes an output file will hold besides the quantized linear layers' codes, scales
    and zero points: the graph as it stands (`io.structure_bytes`: nodes, value_info, tensor headers,
    metadata), every initializer the lowering keeps (embeddings, norms, biases, layers left float; a weight the
    layers share with another reader, like a tied embedding), `LOWERED_NODE_BYTES` per layer for the node and
    tensors the lowering writes, the scale vector and Mul of each group a scaling stage may insert, and the
    Conv layers' fixed 8-bit grid (a code per weight, a scale and a zero point per output channel)."""
    from ptqonnx.io import structure_bytes

    nodes = {id(s.node) for s in (*sites, *convs)}

    def only_layers(v: ir.Value) -> bool:  # read by the layers alone (directly or through a Transpose/Cast)
        return all(id(u.node) in nodes or (u.node.op_type in ("Transpose", "Cast", "Identity")
                                           and all(only_layers(o) for o in u.node.outputs)) for u in v.uses())

    dropped = {id(s.weight_source) for s in (*sites, *convs) if only_layers(s.weight_source)}
    kept = sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None and id(v) not in dropped)
    inserted = 0
    if any(st.kind == "scaling" or st.stage == "smoothquant" for st in recipe.stages):
        groups = {id(s.activation): s for s in sites}.values()
        inserted = sum(s.K * s.float_dtype.itemsize + 512 for s in groups)
    conv = sum(c.N * c.K + c.N * (c.float_dtype.itemsize + 1) for c in convs)
    return structure_bytes(model) + kept + LOWERED_NODE_BYTES * (len(sites) + len(convs)) + inserted + conv


def _exact_pattern(name: str) -> str:
    """A shell pattern matching exactly `name` (`high_bits` and `exclude` are patterns: `[`, `*`, `?` escaped)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _held_feeds(ctx: MethodContext) -> tuple[list[dict[str, np.ndarray]] | None, str]:
    """The report's measurement rows, and how they were drawn: text calibration draws `REPORT_SAMPLES` fresh
    windows with the next seed (another draw than the methods saw; a short text's windows may overlap); an
    npz or given feeds have no more samples than calibration used, so their last ones are reused (said so);
    no data: None (data-free)."""
    cal = ctx.calibration
    if not cal.supplied:
        return None, "no calibration data: per-layer error is the weight-space ||W_hat - W||^2 / ||W||^2"
    cfg = cal.config
    if cal.draws_text:
        from ptqonnx.calibration.sources import calibration_batches

        held = dataclasses.replace(cfg, samples=min(cfg.samples, REPORT_SAMPLES), seed=cfg.seed + 1)
        feeds = calibration_batches(held, cal.model_dir, cal.inputs)
        other = (f"another draw than calibration's seed {cfg.seed}, windows may overlap"
                 if ctx.recipe.needs_calibration else "no method read calibration data")
        return feeds, (f"relative output MSE on {len(feeds)} windows of {cfg.seq_len} tokens drawn with seed "
                       f"{held.seed} ({other}), {REPORT_ROWS} rows per layer")
    feeds = ctx.feeds()[-REPORT_SAMPLES:]
    return feeds, (f"relative output MSE on the last {len(feeds)} calibration samples (not held out: the "
                   f"calibration data has no more), {REPORT_ROWS} rows per layer")


def _input_absmax(model: ir.Model, sites: Sequence[LinearSite], feeds, provider: str) -> dict[str, np.ndarray]:
    """Per-channel absmax of each site's input (by site name), one ONNX Runtime run over `feeds`."""
    from ptqonnx.runtime.collect import collect_statistics

    stats = collect_statistics(model, feeds, {s.activation.name: {"absmax"} for s in sites},
                               label="report: input model", provider=provider)
    return {s.name: stats[s.activation.name].absmax for s in sites}


def _measure_layers(ctx: MethodContext, feeds, before: dict[str, np.ndarray] | None) -> list:
    """Every planned layer's error on the float model it was quantized from (`ptqonnx.analysis`)."""
    from ptqonnx.analysis import measure_layers

    current = {s.name: s for s in ctx.refresh_sites() if s.name in ctx.plan}  # weights as the graph now holds them
    rows = after = None
    if feeds is not None:
        from ptqonnx.runtime.collect import collect_statistics

        stats = collect_statistics(ctx.model, feeds, {s.activation.name: {"absmax", "sample"}
                                                      for s in current.values()}, sample_rows=REPORT_ROWS,
                                 label="report: layer errors", provider=ctx.calibration.provider)
        rows = {n: stats[s.activation.name].sample for n, s in current.items()}
        after = {n: stats[s.activation.name].absmax for n, s in current.items()}
    plan = {n: p for n, p in ctx.plan.items() if n in current}
    grids = {n: g[0] for n, g in ctx.activations.grids.items() if 0 in g} if ctx.activations is not None else None
    return measure_layers(plan, {n: current[n].weight_nk() for n in plan}, rows,
                          before if before is not None else after, after, grids)


def _run_stage(spec, cfg: StageConfig, ctx: MethodContext, report: CompileReport, skipped: list[Skip]) -> None:
    """Run one stage and keep what it returned: folds, the weight plan, the activation plan, its summary."""
    result = spec.run(ctx, cfg)
    ctx.folds.extend(result.folds)
    if result.plan is not None:
        ctx.plan = result.plan
    if result.activations is not None:
        ctx.activations = result.activations
    report.stages += list(result.summary) if isinstance(result.summary, tuple) else [result.summary]
    skipped += list(result.skipped)


def compile_model(
    input_path: str | Path,
    output_path: str | Path | None,
    config: Recipe | StageConfig | Sequence[StageConfig],
    *,
    calibration: CalibrationArg = None,
    stats: str | Path | None = None,
    verify_ort: bool = True,
    progress: Progress | None = None,
    write_recipe: bool = True,
    force: bool = False,
    report_dir: str | Path | None = None,
    sensitivity: bool = False,
) -> CompileReport:
    """Quantize the model file at `input_path` and write it to `output_path` (or a default beside it), plus
    the recipe actually run (`recipe_path_for(output)`), from which the same output can be compiled again.
    Written into a folder of its own (new or empty before the compile), the output gets the input folder's
    config and tokenizer files beside it (`io.copy_companions`), so optimum and transformers load that folder
    as a model.
    An existing output is replaced only with `force`; the output never names an input file (checked, with the
    disk space, before any compute). `report_dir`: measure every layer (`quantize(analyze=True)`) and write
    `report.json`, `report.md` and its plots there (`ptqonnx.report_files`). `sensitivity`: as for
    `quantize`."""
    t0 = time.perf_counter()
    recipe = _recipe(config)
    _check_requirements(recipe)
    src = Path(input_path)
    dst = Path(output_path) if output_path else default_output_path(src, recipe)
    model = load_model(src)
    inputs = model_files(src)
    check_output_path(dst, inputs, force=force)
    preflight(dst, file_bytes(src))
    if report_dir is not None:
        from ptqonnx.report_files import check_report_dir

        check_report_dir(Path(report_dir), force=force)
    calib = calibration if calibration is not None else recipe.calibration
    if isinstance(calib, CalibConfig):
        calib = _absolute(calib)
        recipe = as_recipe(recipe, calibration=calib) if recipe.needs_calibration else recipe
    report = CompileReport(src, dst, recipe=recipe, input_bytes=file_bytes(src))
    fresh = not dst.parent.exists() or not any(dst.parent.iterdir())  # a folder of its own: companions go there
    _quantize_in_place(model, recipe, calib, src.parent, stats, progress, report, analyze=report_dir is not None,
                       sensitivity=sensitivity)
    size = next((st.max_size_mb for st in recipe.stages if st.kind == "weights" and st.max_size_mb), None)
    if size is not None:
        _check_size(model, size)
    with _Timer(report)("save and checks"):
        report.notes += save_model(model, dst, verify_ort=verify_ort)
    if write_recipe:
        from ptqonnx.recipe import save_recipe

        save_recipe(report.recipe, recipe_path_for(dst))
    if fresh:  # config and tokenizer beside it: optimum / transformers load the folder as a model
        report.companions = copy_companions(src, dst)
    report.output_bytes = file_bytes(dst)
    report.peak_rss_mib = _peak_rss_mib()
    report.seconds = time.perf_counter() - t0
    logger.info("compiled %s -> %s: %d linear and %d Conv layers quantized, %d skipped in %.1f s",
                src, dst, len(report.quantized), len(report.convs), len(report.skipped), report.seconds)
    if report_dir is not None:
        from ptqonnx.report_files import write_report

        report.report_files = write_report(report, Path(report_dir))
    return report


def _check_size(model: ir.Model, size_mb: float) -> None:
    """--max-size-mb: the lowered model's file size (`io.predicted_file_bytes`, an upper bound) within the
    budget, or a one-line refusal before anything is written."""
    from ptqonnx.io import predicted_file_bytes

    need = predicted_file_bytes(model)
    if need > size_mb * 2**20:
        over = math.ceil((need - size_mb * 2**20) / 2**20 * 100) / 100
        raise UserError(f"the output would take up to {need / 2**20:.2f} MiB, over --max-size-mb {size_mb:g} (the "
                        "budget's estimate of the graph fell short: please report it); nothing was written: pass "
                        f"--max-size-mb {size_mb - over:g}")


def _absolute(cfg: CalibConfig) -> CalibConfig:
    """Paths made absolute, so the recipe written beside the output reads the same files from anywhere."""
    import dataclasses

    return dataclasses.replace(cfg, **{f: getattr(cfg, f).resolve() for f in ("text", "npz", "tokenizer_dir")
                                       if getattr(cfg, f) is not None})
