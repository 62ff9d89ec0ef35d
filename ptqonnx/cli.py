"""Command line: `ptqonnx export | compile | calibrate | eval | bench | inspect | check | build-engine |
quickstart`.

The only module that configures logging and prints. Every user error is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ptqonnx.cli_options import (
    add_calibration_flags, add_config_flags, calib_from_args, given_flags, recipe_from_args,
)
from ptqonnx.errors import UserError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("ptqonnx")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage block too)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v

    return parse


def _shape_range(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (e.g. 1,128,512), got {text!r}") from None
    if not 0 < lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= OPT <= MAX, got {text}")
    return lo, opt, hi


def _provider_flag(p: argparse.ArgumentParser) -> None:
    from ptqonnx.runtime.ort import PROVIDERS

    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu",
                   help="ONNX Runtime execution provider (default cpu); cuda/tensorrt need onnxruntime-gpu and never "
                        "fall back to the CPU (a node they cannot run is an error)")


_TABLES: dict[str, dict[str, list]] = {}  # "config" / "calib" -> flag table of the parser last built


def _stage_classes() -> list:
    from ptqonnx.registry import stage_class, stage_names

    return [stage_class(n) for n in stage_names()]


def _method_help(classes: list) -> str:
    from ptqonnx.registry import FLAG_STAGES

    methods = [c.stage for c in classes if c.stage not in FLAG_STAGES]
    lines = {c.stage: (c.__doc__ or "").strip().split(":")[0].split(".")[0] for c in classes}
    return ("one method or stages joined by '+' (e.g. awq+gptq): " + "; ".join(
        f"{m}: {lines[m]}" for m in methods) + " (default: rtn)")


def build_parser() -> argparse.ArgumentParser:
    from ptqonnx import __version__
    from ptqonnx.check import TARGETS as CHECK_TARGETS

    parser = _Parser(prog="ptqonnx", description="ONNX post-training quantization compiler")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: per node)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress lines)")
    parser.add_argument("--version", action="version", version=f"ptqonnx {__version__}")
    # -v / -q also after the subcommand (`ptqonnx compile -v ...`); SUPPRESS keeps the top-level value otherwise
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("export", parents=[common],
                       help="export a causal LM (the real default `smollm2`, or a HF folder) to ONNX")
    p.add_argument("source", help="`smollm2` or a local Hugging Face causal-LM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--no-kv-cache", action="store_true", help="skip the KV-cache variant (model_kv.onnx)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="float type of the exported graph (default float32; norms and softmax stay float32 inside)")

    classes = _stage_classes()
    p = sub.add_parser("compile", parents=[common], help="quantize an ONNX model")
    p.add_argument("model", type=Path, help="the ONNX model to quantize (never modified)")
    p.add_argument("-o", "--output", type=Path, help="output .onnx (default: beside the input, named by method, "
                   "bits and format); the recipe it ran is written beside it as OUTPUT_STEM.recipe.yaml")
    p.add_argument("--method", default=None, metavar="METHOD", help=_method_help(classes))
    p.add_argument("--rotate", action="store_true", help="first rotate the model (QuaRot/SpinQuant: R1 residual "
                   "stream, R2 value heads, R4 online Hadamard before down_proj; exact, checked): outlier-free "
                   "activations for the stages after it")
    p.add_argument("--w8a8", action="store_true", help="INT8 weights (per channel) and INT8 activations "
                   "(per tensor, static scales from calibration: QDQ; see --act-scales)")
    p.add_argument("--recipe", type=Path, help="a YAML recipe describing the whole compile (stages, layer "
                   "selection, calibration); method flags are then refused, calibration flags override its own")
    p.add_argument("--stats", type=Path, help="statistics from `ptqonnx calibrate` for the one-shot stages "
                   "(smoothquant, w8a8, gptq --one-shot) instead of a calibration run")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime checks of the output (loading it "
                   "and comparing ORT_ENABLE_ALL with ORT_DISABLE_ALL on a probe input)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (and report)")
    p.add_argument("--report", type=Path, metavar="DIR", help="also write report.json, report.md and plots to DIR: "
                   "per-layer quantization error on a second draw of calibration rows (calibration flags are then "
                   "used by rtn too), input outliers before/after smoothing or rotation, sizes, time per step "
                   "(needs matplotlib: pip install 'ptqonnx[report]')")
    p.add_argument("--sensitivity", action="store_true", help="also print every quantized layer ranked by its "
                   "measured RTN error on the grid (and at 8 bits): the numbers --budget-bits / --max-size-mb rank by; "
                   "measured on the calibration rows the compile collects (calibration flags are then used by rtn "
                   "too), or on the weights alone without data")
    _TABLES["config"] = add_config_flags(p, classes)
    _TABLES["calib"] = add_calibration_flags(p)

    p = sub.add_parser("calibrate", parents=[common], help="collect activation statistics of the linear layers to an "
                       ".npz (reused by `compile --stats`)")
    p.add_argument("model", type=Path, help="the ONNX model to calibrate")
    p.add_argument("-o", "--output", type=Path, required=True, help="statistics .npz")
    p.add_argument("--hessian", action="store_true", help="also accumulate X^T X (GPTQ's Hessian, for gptq "
                   "--one-shot)")
    p.add_argument("--sample-rows", type=_positive(int), default=None, metavar="N",
                   help="also keep N sampled rows per activation (for --alpha auto, --calib-range percentile and "
                   "smoothed --target ort-cpu)")
    _TABLES["calib"] = add_calibration_flags(p)

    p = sub.add_parser("eval", parents=[common], help="perplexity of a causal LM (with or without KV cache); cosine "
                       "similarity to a reference (--reference, e.g. encoders); or one table for several models "
                       "(--compare)")
    p.add_argument("model", type=Path, nargs="?", help="the model (with --compare: the baseline, listed first)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--text", type=Path, help="text file (read whole, tokenized once, cut into windows)")
    g.add_argument("--inputs-npz", type=Path, help="model inputs by input name, first axis = samples (--reference)")
    p.add_argument("--reference", type=Path, help="float model: cosine similarity of MODEL's outputs to this one's")
    p.add_argument("--compare", type=Path, nargs="+", metavar="MODEL", help="more models: one table of perplexity, "
                   "size, prefill and decode latency, ratios to the first")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the model)")
    p.add_argument("--seq-len", type=_positive(int), default=512, help="window length (default 512)")
    p.add_argument("--max-windows", type=_positive(int), help="evaluate at most this many windows / samples")
    p.add_argument("--threads", type=_positive(int), help="ORT intra-op threads (default: all cores)")
    p.add_argument("--rounds", type=_positive(int), default=10, help="--compare: interleaved latency rounds (10)")
    _provider_flag(p)

    p = sub.add_parser("bench", parents=[common],
                       help="ONNX Runtime latency: prefill (and per-token decode with --kv or KV models)")
    p.add_argument("model", type=Path, nargs="?", help="input_ids -> logits model (with --compare: the baseline)")
    p.add_argument("--kv", type=Path, help="the KV-cache variant, for per-token decode latency")
    p.add_argument("--compare", type=Path, nargs="+", metavar="MODEL",
                   help="more models: one table, latencies interleaved in one run, ratios to the first")
    p.add_argument("--seq-len", type=_positive(int), default=512, help="prefill tokens (default 512)")
    p.add_argument("--repeats", type=_positive(int), default=10, help="timed runs / interleaved rounds (default 10)")
    p.add_argument("--threads", type=_positive(int), help="ORT intra-op threads (default: all cores)")
    _provider_flag(p)

    p = sub.add_parser("inspect", parents=[common],
                       help="what a model is and how it is quantized (ours or another tool's)")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print the description as JSON")

    p = sub.add_parser("check", parents=[common], help="a model against a runtime's rules (TensorRT, ORT CUDA, ORT "
                       "CPU), each citing its source; for tensorrt also TensorRT-RTX's own parser where it is "
                       "installed")
    p.add_argument("model", type=Path, help="the ONNX model to check")
    p.add_argument("--target", required=True, choices=CHECK_TARGETS, help="the runtime")
    p.add_argument("--build", action="store_true", help="tensorrt: also build an engine ahead of time (no GPU "
                   "needed; TensorRT-RTX)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")

    p = sub.add_parser("build-engine", parents=[common], help="build a TensorRT engine ahead of time with TensorRT-RTX "
                       "(no GPU needed; extra trt-check)")
    p.add_argument("model", type=Path, help="the ONNX model")
    p.add_argument("-o", "--output", type=Path, required=True, help="the engine plan file to write")
    p.add_argument("--batch", type=_shape_range, default=(1, 1, 4), metavar="MIN,OPT,MAX",
                   help="profile of dimension 0 of every dynamic input (default 1,1,4)")
    p.add_argument("--sequence", type=_shape_range, default=(1, 128, 512), metavar="MIN,OPT,MAX",
                   help="profile of every other dynamic dimension (default 1,128,512)")
    p.add_argument("--compute-capability", action="append", metavar="SMxx", help="e.g. SM86 (repeat for more; "
                   "default: TensorRT-RTX's portable set)")

    p = sub.add_parser("quickstart", parents=[common], help="the main job end to end on the real default model: "
                       "export SmolLM2-135M, RTN INT4 g128, perplexity and prefill latency next to FP32")
    p.add_argument("--text", type=Path, required=True, help="evaluation text (e.g. WikiText-2 test)")
    p.add_argument("-o", "--output", "--out", dest="out", type=Path, default=Path("work/smollm2"),
                   help="working folder (default work/smollm2; --out is an alias)")
    p.add_argument("--max-windows", type=_positive(int), default=40, help="512-token windows to evaluate (40)")
    return parser


def _cmd_quickstart(args) -> None:
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.config import RtnConfig
    from ptqonnx.pipeline import compile_model
    from ptqonnx.runtime.bench import interleaved, prefill_runner
    from ptqonnx.runtime.perplexity import perplexity
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    text = read_text(args.text)  # fail early on a bad path, before the export
    fp32 = args.out / "model.onnx"
    if fp32.is_file():
        print(f"using the existing export {fp32}")
    else:
        export_causal_lm("smollm2", args.out, kv_cache=False)
        print(f"exported SmolLM2-135M to {fp32}")
    report = compile_model(fp32, None, RtnConfig(bits=4, group_size=128, symmetric=True), force=True)
    print(f"RTN INT4 g128: {len(report.quantized)} linear layers -> {report.output_path} "
          f"({_mib(report.output_bytes)} vs {_mib(report.input_bytes)}) in {report.seconds:.1f} s")
    windows = eval_windows(tokenize(text, load_tokenizer(args.out)), 512, args.max_windows)
    ppl = {name: perplexity(path, windows) for name, path in (("FP32", fp32), ("RTN W4 g128", report.output_path))}
    runners = {name: prefill_runner(path)[0] for name, path in (("FP32", fp32), ("RTN W4 g128", report.output_path))}
    lat = interleaved(runners, rounds=5)
    print(f"{'model':<14}{'perplexity':>12}{'prefill 1x512 ms':>18}{'vs FP32':>9}")
    for name in ppl:
        print(f"{name:<14}{ppl[name].ppl:>12.4f}{lat.medians[name]:>18.1f}{lat.ratios[name]:>8.2f}x")
    print(f"({ppl['FP32'].tokens_evaluated} tokens evaluated; latency: median of 5 interleaved rounds)")


def _cmd_export(args) -> None:
    from ptqonnx.models.export import export_causal_lm

    res = export_causal_lm(args.source, args.output, kv_cache=not args.no_kv_cache, dtype=args.dtype)
    print(f"exported {args.source} -> {res.model_path}" + (f" and {res.kv_model_path}" if res.kv_model_path else ""))


def _compile_recipe(args):
    """The recipe of a `compile` command line, and the calibration it names (None: the recipe's own)."""
    from ptqonnx.recipe import load_recipe

    classes = _stage_classes()
    table = _TABLES["config"]
    if args.recipe is not None:
        extra = list(given_flags(args, table)) + [f for f, v in (("--method", args.method), ("--w8a8", args.w8a8),
                                                                   ("--rotate", args.rotate))
                                                   if v]
        if extra:
            raise UserError(f"--recipe describes the whole compile; drop {', '.join(extra)} or edit the recipe")
        recipe = load_recipe(args.recipe)
    else:
        recipe = recipe_from_args(args.method or "rtn", args.w8a8, args, table, classes, rotate=args.rotate)
    calib = calib_from_args(args, _TABLES["calib"], recipe.calibration, classes)
    given = given_flags(args, _TABLES["calib"])
    measures = args.report is not None or args.sensitivity or any(
        st.kind == "weights" and st.budgeted for st in recipe.stages)  # data the report / budget / ranking measure on
    if given and not recipe.needs_calibration and not measures:
        raise UserError(f"{recipe.method} needs no calibration data; drop {', '.join(given)}")
    if args.stats is not None and not recipe.needs_calibration and not measures:
        raise UserError(f"{recipe.method} needs no statistics; drop --stats")
    return recipe, calib


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cmd_compile(args) -> None:
    from ptqonnx.pipeline import compile_model, recipe_path_for

    recipe, calib = _compile_recipe(args)
    report = compile_model(
        args.model, args.output, recipe, calibration=calib, stats=args.stats, verify_ort=not args.no_verify,
        force=args.force, report_dir=args.report,  # progress: the bars / INFO lines of ptqonnx.progress (-q: none)
        sensitivity=args.sensitivity,
    )
    for line in report.lines(all_skips=args.verbose > 0) + report.sensitivity_lines():
        print(line)
    print(f"wrote {report.output_path} ({_mib(report.output_bytes)}, input {_mib(report.input_bytes)}) "
          f"in {report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB; recipe "
          f"{recipe_path_for(report.output_path)}")
    if report.companions:
        print(f"copied {', '.join(report.companions)} beside it (optimum's ORTModelForCausalLM and transformers "
              "load that folder)")
    if report.report_files:
        print(f"report: {report.report_files[1] if len(report.report_files) > 1 else report.report_files[0]}")


def _cmd_calibrate(args) -> None:
    from ptqonnx.calibration.sources import calibration_batches
    from ptqonnx.config import CalibConfig
    from ptqonnx.graph import find_linear_sites
    from ptqonnx.io import load_model
    from ptqonnx.pipeline import prepare_model
    from ptqonnx.runtime.collect import collect_statistics

    model = prepare_model(load_model(args.model))
    cfg = calib_from_args(args, _TABLES["calib"]) or CalibConfig()
    kinds = {"absmax", "mean_abs", "minmax", "row_absmax"} | ({"xtx"} if args.hessian else set()) | (
        {"sample"} if args.sample_rows else set())
    names = sorted({s.activation.name for s in find_linear_sites(model).sites})
    if not names:
        raise UserError(f"{args.model} has no quantizable MatMul/Gemm to calibrate; pass a model with linear layers")
    batches = calibration_batches(cfg, args.model.parent, list(model.graph.inputs))
    from ptqonnx.calibration.validate import check_feeds

    check_feeds(model, batches)
    stats = collect_statistics(model, batches, {n: set(kinds) for n in names}, provider=cfg.provider,
                               **({"sample_rows": args.sample_rows} if args.sample_rows else {}))
    stats.save(args.output)
    print(f"wrote statistics of {len(names)} activations to {args.output}")


def _models(args) -> list[Path]:
    """MODEL and --compare's models, MODEL first; at least one."""
    models = ([args.model] if args.model else []) + list(args.compare or [])
    if not models:
        raise UserError("pass a model (or --compare A.onnx B.onnx ...)")
    return models


def _cmd_eval(args) -> None:
    from ptqonnx.runtime.compare import compare_models, eval_inputs, output_similarity
    from ptqonnx.runtime.perplexity import perplexity

    models = _models(args)
    if args.reference and len(models) > 1:
        raise UserError("pass either --reference (one model) or --compare (the first model is the reference)")
    if args.inputs_npz and len(models) == 1 and not args.reference:
        raise UserError("--inputs-npz is compared by cosine similarity: add --reference FP32.onnx "
                        "(perplexity reads --text)")
    inputs = eval_inputs(models[0], text=args.text, npz=args.inputs_npz, tokenizer=args.tokenizer,
                         seq_len=args.seq_len, max_windows=args.max_windows)
    if len(models) > 1:
        lines = compare_models(models, windows=inputs, seq_len=args.seq_len, rounds=args.rounds,
                               threads=args.threads, provider=args.provider).lines()
    elif args.reference:
        lines = output_similarity(models[0], args.reference, inputs, threads=args.threads,
                                  provider=args.provider).lines()
    else:
        res = perplexity(models[0], inputs, threads=args.threads, provider=args.provider)
        lines = [f"perplexity {res.ppl:.4f} over {res.tokens_evaluated} tokens "
                 f"({res.windows} windows x {args.seq_len})"]
    print("\n".join(lines))


def _cmd_bench(args) -> None:
    from ptqonnx.runtime.bench import bench_decode, bench_prefill
    from ptqonnx.runtime.compare import compare_models

    models = _models(args)
    if args.kv and len(models) > 1:
        raise UserError("--kv is for one model; with --compare list the KV-cache exports themselves (decode is "
                        "measured when every model has a cache)")
    if len(models) > 1:
        res = compare_models(models, seq_len=args.seq_len, rounds=args.repeats, threads=args.threads,
                             provider=args.provider)
        print("\n".join(res.lines()))
        return
    for path in models + ([args.kv] if args.kv else []):
        if not path.is_file():
            raise UserError(f"model file not found: {path}; pass the path of an .onnx file")
    pre = bench_prefill(models[0], seq_len=args.seq_len, repeats=args.repeats, threads=args.threads,
                        provider=args.provider)
    print(f"prefill 1x{args.seq_len}: {pre.describe()}")
    if args.kv:
        dec = bench_decode(args.kv, repeats=args.repeats, threads=args.threads, provider=args.provider)
        print(f"decode: {dec.describe('ms/token')}")


def _cmd_inspect(args) -> None:
    from ptqonnx.inspect import inspect_model

    info = inspect_model(args.model)
    print(info.to_json() if args.json else "\n".join(info.lines()))


def _cmd_check(args) -> int:
    import dataclasses
    import json

    from ptqonnx.check import check_model, errors, format_findings
    from ptqonnx.io import load_model
    from ptqonnx.runtime.tensorrt import build_engine, parse_onnx, tensorrt_available

    if args.build and args.target != "tensorrt":
        raise UserError("--build builds a TensorRT engine: use it with --target tensorrt")
    findings = check_model(load_model(args.model), args.target)
    trt: dict | None = None
    if args.target == "tensorrt" and tensorrt_available():
        if args.build:
            built = build_engine(args.model)
            trt = {"parsed": built.parse.ok, "built": built.ok, "errors": list(built.parse.errors + built.errors)}
        else:
            parsed = parse_onnx(args.model)
            trt = {"parsed": parsed.ok, "errors": list(parsed.errors)}
    bad = errors(findings)
    failed = bool(bad) or (trt is not None and not (trt.get("built", trt["parsed"])))
    if args.json:
        print(json.dumps({"target": args.target, "findings": [dataclasses.asdict(f) for f in findings],
                          "tensorrt_rtx": trt, "ok": not failed}, indent=2))
        return 1 if failed else 0
    for line in format_findings(findings):
        print(line)
    print(f"{args.model}: {len(bad)} errors, {len(findings) - len(bad)} warnings under the {args.target} rules")
    if args.target == "tensorrt":
        if trt is None:
            print("TensorRT-RTX is not installed: no real parse (pip install 'ptqonnx[trt-check]')")
        else:
            what = "parse and ahead-of-time build" if args.build else "parse"
            print(f"TensorRT-RTX {what}: " + ("ok" if not trt["errors"] and trt.get("built", trt["parsed"])
                                             else "failed"))
            for line in trt["errors"]:
                print(f"  {line}")
    return 1 if failed else 0


def _cmd_build_engine(args) -> int:
    from ptqonnx.runtime.tensorrt import build_engine

    res = build_engine(args.model, args.output, batch=args.batch, sequence=args.sequence,
                       compute_capabilities=args.compute_capability)
    if not res.ok:
        for line in res.parse.errors + res.errors:
            print(f"  {line}", file=sys.stderr)
        raise UserError(f"TensorRT-RTX could not {'build' if res.parse.ok else 'parse'} {args.model}"
                        f" ({len(res.parse.errors + res.errors)} errors above); nothing was written")
    print(f"built {res.plan_path} ({res.plan_bytes / 2**20:.1f} MiB) in {res.seconds:.1f} s; profile "
          + ", ".join(f"{n} {r.min}..{r.max}" for n, r in res.profile.items()))
    return 0


_COMMANDS = {
    "export": _cmd_export, "compile": _cmd_compile, "calibrate": _cmd_calibrate,
    "eval": _cmd_eval, "bench": _cmd_bench, "inspect": _cmd_inspect, "quickstart": _cmd_quickstart,
    "check": _cmd_check, "build-engine": _cmd_build_engine,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    from ptqonnx.progress import StderrHandler  # log lines print above the progress bars, not into them

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[StderrHandler()])
    logging.getLogger("ptqonnx").setLevel(level)  # -q silences the progress lines under any logging setup
    if args.verbose < 2:  # onnx_ir's own passes log at INFO per pass; keep our summary lines readable
        logging.getLogger("onnx_ir").setLevel(max(level, logging.WARNING))
    from ptqonnx.errors import Interrupted
    from ptqonnx.io import cleanup_on_signal

    try:
        with cleanup_on_signal():  # SIGINT/SIGTERM: temporary files removed, one line, exit 128 + signal
            rc = _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ptqonnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"ptqonnx {args.command}: {exc}; no output was written", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ptqonnx {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # an internal check failed (a bug, not bad input): one line, the trace on -vv
        if args.verbose > 1:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"ptqonnx {args.command}: {first} (a bug: please report it; -vv shows the traceback)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ptqonnx inspect ... | head`
        sys.stderr.close()
        return 0
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
