"""Command line: `ptqonnx export | compile | calibrate | eval | bench | quickstart`.

The only module that configures logging and prints. Every user error is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib-text", type=Path, help="text file to draw calibration windows from "
                   "(default: $PTQONNX_CALIB_TEXT, else WikiText-2 train via `datasets`)")
    g.add_argument("--calib-npz", type=Path, help="model inputs by input name, first axis = samples")
    g.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the model)")
    g.add_argument("--calib-samples", type=_positive(int), default=128, help="number of windows (default 128)")
    g.add_argument("--calib-seq-len", type=_positive(int), default=512, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for window offsets (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptqonnx", description="ONNX post-training quantization compiler")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: per node)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("export", help="export a causal LM (the real default `smollm2`, or a HF folder) to ONNX")
    p.add_argument("source", help="`smollm2` or a local Hugging Face causal-LM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--no-kv-cache", action="store_true", help="skip the KV-cache variant (model_kv.onnx)")

    p = sub.add_parser("compile", help="quantize an ONNX model")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, help="output .onnx (default: beside the input, named by method)")
    p.add_argument("--method", choices=["rtn", "gptq", "smoothquant", "awq", "awq+gptq"], default="rtn",
                   help="rtn: round to nearest (no data); gptq: Hessian-guided (needs calibration data); "
                   "smoothquant: W8A8 with activation outliers migrated into the weights (needs --w8a8)"
                   "; awq: activation-aware scales and clipping; awq+gptq: AWQ, then GPTQ")
    p.add_argument("--wbits", type=int, choices=[3, 4, 8],
                   help="weight bits (default 4; 8 with --w8a8; 3 = a 3-bit grid stored in 4-bit containers)")
    p.add_argument("--group-size", "--block-size", dest="group_size", type=int,
                   help="block length along K (default 128 for 4 bits; 8 bits default to per-channel; "
                   "0 = per-channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--format", choices=["matmulnbits", "qdq"],
                   help="com.microsoft MatMulNBits (ORT; the default) or DequantizeLinear+MatMul (TensorRT, "
                   "opset 21; implied by --w8a8)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (4 = int8 activations inside the kernel)")
    p.add_argument("--keep-lm-head", action="store_true", help="leave the LM head in float")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize embedding Gathers to 4-bit GatherBlockQuantized")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                   help="layers to leave in float: node or weight names, '*' patterns allowed (e.g. '*down_proj*')")
    p.add_argument("--no-verify", action="store_true", help="skip loading the output in ONNX Runtime")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--no-act-order", action="store_true", help="quantize columns in order, not by diag(H)")
    g.add_argument("--one-shot", action="store_true",
                   help="Hessians from the float model in one run (default: block by block on the quantized model)")
    g.add_argument("--device", default="cpu", help="torch device for the GPTQ / AWQ algebra (cpu, cuda, cuda:1)")
    g = p.add_argument_group("AWQ")
    g.add_argument("--awq-grid", type=_positive(int), default=20, help="alpha grid points (and clip ratios"
                   " per unit range) searched (default 20)")
    g.add_argument("--no-clip", action="store_true", help="skip the weight clipping search")
    g.add_argument("--no-insert", action="store_true",
                   help="refuse scaling groups whose 1/s no producer can absorb (no inserted Mul nodes)")
    g = p.add_argument_group("W8A8 / SmoothQuant")
    g.add_argument("--w8a8", action="store_true", help="INT8 weights (per channel) and INT8 activations "
                   "(per tensor, static scales from calibration: QDQ; see --act-scales)")
    g.add_argument("--alpha", default="0.5", help="SmoothQuant migration strength in [0, 1], or `auto` "
                   "(grid search per group); default 0.5")
    g.add_argument("--target", choices=["tensorrt", "ort-cpu"], default="tensorrt",
                   help="tensorrt: symmetric int8 activations (default); ort-cpu: asymmetric uint8 activations")
    g.add_argument("--calib-range", choices=["minmax", "percentile"], default="minmax",
                   help="activation range from calibration: full min/max (default) or a percentile of |x|")
    g.add_argument("--percentile", type=float, default=99.99, help="percentile for --calib-range percentile")
    g.add_argument("--quantize-bmm", action="store_true", help="also quantize attention's activation MatMuls")
    g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head in W8A8")
    g.add_argument("--act-scales", choices=["static", "dynamic"], default="static",
                   help="static: per-tensor activation scales from calibration, QDQ (default); dynamic: int8 "
                   "scales per row and block of K computed at run time by ORT's MatMulNBits (--target ort-cpu)")
    g.add_argument("--dynamic-layers", nargs="+", default=[], metavar="PATTERN",
                   help="with static scales, give these layers dynamic ones instead (patterns on node or weight "
                   "names, e.g. '*down_proj*'; --target ort-cpu)")
    _add_calib_args(p)

    p = sub.add_parser("calibrate", help="collect activation statistics of the linear layers to an .npz")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="statistics .npz")
    p.add_argument("--hessian", action="store_true", help="also accumulate X^T X (GPTQ's Hessian)")
    _add_calib_args(p)

    p = sub.add_parser("eval", help="perplexity of a causal LM (with or without KV cache); cosine similarity to "
                       "a reference (--reference, e.g. encoders); or one table for several models (--compare)")
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

    p = sub.add_parser("bench", help="ORT CPU latency: prefill (and per-token decode with --kv or KV models)")
    p.add_argument("model", type=Path, nargs="?", help="input_ids -> logits model (with --compare: the baseline)")
    p.add_argument("--kv", type=Path, help="the KV-cache variant, for per-token decode latency")
    p.add_argument("--compare", type=Path, nargs="+", metavar="MODEL",
                   help="more models: one table, latencies interleaved in one run, ratios to the first")
    p.add_argument("--seq-len", type=_positive(int), default=512, help="prefill tokens (default 512)")
    p.add_argument("--repeats", type=_positive(int), default=10, help="timed runs / interleaved rounds (default 10)")
    p.add_argument("--threads", type=_positive(int), help="ORT intra-op threads (default: all cores)")

    p = sub.add_parser("inspect", help="what a model is and how it is quantized (ours or another tool's)")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print the description as JSON")

    p = sub.add_parser("quickstart", help="the main job end to end on the real default model: export "
                       "SmolLM2-135M, RTN INT4 g128, perplexity and prefill latency next to FP32")
    p.add_argument("--text", type=Path, required=True, help="evaluation text (e.g. WikiText-2 test)")
    p.add_argument("--out", type=Path, default=Path("work/smollm2"), help="working folder (default work/smollm2)")
    p.add_argument("--max-windows", type=_positive(int), default=40, help="512-token windows to evaluate (40)")
    return parser


def _cmd_quickstart(args) -> None:
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.pipeline import compile_model
    from ptqonnx.config import CompileConfig, WeightQuantConfig
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
    cfg = CompileConfig(weights=WeightQuantConfig(bits=4, group_size=128, symmetric=True))
    report = compile_model(fp32, None, cfg)
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

    res = export_causal_lm(args.source, args.output, kv_cache=not args.no_kv_cache)
    print(f"exported {args.source} -> {res.model_path}" + (f" and {res.kv_model_path}" if res.kv_model_path else ""))


def _calib_config(args):
    from ptqonnx.calibration.sources import CalibConfig

    try:
        return CalibConfig(text=args.calib_text, npz=args.calib_npz, tokenizer_dir=args.tokenizer,
                           samples=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _compile_config(args):
    from ptqonnx.config import AwqConfig, CompileConfig, GptqConfig, SmoothQuantConfig, W8A8Config, WeightQuantConfig

    if args.method == "smoothquant" and not args.w8a8:
        raise UserError("smoothquant emits W8A8; pass --w8a8")
    wbits = args.wbits or (8 if args.w8a8 else 4)
    group = args.group_size
    if group is None:
        group = 128 if wbits < 8 else None
    elif group == 0:
        group = None
    fmt = args.format or ("qdq" if args.w8a8 else "matmulnbits")
    try:
        alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    except ValueError:
        raise UserError(f"--alpha must be a number in [0, 1] or auto, got {args.alpha!r}") from None
    try:
        weights = WeightQuantConfig(
            bits=wbits, group_size=group, symmetric=not args.asym, format=fmt,
            accuracy_level=args.accuracy_level, keep_lm_head=args.keep_lm_head,
            quantize_embeddings=args.quantize_embeddings, exclude=tuple(args.exclude),
        )
        gptq = GptqConfig(damp=args.damp, act_order=not args.no_act_order, sequential=not args.one_shot,
                          device=args.device)
        w8a8 = W8A8Config(target=args.target, calib_range=args.calib_range, percentile=args.percentile,
                          quantize_bmm=args.quantize_bmm, quantize_lm_head=args.quantize_lm_head,
                          act_scales=args.act_scales,
                          dynamic_layers=tuple(args.dynamic_layers)) if args.w8a8 else None
        awq = AwqConfig(grid=args.awq_grid, clip=not args.no_clip, no_insert=args.no_insert, device=args.device)
        return CompileConfig(method=args.method, weights=weights, gptq=gptq, awq=awq,
                             smoothquant=SmoothQuantConfig(alpha=alpha), w8a8=w8a8)
    except ValueError as exc:
        raise UserError(f"{exc}") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cmd_compile(args) -> None:
    from ptqonnx.pipeline import compile_model

    cfg = _compile_config(args)
    report = compile_model(
        args.model, args.output, cfg, calibration=_calib_config(args) if cfg.needs_calibration else None,
        verify_ort=not args.no_verify, progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"quantized {len(report.quantized)} linear layers"
          + (f" and {report.embeddings_quantized} embedding tables" if report.embeddings_quantized else "")
          + f"; skipped {len(report.skipped)}")
    for reason, n in report.skip_summary():
        names = [s.node for s in report.skipped if s.reason == reason]
        shown = names if args.verbose else names[:3]
        more = f", ... (+{len(names) - len(shown)}; -v lists all)" if len(names) > len(shown) else ""
        print(f"  skipped {n}: {reason}: {', '.join(shown)}{more}")
    if cfg.w8a8 is not None:
        print(f"W8A8 ({cfg.w8a8.target}): calibration {report.calibration}")
    if report.losses:
        print(f"calibration: {report.calibration}; GPTQ loss summed over layers {sum(report.losses.values()):.4g}")
    if report.awq_alpha:
        alphas = sorted(report.awq_alpha.values())
        print(f"AWQ: {len(report.scales_folded)} scale groups folded, {len(report.scales_inserted)} with an inserted "
              f"Mul, {len(alphas) - len(report.scales_folded) - len(report.scales_inserted)} unscaled (alpha 0); "
              f"median alpha {alphas[len(alphas) // 2]:.2f}; float outputs unchanged to {report.fold_max_rel_err:.1g}")
    print(f"wrote {report.output_path} ({_mib(report.output_bytes)}, input {_mib(report.input_bytes)}) "
          f"in {report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB")


def _cmd_calibrate(args) -> None:
    from ptqonnx.calibration.sources import calibration_batches
    from ptqonnx.graph import find_linear_sites
    from ptqonnx.pipeline import load_model
    from ptqonnx.runtime.collect import collect_statistics

    model = load_model(args.model)
    cfg = _calib_config(args)
    kinds = {"absmax", "mean_abs", "minmax"} | ({"xtx"} if args.hessian else set())
    names = sorted({s.activation.name for s in find_linear_sites(model).sites})
    if not names:
        raise UserError(f"{args.model} has no quantizable MatMul/Gemm to calibrate; pass a model with linear layers")
    batches = calibration_batches(cfg, args.model.parent, [v.name for v in model.graph.inputs])
    stats = collect_statistics(model, batches, {n: set(kinds) for n in names})
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
                               threads=args.threads).lines()
    elif args.reference:
        lines = output_similarity(models[0], args.reference, inputs, threads=args.threads).lines()
    else:
        res = perplexity(models[0], inputs, threads=args.threads)
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
        res = compare_models(models, seq_len=args.seq_len, rounds=args.repeats, threads=args.threads)
        print("\n".join(res.lines()))
        return
    for path in models + ([args.kv] if args.kv else []):
        if not path.is_file():
            raise UserError(f"model file not found: {path}; pass the path of an .onnx file")
    pre = bench_prefill(models[0], seq_len=args.seq_len, repeats=args.repeats, threads=args.threads)
    print(f"prefill 1x{args.seq_len}: {pre.describe()}")
    if args.kv:
        print(f"decode: {bench_decode(args.kv, repeats=args.repeats, threads=args.threads).describe('ms/token')}")


def _cmd_inspect(args) -> None:
    from ptqonnx.inspect import inspect_model

    info = inspect_model(args.model)
    print(info.to_json() if args.json else "\n".join(info.lines()))


_COMMANDS = {
    "export": _cmd_export, "compile": _cmd_compile, "calibrate": _cmd_calibrate,
    "eval": _cmd_eval, "bench": _cmd_bench, "inspect": _cmd_inspect, "quickstart": _cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose < 2:  # onnx_ir's own passes log at INFO per pass; keep our summary lines readable
        logging.getLogger("onnx_ir").setLevel(max(level, logging.WARNING))
    try:
        _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ptqonnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptqonnx: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
