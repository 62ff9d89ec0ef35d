"""AWQ benchmark: SmolLM2-135M W4 g128, ours (AWQ, AWQ+GPTQ) vs RTN vs Intel's and NVIDIA ModelOpt's AWQ.

One run, same export and the same 40 x 512 evaluation windows as the foundation benchmark; calibration
windows from ../shared/data/wikitext-2-calib/valid.txt (seeded offsets). Each quantizer runs in its own
process (time and peak RSS are its own). Writes benchmarks/results/awq.md and rebuilds results.md.

    python benchmarks/awq.py [--calib 64] [--others-calib 2] [--windows 40] [--rounds 5]

Ours get 64 windows by default (the GPTQ benchmark uses 128; AWQ's statistics are streamed, so memory
allows 128, but nine calibrated rows of ours plus the other tools must fit one run on a shared 2-core CPU).
The other tools re-run the whole model for every activation (Intel) or every weight (ModelOpt) over their
calibration set, so they get `--others-calib` windows; Intel's runs symmetric only (its asymmetric
weight-only output did not load in ORT in the GPTQ benchmark, and each of its runs costs minutes here). Intel's `onnx-neural-compressor` needs numpy < 2 and
runs from its own venv (benchmarks/work/venv-inc, shared with the GPTQ benchmark); NVIDIA's
`nvidia-modelopt[onnx]` (its ONNX `int4.quantize`, `awq_clip`: per-block clip search and RTN, no scale
search) pulls its own onnxruntime build and runs from benchmarks/work/venv-modelopt with the CPU execution
provider for calibration (no CUDA here: its cupy path falls back to numpy). Both are made on first use; where
a tool does not install or run, the table says why.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CALIB_TEXT, INC_PACKAGES, INC_READER, Row, arg_parser, ensure_venv, evaluate, header, prefill_latency, prepare,
    quantize_ours, record, run_child, save_calib_inputs, table, write_section,
)

INC_AWQ = INC_READER + """
from onnx_neural_compressor.quantization import algorithm_entry, config as inc_config
cfg = inc_config.AWQConfig(weight_bits=4, weight_group_size=128, weight_sym=args[3] == "sym")
model = algorithm_entry.awq_quantize_entry(args[0], cfg, Reader())
onnx.save(model, args[1])
"""

MODELOPT_PACKAGES = ("nvidia-modelopt[onnx]",)
MODELOPT = """
import numpy as np, onnx
from modelopt.onnx.quantization.int4 import quantize
feeds = [{"input_ids": f} for f in np.load(args[2])["input_ids"]]
model = quantize(args[0], calibration_method=args[3], calibration_data_reader=feeds, calibration_eps=["cpu"],
                 block_size=128, use_external_data_format=False)
onnx.save(model, args[1])
"""


def main() -> int:
    ap = arg_parser(__doc__, calib=64, others_calib=2, venvs=("--inc-python", "--modelopt-python"))
    args = ap.parse_args()
    mdir, q, _ = prepare(args, "awq")
    fp32 = mdir / "model.onnx"
    g128 = dict(bits=4, group_size=128)
    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    seq = f"sequential, {args.calib} windows"
    rows = [Row("FP32", "-", "float32 export", fp32)]
    ours = [(f"ours RTN W4 g128 {sym}", "no calibration", dict(weights=dict(g128, symmetric=sym == "sym")))
            for sym in ("sym", "asym")]
    ours += [(f"ours {name} W4 g128 {sym}", f"{settings}, {seq}",
              dict(method=method, weights=dict(g128, symmetric=sym == "sym"), calib=calib))
             for method, name, settings in (("awq", "AWQ", "scales (20-point alpha grid) + clip search, RTN"),
                                            ("awq+gptq", "AWQ+GPTQ", "AWQ scales + clip, then GPTQ act-order"))
             for sym in ("sym", "asym")]
    keep = "--keep-lm-head (as the other tools leave SmolLM2's tied head)"
    ours += [("ours RTN W4 g128 sym, LM head float", keep, dict(weights=dict(g128, symmetric=True, keep_lm_head=True))),
             ("ours AWQ W4 g128 sym, LM head float", f"{keep}, {seq}",
              dict(method="awq", weights=dict(g128, symmetric=True, keep_lm_head=True), calib=calib)),
             ("ours AWQ+GPTQ W4 g128 sym, LM head float", f"{keep}, {seq}",
              dict(method="awq+gptq", weights=dict(g128, symmetric=True, keep_lm_head=True), calib=calib))]
    for i, (label, settings, spec) in enumerate(ours):
        row = Row(label, "ptqonnx", settings, q / f"ours_{i}.onnx")
        quantize_ours(row, fp32, **spec)
        rows.append(row)
    if not args.skip_others:
        npz = q / "calib_inputs.npz"
        res = save_calib_inputs(mdir, npz, args.others_calib)
        row = Row("Intel onnx-neural-compressor AWQ W4 g128 sym", "onnx-neural-compressor 1.0",
                  f"AWQConfig (scales + clip search), {args.others_calib} windows", q / "inc_awq_sym.onnx")
        why = ensure_venv(args.inc_python, INC_PACKAGES) or res.get("error", "")
        if why:
            row.note = why
        else:
            record(row, run_child(INC_AWQ, str(fp32), str(row.path), str(npz), "sym", python=args.inc_python))
        rows.append(row)
        row = Row("NVIDIA ModelOpt int4 awq_clip g128", "nvidia-modelopt", f"int4.quantize(calibration_method="
                  f"'awq_clip', calibration_eps=['cpu']), DQ+MatMul, {args.others_calib} windows",
                  q / "modelopt_awq_clip.onnx")
        why = ensure_venv(args.modelopt_python, MODELOPT_PACKAGES) or res.get("error", "")
        if why:
            row.note = why
        else:
            record(row, run_child(MODELOPT, str(fp32), str(row.path), str(npz), "awq_clip",
                                  python=args.modelopt_python))
        rows.append(row)

    windows = evaluate(rows, mdir, args.windows)
    lat_rows = [r for r in rows if r.label in {"FP32", "ours RTN W4 g128 sym", "ours AWQ W4 g128 sym",
                                               "Intel onnx-neural-compressor AWQ W4 g128 sym",
                                               "NVIDIA ModelOpt int4 awq_clip g128"}]
    pre, threads = prefill_latency(lat_rows, args.rounds)
    lines = header("AWQ benchmark: SmolLM2-135M-Instruct, W4 g128",
                   f"awq.py --calib {args.calib} --others-calib {args.others_calib}", threads, windows, args.rounds)
    lines += [f"Calibration: windows of 512 tokens drawn at seeded offsets from `wikitext-2-calib/valid.txt` "
              f"({args.calib} for ours, {args.others_calib} for the other tools). Quantize time and peak RSS are "
              "each tool's own process, from loading the model to writing it. Ours: statistics (XᵀX and mean |x| "
              "per scaling group) streamed block by block on the partly quantized model; LM head clipped, not "
              "scaled (as llm-awq).", ""]
    lines += table(rows, pre)
    print(write_section("awq", lines).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
