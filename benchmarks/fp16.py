"""fp16 models in: SmolLM2-135M exported in float16 (`ptqonnx export smollm2 --dtype float16`) compiled with each
method, next to the same method on the float32 export; perplexity, size and prefill on ORT CPU.

    python benchmarks/fp16.py [--work benchmarks/work] [--windows 40] [--rounds 3] [--calib 32] [--reuse]

The fp16 outputs keep fp16 activations and scales (the consumer's dtype); the question is whether anything is
lost by quantizing the fp16 model instead of the fp32 one (issue: perplexity within 1 % of the fp32 output's).
Prefill on the CPU EP is a side note: x86 CPUs have no fp16 GEMM in ORT, fp16 graphs are for GPUs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, arg_parser, ensure_export, method_specs, paired_rows, prepare, write_paired


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True).parse_args()
    mdir, q, _ = prepare(args, "fp16")
    m16, _ = ensure_export(args.work, kv_cache=False, dtype="float16")

    fp32 = Row("FP32", "-", "float32 export", mdir / "model.onnx")
    fp16 = Row("FP16", "-", "float16 export", m16 / "model.onnx")
    rows, pairs = paired_rows(args, method_specs(args.calib), q, (fp32, ", fp32 in", "fp32"),
                              (fp16, ", fp16 in", "fp16"))
    write_paired(rows, pairs, mdir, args, "fp16 models in: SmolLM2-135M-Instruct exported in float16, each method vs "
                 "the float32 export", "fp16.py",
                 "Both exports come from the same weights (`ptqonnx export smollm2 [--dtype float16]`); the fp16 "
                 "graph keeps transformers' float32 RMSNorm and softmax inside. Each method runs with the same "
                 "settings on both; the fp16 outputs keep fp16 activations, scales and logits. ORT CPU has no fp16 "
                 "GEMM on x86, so the fp16 prefill column says nothing about a GPU.",
                 ", fp32 in", "| model | settings | perplexity, fp32 in | perplexity, fp16 in | fp16 vs fp32 | size "
                 "MiB fp32 / fp16 | prefill vs FP32, fp32 / fp16 in |", "fp16")

if __name__ == "__main__":
    main()
