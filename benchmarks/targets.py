"""Which runtime, which command: SmolLM2-135M compiled for each `--target`, checked by that target's rules
(`ptqonnx check`) and, for TensorRT, by TensorRT-RTX's own parser; perplexity and ORT CPU prefill.

    python benchmarks/targets.py [--work benchmarks/work] [--windows 40] [--rounds 3] [--calib 32] [--reuse]

W8A8 in the TensorRT form as INT8 and as FP8 E4M3 (`--w8a8-type fp8`, Hopper/Ada), both static per tensor,
with and without SmoothQuant and rotation: FP8's floating grid keeps small activations' relative precision
under a per-tensor scale that an outlier sets, which is INT8's weakness there.
Also the W4A8 row of the rotations issue: GPTQ W4 g128 on the rotated model, lowered to MatMulNBits with
accuracy_level 4 (ORT CPU quantizes the activations to int8 per row and block inside the kernel) next to the
same weights at accuracy_level 0 (float activations).
SmolLM2's hidden size 576 is not a multiple of 128, so the TensorRT rows use blocks of 64 (TensorRT reads the
block from the shapes; `--target tensorrt` refuses g128 here with that reason).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, Row, arg_parser, evaluate_and_time, our_row, prepare, size, write_section


def _check(path: Path, target: str) -> str:
    from ptqonnx.check import check_model, errors
    from ptqonnx.io import load_model

    findings = check_model(load_model(path), target)
    text = f"{len(errors(findings))} errors, {len(findings) - len(errors(findings))} warnings"
    if target == "tensorrt":
        from ptqonnx.runtime.tensorrt import parse_onnx, tensorrt_available

        if tensorrt_available():
            parsed = parse_onnx(path)
            text += "; TensorRT-RTX parses it" if parsed.ok else f"; TensorRT-RTX: {parsed.errors[0][:120]}"
        else:
            text += "; TensorRT-RTX not installed"
    return text


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True).parse_args()
    mdir, q, _ = prepare(args, "targets")
    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    g = lambda size, **kw: dict(bits=4, group_size=size, symmetric=True, **kw)  # noqa: E731
    gptq = f"act-order, sequential, {args.calib} windows"
    ours = [  # label, target (for the checker), settings, spec
        ("RTN W4 g128, ort-cpu", "ort-cpu", "MatMulNBits, signed grid", dict(weights=g(128, target="ort-cpu"))),
        ("RTN W4 g64, ort-cpu", "ort-cpu", "MatMulNBits, signed grid", dict(weights=g(64, target="ort-cpu"))),
        ("RTN W4 g64, tensorrt", "tensorrt", "INT4 DQ, positive grid", dict(weights=g(64, target="tensorrt"))),
        ("GPTQ W4 g64, ort-cpu", "ort-cpu", gptq, dict(method="gptq", weights=g(64, target="ort-cpu"), calib=calib)),
        ("GPTQ W4 g64, tensorrt", "tensorrt", gptq + ", positive grid",
         dict(method="gptq", weights=g(64, target="tensorrt"), calib=calib)),
        ("GPTQ W4 g128 --rotate, ort-cpu (W4A16)", "ort-cpu", gptq + ", R1+R2+R4, accuracy_level 0",
         dict(method="gptq", weights=g(128, accuracy_level=0, target="ort-cpu"), calib=calib, rotate=True)),
        ("GPTQ W4 g128 --rotate, ort-cpu, W4A8", "ort-cpu", gptq + ", R1+R2+R4, accuracy_level 4",
         dict(method="gptq", weights=g(128, accuracy_level=4, target="ort-cpu"), calib=calib, rotate=True)),
    ]
    w8 = dict(bits=8, group_size=None, symmetric=True)
    sq = dict(method="smoothquant", smoothquant=dict(alpha=0.5))
    static = f"static per-tensor activations, {args.calib} windows"
    for qtype in ("int8", "fp8"):
        name = qtype.upper() if qtype == "int8" else "FP8 E4M3"
        tt = dict(target="tensorrt", qtype=qtype)
        ours += [
            (f"W8A8 {name}, tensorrt", "tensorrt", f"no smoothing, {static}", dict(weights=w8, w8a8=tt, calib=calib)),
            (f"SmoothQuant W8A8 {name}, tensorrt", "tensorrt", f"alpha 0.5, {static}",
             dict(weights=w8, w8a8=tt, calib=calib, **sq)),
            (f"W8A8 {name} --rotate, tensorrt", "tensorrt", f"R1+R2+R4, no smoothing, {static}",
             dict(weights=w8, w8a8=tt, calib=calib, rotate=True)),
        ]
    fp32 = Row("FP32", "-", "float32 export", mdir / "model.onnx")
    rows, targets = [fp32], {}
    for i, (label, target, settings, spec) in enumerate(ours):
        rows.append(our_row(args, label, settings, q / f"t{i}.onnx", fp32.path, **spec))
        targets[label] = target
    _, lat, lines = evaluate_and_time(
        rows, mdir, args, "Targets: SmolLM2-135M-Instruct for ORT CPU and TensorRT, checked by each target's rules",
        "targets.py")
    lines += ["Every output is written by `ptqonnx compile ... --target T`, which runs T's rules before writing; the "
              "check column re-runs them (`ptqonnx check --target T`) and, for TensorRT, TensorRT-RTX's parser on "
              "the CPU. Prefill is ORT CPU for every row (the TensorRT form's DequantizeLinear + MatMul is not what "
              "ORT CPU runs fast; FP8 runs there as DequantizeLinear + float MatMul). The LM head is quantized in "
              "every weight-only row and stays float in the W8A8 rows.", "",
              "| model | settings | perplexity | delta vs FP32 | size MiB | prefill vs FP32 | target check |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r.ppl:.4f}" if r.ppl is not None else (r.note or "not run")
        delta = f"{r.ppl - fp32.ppl:+.4f}" if r.ppl is not None else ""
        sz = f"{size(r.path) / 2**20:.1f}" if r.path.is_file() and not r.note else ""
        pr = f"{lat.ratios[r.label]:.2f}x" if r.label in lat.ratios else ""
        chk = _check(r.path, targets[r.label]) if r.label in targets and r.path.is_file() and not r.note else ""
        lines.append(f"| {r.label} | {r.settings} | {ppl} | {delta} | {sz} | {pr} | {chk} |")
    print("\n".join(lines))
    write_section("targets", lines)


if __name__ == "__main__":
    main()
