"""Foundation benchmark: SmolLM2-135M, FP32 vs our RTN vs ONNX Runtime's own MatMulNBitsQuantizer.

One run, one machine, one exported model, the same 40 x 512-token windows of WikiText-2 test:
perplexity, quantize time, file size, prefill latency (interleaved, median of rounds, ratio to FP32 in the
same run) and per-token decode latency on the KV-cache export. Writes benchmarks/results.md.

    python benchmarks/foundation.py [--windows 40] [--rounds 5] [--work benchmarks/work]

RTN needs no calibration data: the calibration text is not read by this benchmark (GPTQ/AWQ/SmoothQuant
benchmarks draw their windows from ../shared/data/wikitext-2-calib/valid.txt).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
logger = logging.getLogger("benchmarks.foundation")


@dataclass
class Row:
    label: str
    tool: str
    settings: str
    path: Path
    quant_s: float | None = None
    ppl: float | None = None
    tokens: int = 0
    kv_path: Path | None = None
    note: str = ""


def _ours(src: Path, dst: Path, **weights) -> float:
    from ptqonnx.pipeline import compile_model
    from ptqonnx.recipe import CompileConfig, WeightQuantConfig

    t0 = time.perf_counter()
    compile_model(src, dst, CompileConfig(weights=WeightQuantConfig(**weights)))
    return time.perf_counter() - t0


def _ort_rtn(src: Path, dst: Path, *, bits: int, block_size: int, symmetric: bool) -> float:
    """ONNX Runtime's own blockwise RTN (DefaultWeightOnlyQuantConfig, its C++ MLAS quantizer)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    t0 = time.perf_counter()
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
    q.process()
    onnx.save(q.model.model, str(dst))
    return time.perf_counter() - t0


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="export and outputs (git-ignored)")
    ap.add_argument("--text", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)

    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.runtime.bench import decode_runner, interleaved, prefill_runner
    from ptqonnx.runtime.perplexity import perplexity
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    mdir = args.work / "smollm2"
    fp32, fp32_kv = mdir / "model.onnx", mdir / "model_kv.onnx"
    export_s = None
    if not (fp32.is_file() and fp32_kv.is_file()):
        t0 = time.perf_counter()
        export_causal_lm("smollm2", mdir, kv_cache=True)
        export_s = time.perf_counter() - t0
    q = args.work / "quantized"
    q.mkdir(parents=True, exist_ok=True)

    g128 = dict(bits=4, group_size=128)
    rows = [Row("FP32", "-", "float32 export", fp32, kv_path=fp32_kv)]
    plan = [
        # label, tool, settings text, builder kwargs
        ("ours RTN W4 g128 sym", "ptqonnx", "MatMulNBits, acc. level 0", dict(g128, symmetric=True)),
        ("ours RTN W4 g128 asym", "ptqonnx", "MatMulNBits, acc. level 0", dict(g128, symmetric=False)),
        ("ours RTN W4 g128 sym, acc4", "ptqonnx", "MatMulNBits, acc. level 4 (int8 activations)",
         dict(g128, symmetric=True, accuracy_level=4)),
        ("ours RTN W4 g128 sym + emb", "ptqonnx", "also GatherBlockQuantized embeddings (block 64: 576 % 128 != 0)",
         dict(g128, symmetric=True, quantize_embeddings=True)),
        ("ours RTN W4 g64 sym", "ptqonnx", "MatMulNBits", dict(bits=4, group_size=64, symmetric=True)),
        ("ours RTN W4 g64 asym", "ptqonnx", "MatMulNBits", dict(bits=4, group_size=64, symmetric=False)),
        ("ours RTN W4 g32 asym (Q4_1 grid!)", "ptqonnx", "the GGUF's own grid: no real loss expected",
         dict(bits=4, group_size=32, symmetric=False)),
        ("ours RTN W4 g128 sym, QDQ", "ptqonnx", "DequantizeLinear int4 + MatMul (ORT fuses to MatMulNBits, acc. 4)",
         dict(g128, symmetric=True, format="qdq")),
        ("ours RTN W8 per-channel sym", "ptqonnx", "MatMulNBits bits=8, one block per row",
         dict(bits=8, group_size=None, symmetric=True)),
    ]
    for i, (label, tool, settings, kw) in enumerate(plan):
        dst = q / f"ours_{i}.onnx"
        row = Row(label, tool, settings, dst)
        row.quant_s = _ours(fp32, dst, **kw)
        if i in (0, 2):  # decode latency needs the KV-cache export quantized the same way
            row.kv_path = q / f"ours_{i}_kv.onnx"
            _ours(fp32_kv, row.kv_path, **kw)
        rows.append(row)
    for sym in (True, False):
        dst = q / f"ort_rtn_g128_{'sym' if sym else 'asym'}.onnx"
        row = Row(f"ORT RTN W4 g128 {'sym' if sym else 'asym'}", "onnxruntime", "MatMulNBitsQuantizer, "
                  "DefaultWeightOnlyQuantConfig", dst)
        row.quant_s = _ort_rtn(fp32, dst, bits=4, block_size=128, symmetric=sym)
        rows.append(row)
    dst = q / "ort_rtn_w8_g128_sym.onnx"
    row = Row("ORT RTN W8 g128 sym", "onnxruntime", "DefaultWeightOnlyQuantConfig bits=8 (blockwise only)", dst)
    row.quant_s = _ort_rtn(fp32, dst, bits=8, block_size=128, symmetric=True)
    rows.append(row)

    tok = load_tokenizer(mdir)
    windows = eval_windows(tokenize(read_text(args.text), tok), 512, args.windows)
    for row in rows:
        try:
            res = perplexity(row.path, windows)
            row.ppl, row.tokens = res.ppl, res.tokens_evaluated
        except Exception as exc:  # record, don't hide: a tool's output that fails to run is a result
            row.note = f"eval failed: {str(exc).splitlines()[0]}"
        logger.info("%s: ppl %s", row.label, row.ppl)

    prefill_labels = ["FP32", "ours RTN W4 g128 sym", "ours RTN W4 g128 sym, acc4", "ORT RTN W4 g128 sym",
                      "ours RTN W4 g128 sym, QDQ", "ours RTN W8 per-channel sym"]
    by_label = {r.label: r for r in rows}
    runners, threads = {}, 0
    for label in prefill_labels:
        runners[label], threads = prefill_runner(by_label[label].path)
    pre = interleaved(runners, rounds=args.rounds)
    del runners
    dec_labels = [r.label for r in rows if r.kv_path is not None]
    druns = {label: decode_runner(by_label[label].kv_path, past_len=512, new_tokens=32)[0] for label in dec_labels}
    dec = interleaved(druns, rounds=args.rounds)
    del druns

    fp32_ppl = rows[0].ppl
    fp32_size = _size(fp32)
    lines = [
        "# Foundation benchmark: SmolLM2-135M-Instruct, RTN",
        "",
        f"Produced by `python benchmarks/foundation.py` on {datetime.date.today().isoformat()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, ORT threads {threads}).",
        f"Perplexity: first {len(windows)} non-overlapping windows x 512 tokens of WikiText-2 test "
        f"(`wiki.test.raw`, read byte for byte, tokenized once; {rows[0].tokens} predicted tokens).",
        "Latency: ORT CPU EP at its default optimization level; prefill = one 1x512 forward; decode = ms per "
        f"token for 32 tokens after a 512-token prefill (KV-cache export). Medians of {args.rounds} interleaved "
        "rounds; ratios are per-round ratios to FP32 (timings here swing +-20 % with load).",
        "",
        "SmolLM2's float weights come from a Q4_1 GGUF (4-bit asymmetric, groups of 32), so they already lie on a "
        "g32 asymmetric grid: the g32 asym row shows that grid's free advantage, not quantizer quality; "
        "the headline is g128 (and g64).",
        "",
        "| model | tool | settings | perplexity | delta vs FP32 | quantize s | size MiB | size vs FP32 |"
        " prefill ms | prefill vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r.ppl:.4f}" if r.ppl is not None else r.note
        delta = f"{r.ppl - fp32_ppl:+.4f}" if r.ppl is not None and fp32_ppl is not None else ""
        qs = f"{r.quant_s:.1f}" if r.quant_s is not None else ""
        size = _size(r.path)
        pm = f"{pre.medians[r.label]:.0f}" if r.label in pre.medians else ""
        pr = f"{pre.ratios[r.label]:.2f}x" if r.label in pre.ratios else ""
        lines.append(f"| {r.label} | {r.tool} | {r.settings} | {ppl} | {delta} | {qs} | {_mib(size)} | "
                     f"{size / fp32_size:.3f} | {pm} | {pr} |")
    lines += ["", "Per-token decode (KV cache, past 512):", "", "| model | ms / token | vs FP32 |", "|---|---|---|"]
    for label in dec_labels:
        lines.append(f"| {label} | {dec.medians[label]:.2f} | {dec.ratios[label]:.2f}x |")
    if export_s is not None:
        lines += ["", f"Export (GGUF -> float32 ONNX, both variants): {export_s:.0f} s."]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
