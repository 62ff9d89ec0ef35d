"""SmoothQuant W8A8 benchmark: SmolLM2-135M, ours (static QDQ for both targets; dynamic and mixed for ORT CPU)
vs ONNX Runtime's `quantize_static` (with and without its SmoothQuant option) and Intel's SmoothQuant.

One run, same export and the same 40 x 512 evaluation windows as the foundation benchmark; calibration
windows from ../shared/data/wikitext-2-calib/valid.txt (seeded offsets, the same windows for every tool).
Each quantizer runs in its own process (time and peak RSS are its own). Writes benchmarks/results/
smoothquant.md and rebuilds results.md.

    python benchmarks/smoothquant.py [--calib 32] [--others-calib 2] [--windows 40] [--rounds 5]

The other tools get 2 calibration windows by default: ORT's MinMax calibrator (also inside Intel's tool) keeps
every intermediate tensor of every window in memory until the end, about 3 GB per 512-token window of
SmolLM2 here, and its chunking option (`CalibMaxIntermediateOutputs`) throws the chunks away instead of
reducing them (onnxruntime 1.32 `calibrate.py`, `collect_data` calls `clear_collected_data` without
`compute_data`), so it cannot bound that either.

Other tools: ORT `quantize_static` (QDQ, per-channel int8 weights, uint8 activations per tensor, MinMax);
its `SmoothQuant` extra option imports Intel's `neural-compressor` 2.x, which needs numpy < 2, so that row
runs from a venv of its own (benchmarks/work/venv-ortsq: onnxruntime, neural-compressor 2.6; made on first
use); Intel's `onnx-neural-compressor` 1.0 SmoothQuant from benchmarks/work/venv-inc (as the GPTQ benchmark).
Where a tool does not install, quantize or load, the table shows its exact error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CALIB_TEXT, INC_PACKAGES, INC_READER, Row, arg_parser, ensure_venv, evaluate, header, prefill_latency, prepare,
    quantize_ours, record, run_child, save_calib_inputs, table, write_section,
)

# neural-compressor 2.6 imports six and transformers (its ONNXModel) without declaring them
ORT_PACKAGES = ("onnxruntime==1.32.0", "onnx==1.23.2", "numpy<2", "neural-compressor==2.6", "six", "transformers<5")

# ORT quantize_static from the npz of calibration windows (args[2]); args[3]: smoothquant alpha or "none";
# args[4]: "matmul" (every MatMul/Gemm: also attention's and the tied LM head's, both inputs computed) or
# "linear" (the MatMul/Gemm nodes whose weight is an initializer, as ours)
ORT_STATIC = """
import numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter([{"input_ids": f} for f in np.load(args[2])["input_ids"]])
    def get_next(self):
        return next(self.it, None)
extra = {} if args[3] == "none" else dict(SmoothQuant=True, SmoothQuantAlpha=float(args[3]), SmoothQuantFolding=True)
g = onnx.load(args[0], load_external_data=False).graph
inits = {i.name for i in g.initializer}
linear = [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
quantize_static(args[0], args[1], Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=linear if args[4] == "linear" else None, extra_options=extra)
"""

INC_SQ = INC_READER + """
from onnxruntime.quantization import QuantFormat
from onnx_neural_compressor.quantization import algorithm_entry, config as inc_config
cfg = inc_config.SmoothQuantConfig(alpha=float(args[3]), quant_format=QuantFormat.QDQ, per_channel=True,
                                   calibration_sampling_size=len(feeds))
model = algorithm_entry.smooth_quant_entry(args[0], cfg, Reader())
onnx.save(model, args[1])
"""

DOWN = "*down_proj*"
HARD = ("*layers.11.mlp.down_proj*", "*layers.28.mlp.down_proj*")  # the two hardest inputs


def layer_errors(fp32: Path, calib: dict, alpha: float, top: int) -> list[str]:
    """Per-layer W8A8 output error on calibration rows after smoothing with `alpha`: static per-tensor uint8
    activations (ort-cpu grid) vs dynamic per-row-and-block int8 vs weights only; the `top` worst static ones."""
    import numpy as np
    import onnx_ir as ir

    from ptqonnx.calibration.sources import CalibConfig, calibration_batches
    from ptqonnx.graph import find_linear_sites
    from ptqonnx.numerics.smoothquant import (
        activation_scale, fake_quantize_activation_dynamic, smooth_scales, w8a8_group_error,
    )
    from ptqonnx.passes.matmul_nbits import per_channel_block
    from ptqonnx.passes.w8a8 import select_w8a8_sites
    from ptqonnx.runtime.collect import collect_statistics
    from ptqonnx.graph.scaling import find_scaling_groups

    model = ir.load(str(fp32))
    sites, _ = select_w8a8_sites(find_linear_sites(model).sites)
    groups, _ = find_scaling_groups(model, sites)
    feeds = calibration_batches(CalibConfig(**calib), fp32.parent, ["input_ids"])
    stats = collect_statistics(model, feeds, {s.activation.name: {"absmax", "sample"} for s in sites})
    scales = {g.name: smooth_scales(stats[g.name].absmax, [s.weight_nk() for s in g.sites], alpha) for g in groups}
    rows = []
    for s in sites:
        x, w = stats[s.activation.name].sample, s.weight_nk()
        sc = scales.get(s.activation.name, np.ones(s.K, np.float32))
        xs = x / sc
        err = {"static": w8a8_group_error(x, [w], sc, activation_scale(float(xs.min()), float(xs.max()), False)),
               "dynamic": w8a8_group_error(x, [w], sc, lambda v: fake_quantize_activation_dynamic(
                   v, per_channel_block(s.K))),
               "w8": w8a8_group_error(x, [w], sc, lambda v: v)}
        rows.append((err, s, float(np.abs(xs).max() / np.median(np.abs(xs).max(axis=1)))))
    rows.sort(key=lambda r: -r[0]["static"])
    down = [r for r in rows if "down_proj" in r[1].weight_name]
    out = [f"Per-layer relative output error ||Y_q - Y||² / ||Y||² on {len(x)} sampled calibration rows after "
           f"smoothing (alpha {alpha}), int8 per-channel weights in every column; the {top} worst with static "
           f"activations of {len(rows)} layers (median static {np.median([r[0]['static'] for r in rows]):.1e}, "
           f"dynamic {np.median([r[0]['dynamic'] for r in rows]):.1e}; {sum(r in rows[:top] for r in down)} of "
           f"these {top} are down_proj inputs):", "",
           "| layer (weight) | smoothed input: max / median row max | static per-tensor uint8 | dynamic "
           "per row and block | weights only |", "|---|---|---|---|---|"]
    for err, s, ratio in rows[:top]:
        out.append(f"| {s.weight_name} | {ratio:.0f} | {err['static']:.1e} | {err['dynamic']:.1e} | {err['w8']:.1e} |")
    return out + [""]


def main() -> int:
    ap = arg_parser(__doc__, calib=32, others_calib=2, venvs=("--inc-python", "--ort-sq-python"),
                    others_help=": ORT's calibrator holds ~3 GB per window")
    ap.add_argument("--no-auto", action="store_true", help="leave out the alpha auto rows (slow searches)")
    ap.add_argument("--layers", type=int, default=10, help="worst layers listed in the per-layer table (0: none)")
    args = ap.parse_args()
    mdir, q, _ = prepare(args, "smoothquant")
    from ptqonnx.runtime.perplexity import perplexity

    fp32 = mdir / "model.onnx"
    rows = [Row("FP32", "-", "float32 export", fp32)]

    if not args.skip_others:
        npz = q / "calib_inputs.npz"
        res = save_calib_inputs(mdir, npz, args.others_calib)
        others = [
            ("ORT quantize_static W8A8", "onnxruntime", "none", "matmul", None, ""),
            ("ORT quantize_static W8A8, linear layers", "onnxruntime", "none", "linear", None, ""),
            ("ORT quantize_static + SmoothQuant a0.5, linear layers", "onnxruntime + neural-compressor 2.6", "0.5",
             "linear", args.ort_sq_python, ensure_venv(args.ort_sq_python, ORT_PACKAGES)),
        ]
        for label, tool, alpha, scope, python, why in others:
            row = Row(label, tool, ("every MatMul/Gemm (also attention's and the tied LM head's)" if scope == "matmul"
                                    else "MatMul/Gemm with initializer weights (as ours)")
                      + f"; QDQ, int8 weights per channel, uint8 activations per tensor (MinMax), "
                      f"{args.others_calib} windows" + ("" if alpha == "none" else f"; SmoothQuant alpha {alpha}"),
                      q / f"ort_static_{alpha}_{scope}.onnx")
            row.note = why or res.get("error", "")
            if not row.note:
                record(row, run_child(ORT_STATIC, str(fp32), str(row.path), str(npz), alpha, scope, python=python))
            rows.append(row)
        row = Row("Intel SmoothQuant a0.5 W8A8", "onnx-neural-compressor 1.0",
                  f"SmoothQuantConfig(alpha=0.5): its default op types, QDQ, per-channel int8 weights, uint8 "
                  f"activations, {args.others_calib} windows", q / "inc_sq.onnx")
        row.note = ensure_venv(args.inc_python, INC_PACKAGES) or res.get("error", "")
        if not row.note:
            record(row, run_child(INC_SQ, str(fp32), str(row.path), str(npz), "0.5", python=args.inc_python))
        rows.append(row)

    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    w8 = dict(bits=8, group_size=None, symmetric=True, format="qdq")
    trt, ort = dict(target="tensorrt"), dict(target="ort-cpu")
    dyn = dict(ort, act_scales="dynamic")
    ours = [  # label, settings, method, alpha, w8a8 options, layers excluded (float)
        ("ours W8A8 no smoothing, tensorrt", "static per-tensor int8 activations", "rtn", 0.5, trt, ()),
        ("ours W8A8 no smoothing, ort-cpu", "static per-tensor uint8 activations", "rtn", 0.5, ort, ()),
        ("ours SmoothQuant a0.5, tensorrt", "static int8 activations", "smoothquant", 0.5, trt, ()),
        ("ours SmoothQuant a0.5, ort-cpu", "static uint8 activations", "smoothquant", 0.5, ort, ()),
        ("ours SmoothQuant auto, tensorrt", "static int8 activations", "smoothquant", "auto", trt, ()),
        ("ours SmoothQuant auto, ort-cpu", "static uint8 activations", "smoothquant", "auto", ort, ()),
        ("ours SmoothQuant a0.5, ort-cpu, percentile", "static uint8, --calib-range percentile 99.99",
         "smoothquant", 0.5, dict(ort, calib_range="percentile", percentile=99.99), ()),
        ("ours SmoothQuant a0.5, ort-cpu, 2 hard layers dynamic", "static uint8; --dynamic-layers "
         + " ".join(HARD), "smoothquant", 0.5, dict(ort, dynamic_layers=HARD), ()),
        ("ours SmoothQuant a0.5, ort-cpu, down_proj dynamic", f"static uint8; --dynamic-layers '{DOWN}'",
         "smoothquant", 0.5, dict(ort, dynamic_layers=(DOWN,)), ()),
        ("ours SmoothQuant auto, ort-cpu, down_proj dynamic", f"static uint8; --dynamic-layers '{DOWN}'",
         "smoothquant", "auto", dict(ort, dynamic_layers=(DOWN,)), ()),
        ("ours SmoothQuant a0.5, ort-cpu, down_proj float", f"static uint8; --exclude '{DOWN}'",
         "smoothquant", 0.5, ort, (DOWN,)),
        ("ours W8A8 no smoothing, dynamic", "--act-scales dynamic (int8 per row and block of 128)", "rtn", 0.5,
         dyn, ()),
        ("ours SmoothQuant a0.5, dynamic", "--act-scales dynamic", "smoothquant", 0.5, dyn, ()),
        ("ours SmoothQuant auto, dynamic", "--act-scales dynamic", "smoothquant", "auto", dyn, ()),
    ]
    for i, (label, settings, method, alpha, w8a8, exclude) in enumerate(ours):
        if args.no_auto and alpha == "auto":
            continue
        row = Row(label, "ptqonnx", f"{settings}; {args.calib} windows", q / f"ours_{i}.onnx")
        quantize_ours(row, fp32, method=method, weights=dict(w8, exclude=exclude), w8a8=w8a8,
                      smoothquant=dict(alpha=alpha), calib=calib)
        rows.append(row)

    windows = evaluate(rows, mdir, args.windows)
    for row in rows:  # a model ORT refuses at its default level: say so, and measure it at ORT_ENABLE_BASIC
        if row.note.startswith("eval failed"):
            row.settings += f"; refused at ORT_ENABLE_ALL ({row.note[len('eval failed: '):]}): perplexity at " \
                            "ORT_ENABLE_BASIC, no latency"
            row.note, row.ppl = "", perplexity(row.path, windows, opt_level="basic").ppl
    pre, threads = prefill_latency([r for r in rows if "ORT_ENABLE_BASIC" not in r.settings], args.rounds)
    lines = header("SmoothQuant W8A8 benchmark: SmolLM2-135M-Instruct", "smoothquant.py", threads, windows,
                   args.rounds, g128_note=False)
    fp = rows[0].ppl
    lines += [f"Calibration: windows of 512 tokens drawn at seeded offsets from `wikitext-2-calib/valid.txt` "
              f"({args.calib} for ours, {args.others_calib} for the other tools). Quantize time and peak RSS are "
              "each tool's own process, from loading the model to writing it. W8A8: int8 weights per output "
              "channel; the LM head (tied to the embedding) stays float in every row.",
              f"Target (issue 4): perplexity within 2 % of FP32, i.e. <= {fp * 1.02:.4f}." if fp else "", ""]
    lines += table(rows, pre)
    if args.layers:
        lines += [""] + layer_errors(fp32, dict(calib, samples=min(args.calib, 8)), 0.5, args.layers)
    print(write_section("smoothquant", lines).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
