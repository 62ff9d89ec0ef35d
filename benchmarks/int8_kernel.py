"""Static W8A8 on ONNX Runtime's CPU kernels: perplexity and prefill with ORT's default int8 GEMM and with its
exact one (session option session.x64quantprecision=1), same files, same windows.

On x86 CPUs without VNNI (AVX2), ORT's u8s8 GEMM adds pairs of u8*s8 products in int16 and saturates; the
QDQ MatMuls of a static W8A8 model run in it at ORT's default optimization level (fused to
MatMulIntegerToFloat / QLinearMatMul). This measures how much of static W8A8's perplexity loss on such a
machine is that kernel, not quantization. Rows are ours only (the files are the ones `smoothquant.py`
measures).

    python benchmarks/int8_kernel.py [--work benchmarks/work] [--windows 40] [--rounds 5] [--calib 32] [--reuse]

The exact column runs ORT's exact int8 kernel (session.x64quantprecision=1); where ORT 1.32 fails on a graph
with it (int8 activations: the TensorRT form), the same graph with ORT's QDQ fusions off
(session.disable_quant_qdq=1: float MatMuls on the dequantized values), marked so in the table.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, Row, arg_parser, evaluate, header, logger, our_row, prepare, write_section


def _cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ", ".join(have) or "none of avx2/avx512/vnni/amx"


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True).parse_args()
    mdir, q, _ = prepare(args, "int8_kernel")
    from ptqonnx.runtime.bench import interleaved, prefill_runner
    from ptqonnx.runtime.perplexity import perplexity
    from ptqonnx.runtime.ort import PRECISE_INT8, UNFUSED_INT8

    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    w8 = dict(bits=8, group_size=None, symmetric=True, format="qdq")
    trt, ort = dict(target="tensorrt"), dict(target="ort-cpu")
    ours = [  # label, method, alpha, w8a8 options, rotate
        ("W8A8 no smoothing, tensorrt", "rtn", 0.5, trt, False),
        ("W8A8 no smoothing, ort-cpu", "rtn", 0.5, ort, False),
        ("SmoothQuant a0.5, tensorrt", "smoothquant", 0.5, trt, False),
        ("SmoothQuant a0.5, ort-cpu", "smoothquant", 0.5, ort, False),
        ("SmoothQuant a0.5, ort-cpu, --min-levels 16", "smoothquant", 0.5, dict(ort, min_levels=16), False),
        ("W8A8 --rotate (R1+R2+R4), tensorrt", "rtn", 0.5, trt, True),
        ("W8A8 --rotate --min-levels 16, tensorrt", "rtn", 0.5, dict(trt, min_levels=16), True),
    ]
    fp32 = Row("FP32", "-", "float32 export", mdir / "model.onnx")
    rows = [fp32]
    for i, (label, method, alpha, w8a8, rotate) in enumerate(ours):
        rows.append(our_row(args, label, f"{args.calib} windows", q / f"w8a8_{i}.onnx", fp32.path, method=method,
                            weights=w8, w8a8=w8a8, smoothquant=dict(alpha=alpha), calib=calib, rotate=rotate))
    windows = evaluate(rows, mdir, args.windows)  # ORT's default kernel
    precise, exact_cfg = {}, {}
    for row in rows[1:]:
        if row.ppl is not None:
            try:
                precise[row.label], exact_cfg[row.label] = perplexity(row.path, windows, config=PRECISE_INT8).ppl, \
                    PRECISE_INT8
            except Exception as exc:  # noqa: BLE001 - ORT 1.32's exact kernel path fails on int8 activations
                logger.info("%s: ORT fails with %s (%s); QDQ fusions off instead", row.label, PRECISE_INT8,
                            str(exc).splitlines()[0][:120])
                precise[row.label], exact_cfg[row.label] = perplexity(row.path, windows, config=UNFUSED_INT8).ppl, \
                    UNFUSED_INT8
            logger.info("%s: ppl %.4f default kernel, %.4f exact", row.label, row.ppl, precise[row.label])
    runners = {}
    for row in rows:
        if row.ppl is not None:
            runners[row.label], threads = prefill_runner(row.path)
            if row is not fp32:
                runners[row.label + " [exact]"], _ = prefill_runner(row.path, config=exact_cfg[row.label])
    lat = interleaved(runners, rounds=args.rounds)

    fp = fp32.ppl
    lines = header("Static W8A8 on ORT CPU: default vs exact int8 kernel, SmolLM2-135M-Instruct", "int8_kernel.py",
                   threads, windows, args.rounds, g128_note=False)
    lines += [f"CPU flags: {_cpu_flags()} ({platform.machine()}). Same files in both columns; the exact kernel is ORT's "
              "session option `session.x64quantprecision=1` (where ORT fails on the graph with it, the QDQ fusions "
              "off: `session.disable_quant_qdq=1`). INT8 weights per output channel (positive scales for "
              "tensorrt), static per-tensor "
              f"activations from {args.calib} calibration windows; the LM head stays float.", "",
              f"FP32 perplexity {fp:.4f}; prefill {lat.medians['FP32']:.0f} ms.", "",
              "| model | perplexity, default kernel | perplexity, exact kernel | delta vs FP32 default / exact | "
              "prefill vs FP32 default / exact |", "|---|---|---|---|---|"]
    for row in rows[1:]:
        if row.ppl is None:
            lines.append(f"| {row.label} | {row.note or 'not run'} | | | |")
            continue
        p = precise[row.label]
        mark = "" if exact_cfg[row.label] is PRECISE_INT8 else " (fusions off)"
        lines.append(f"| {row.label} | {row.ppl:.4f} | {p:.4f}{mark} | {row.ppl - fp:+.4f} / {p - fp:+.4f} | "
                     f"{lat.ratios[row.label]:.2f}x / {lat.ratios[row.label + ' [exact]']:.2f}x |")
    print("\n".join(lines))
    write_section("int8_kernel", lines)


if __name__ == "__main__":
    main()
