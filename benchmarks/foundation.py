"""Foundation benchmark: SmolLM2-135M, FP32 vs our RTN vs ONNX Runtime's own MatMulNBitsQuantizer RTN.

One run, one machine, one exported model, the same 40 x 512-token windows of WikiText-2 test: perplexity,
quantize time and peak RSS (each quantizer in its own process), file size, prefill latency (interleaved)
and per-token decode latency on the KV-cache export. Writes benchmarks/results/foundation.md (and
rebuilds benchmarks/results.md).

    python benchmarks/foundation.py [--windows 40] [--rounds 5] [--work benchmarks/work]

RTN needs no calibration data, so the calibration text is not read here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row, arg_parser, evaluate, header, prefill_latency, prepare, quantize_ours, record, run_child, table,
    write_section,
)

ORT_RTN = """
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
bits, block, sym = int(args[2]), int(args[3]), args[4] == "sym"
q = MatMulNBitsQuantizer(onnx.load(args[0]), algo_config=DefaultWeightOnlyQuantConfig(
    block_size=block, is_symmetric=sym, bits=bits))
q.process()
onnx.save(q.model.model, args[1])
"""


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    mdir, q, export_s = prepare(args, "foundation", kv_cache=True)
    from ptqonnx.runtime.bench import decode_runner, interleaved

    fp32 = mdir / "model.onnx"
    g128 = dict(bits=4, group_size=128)
    rows = [Row("FP32", "-", "float32 export", fp32, kv_path=mdir / "model_kv.onnx")]
    ours = [
        ("ours RTN W4 g128 sym", "MatMulNBits, acc. level 0", dict(g128, symmetric=True), True),
        ("ours RTN W4 g128 asym", "MatMulNBits, acc. level 0", dict(g128, symmetric=False), False),
        ("ours RTN W4 g128 sym, LM head float", "--keep-lm-head: what ORT's quantizer does to SmolLM2 "
         "(its tied head is Transpose(embedding), not an initializer)", dict(g128, symmetric=True, keep_lm_head=True),
         False),
        ("ours RTN W4 g128 asym, LM head float", "--keep-lm-head --asym",
         dict(g128, symmetric=False, keep_lm_head=True), False),
        ("ours RTN W4 g128 sym, acc4", "MatMulNBits, acc. level 4 (int8 activations in the kernel)",
         dict(g128, symmetric=True, accuracy_level=4), True),
        ("ours RTN W4 g128 sym + emb", "also GatherBlockQuantized embeddings (block 64: 576 % 128 != 0)",
         dict(g128, symmetric=True, quantize_embeddings=True), False),
        ("ours RTN W4 g64 sym", "MatMulNBits", dict(bits=4, group_size=64, symmetric=True), False),
        ("ours RTN W4 g64 asym", "MatMulNBits", dict(bits=4, group_size=64, symmetric=False), False),
        ("ours RTN W4 g32 asym (Q4_1 grid!)", "the GGUF's own group size: see the note above",
         dict(bits=4, group_size=32, symmetric=False), False),
        ("ours RTN W4 g128 sym, QDQ", "DequantizeLinear int4 + MatMul (ORT fuses it to MatMulNBits, acc. 4)",
         dict(g128, symmetric=True, format="qdq"), False),
        ("ours RTN W8 per-channel sym", "MatMulNBits bits=8, per-channel grid written as block 128",
         dict(bits=8, group_size=None, symmetric=True), False),
        ("ours RTN W8 per-channel sym, QDQ", "DequantizeLinear int8 per-axis + MatMul",
         dict(bits=8, group_size=None, symmetric=True, format="qdq"), False),
    ]
    for i, (label, settings, weights, kv) in enumerate(ours):
        row = Row(label, "ptqonnx", settings, q / f"ours_{i}.onnx")
        quantize_ours(row, fp32, weights=weights)
        if kv:  # decode latency needs the KV-cache export quantized the same way
            row.kv_path = q / f"ours_{i}_kv.onnx"
            quantize_ours(Row(label + " kv", "", "", row.kv_path), mdir / "model_kv.onnx", weights=weights)
        rows.append(row)
    for bits, sym in ((4, True), (4, False), (8, True)):
        tag = f"W{bits} g128 {'sym' if sym else 'asym'}"
        row = Row(f"ORT RTN {tag}", "onnxruntime", "MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig",
                  q / f"ort_rtn_w{bits}_{'sym' if sym else 'asym'}.onnx")
        record(row, run_child(ORT_RTN, str(fp32), str(row.path), str(bits), "128", "sym" if sym else "asym"))
        rows.append(row)

    windows = evaluate(rows, mdir, args.windows)
    lat_rows = [r for r in rows if r.label in {
        "FP32", "ours RTN W4 g128 sym", "ours RTN W4 g128 sym, acc4", "ORT RTN W4 g128 sym",
        "ours RTN W4 g128 sym, QDQ", "ours RTN W8 per-channel sym", "ours RTN W8 per-channel sym, QDQ",
        "ORT RTN W8 g128 sym"}]
    pre, threads = prefill_latency(lat_rows, args.rounds)
    dec_rows = [r for r in rows if r.kv_path is not None]
    dec = interleaved({r.label: decode_runner(r.kv_path, past_len=512, new_tokens=32)[0] for r in dec_rows},
                      rounds=args.rounds)

    lines = header("Foundation benchmark: SmolLM2-135M-Instruct, RTN", "foundation.py", threads, windows, args.rounds)
    lines += table(rows, pre)
    lines += ["", "Per-token decode (KV-cache export, 32 new tokens after a 512-token prefill; interleaved):", "",
              "| model | ms / token | vs FP32 |", "|---|---|---|"]
    lines += [f"| {r.label} | {dec.medians[r.label]:.2f} | {dec.ratios[r.label]:.2f}x |" for r in dec_rows]
    if export_s is not None:
        lines += ["", f"Export (GGUF -> float32 ONNX, both variants): {export_s:.0f} s."]
    print(write_section("foundation", lines).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
