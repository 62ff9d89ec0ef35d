"""GPTQ benchmark: SmolLM2-135M W4 g128, ours (sequential GPTQ) vs RTN vs ONNX Runtime's and Intel's GPTQ.

One run, same export and the same 40 x 512 evaluation windows as the foundation benchmark; calibration
windows from ../shared/data/wikitext-2-calib/valid.txt (seeded offsets). Each quantizer runs in its own
process (time and peak RSS are its own). Writes benchmarks/results/gptq.md and rebuilds results.md.

    python benchmarks/gptq.py [--calib 128] [--others-calib 2] [--windows 40] [--rounds 5]

ONNX Runtime's GPTQ (`MatMulNBitsQuantizer` + `GPTQWeightOnlyQuantConfig`, its bundled copy of Intel's
ONNX weight-only GPTQ) re-runs the whole model for every weight, so it gets `--others-calib` windows (2 by
default: 128 would take hours). Intel's `onnx-neural-compressor` needs numpy < 2, so it runs from a venv of
its own (`--inc-python`; made on first use in benchmarks/work/venv-inc: onnx-neural-compressor 1.0 plus the
prettytable and scipy it imports without declaring); where it does not install or run, the table says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CALIB_TEXT, FEEDS, INC_PACKAGES, INC_READER, Row, arg_parser, ensure_venv, evaluate, header, prefill_latency,
    prepare, quantize_ours, record, run_child, save_calib_inputs, table, write_section,
)

ORT_GPTQ = FEEDS + """
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer
n, sym = int(args[2]), args[3] == "sym"
import pathlib
cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=feeds(pathlib.Path(args[0]).parent, n), percdamp=0.01,
                                block_size=128, actorder=args[4] == "act", perchannel=True)
q = MatMulNBitsQuantizer(args[0], block_size=128, is_symmetric=sym, algo_config=cfg)
q.process()
q.model.save_model_to_file(args[1], use_external_data_format=False)
"""

INC_GPTQ = INC_READER + """
from onnx_neural_compressor.quantization import algorithm_entry, config as inc_config
cfg = inc_config.GPTQConfig(weight_bits=4, weight_group_size=128, weight_sym=args[3] == "sym")
model = algorithm_entry.gptq_quantize_entry(args[0], cfg, Reader())
onnx.save(model, args[1])
"""


def main() -> int:
    ap = arg_parser(__doc__, calib=128, others_calib=2, venvs=("--inc-python",),
                    others_help=": ORT's GPTQ re-runs the model per weight")
    ap.add_argument("--w3", action="store_true",
                    help="the W3 table instead (ours only: the other tools' GPTQ is 4-bit only); section gptq_w3")
    args = ap.parse_args()
    mdir, q, _ = prepare(args, "gptq")
    fp32 = mdir / "model.onnx"
    g128 = dict(bits=4, group_size=128)
    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    rows = [Row("FP32", "-", "float32 export", fp32)]
    ours = [
        ("ours RTN W4 g128 sym", "no calibration", dict(weights=dict(g128, symmetric=True))),
        ("ours RTN W4 g128 asym", "no calibration", dict(weights=dict(g128, symmetric=False))),
        ("ours GPTQ W4 g128 sym", f"act-order (static groups), sequential, {args.calib} windows",
         dict(method="gptq", weights=dict(g128, symmetric=True), calib=calib)),
        ("ours GPTQ W4 g128 asym", f"act-order (static groups), sequential, {args.calib} windows",
         dict(method="gptq", weights=dict(g128, symmetric=False), calib=calib)),
        ("ours GPTQ W4 g128 sym, no act-order", f"sequential, {args.calib} windows",
         dict(method="gptq", weights=dict(g128, symmetric=True), calib=calib, gptq=dict(act_order=False))),
        ("ours RTN W4 g128 sym, LM head float", "--keep-lm-head (as ORT's tools leave SmolLM2's tied head)",
         dict(weights=dict(g128, symmetric=True, keep_lm_head=True))),
        ("ours GPTQ W4 g128 sym, LM head float", f"--keep-lm-head, act-order, sequential, {args.calib} windows",
         dict(method="gptq", weights=dict(g128, symmetric=True, keep_lm_head=True), calib=calib)),
    ]
    if args.w3:
        g3 = dict(bits=3, group_size=128)
        ours = [(f"ours {m.upper()} W3 g128 {'sym' if sym else 'asym'}",
                 "3-bit grid in 4-bit containers" + ("" if m == "rtn" else f"; act-order, sequential, {args.calib} windows"),
                 dict(weights=dict(g3, symmetric=sym), **({} if m == "rtn" else dict(method="gptq", calib=calib))))
                for m in ("rtn", "gptq") for sym in (True, False)]
        args.skip_others = True
    for i, (label, settings, spec) in enumerate(ours):
        row = Row(label, "ptqonnx", settings, q / f"ours{'_w3' if args.w3 else ''}_{i}.onnx")
        quantize_ours(row, fp32, **spec)
        rows.append(row)
    if not args.skip_others:
        for sym, order in (("sym", "noact"), ("asym", "noact")):
            row = Row(f"ORT GPTQ W4 g128 {sym}{', act-order' if order == 'act' else ''}", "onnxruntime",
                      f"GPTQWeightOnlyQuantConfig, {args.others_calib} windows (LM head stays float: not an "
                      "initializer)", q / f"ort_gptq_{sym}_{order}.onnx")
            record(row, run_child(ORT_GPTQ, str(fp32), str(row.path), str(args.others_calib), sym, order))
            rows.append(row)
        npz = q / "calib_inputs.npz"
        res = save_calib_inputs(mdir, npz, args.others_calib)
        for sym in ("sym", "asym"):
            row = Row(f"Intel onnx-neural-compressor GPTQ W4 g128 {sym}", "onnx-neural-compressor 1.0",
                      f"GPTQConfig, {args.others_calib} windows", q / f"inc_gptq_{sym}.onnx")
            why = ensure_venv(args.inc_python, INC_PACKAGES)
            if why:
                row.note = why
            elif "error" in res:
                row.note = res["error"]
            else:
                record(row, run_child(INC_GPTQ, str(fp32), str(row.path), str(npz), sym, python=args.inc_python))
            rows.append(row)

    windows = evaluate(rows, mdir, args.windows)
    lat_rows = [r for r in rows if r.label in {"FP32", "ours RTN W4 g128 sym", "ours GPTQ W4 g128 sym",
                                               "ORT GPTQ W4 g128 sym", "ours GPTQ W3 g128 sym"}]
    pre, threads = prefill_latency(lat_rows, args.rounds)
    title = "GPTQ benchmark: SmolLM2-135M-Instruct, " + ("W3 g128" if args.w3 else "W4 g128")
    lines = header(title, "gptq.py" + (" --w3" if args.w3 else ""), threads, windows, args.rounds)
    lines += [f"Calibration: windows of 512 tokens drawn at seeded offsets from `wikitext-2-calib/valid.txt` "
              f"({args.calib} for ours, {args.others_calib} for the other tools). Quantize time and peak RSS are "
              "each tool's own process, from loading the model to writing it.", ""]
    lines += table(rows, pre)
    print(write_section("gptq_w3" if args.w3 else "gptq", lines).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
