"""Models as users bring them: SmolLM2-135M built by onnxruntime-genai's model builder (`python -m
onnxruntime_genai.models.builder -p fp32 -e cpu`: GroupQueryAttention with rotary embedding inside,
SkipSimplifiedLayerNormalization, external data; input_ids, attention_mask and 60 past_key_values.* in)
compiled with each method, next to the same method on our own export (`ptqonnx export`).

    python benchmarks/genai.py [--work benchmarks/work] [--windows 40] [--rounds 3] [--calib 32] [--reuse]
                               [--genai-python PY]

The builder runs in its own venv (made under --work if missing: torch 2.13 CPU, onnxruntime-genai,
transformers 5). It reads the Hugging Face folder `common.smollm2_hf` saves from the GGUF's dequantized float
weights (the weights our export is made from). Calibration and perplexity run through the graph's prefill with
an empty cache. The question (issue: an export users have scores as well as our own).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, arg_parser, method_specs, paired_rows, prepare, run_exporter, smollm2_hf, \
    write_paired

GENAI_PACKAGES = ("torch==2.13.0", "onnxruntime-genai", "onnx_ir", "transformers", "onnx")


def genai_export(args, work: Path) -> tuple[Path | None, str]:
    """SmolLM2 through the builder into work/genai_smollm2 (made once): (model path, why not)."""
    out = work / "genai_smollm2"
    if not (out / "model.onnx").is_file():
        why = run_exporter(args.genai_python, GENAI_PACKAGES, [
            str(args.genai_python), "-m", "onnxruntime_genai.models.builder", "-i", str(smollm2_hf(work)), "-o",
            str(out), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai_cache")], out / "model.onnx", "the builder")
        if why:
            return None, why
    return out / "model.onnx", ""


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True, venvs=("--genai-python",)).parse_args()
    mdir, q, _ = prepare(args, "genai")
    built, why = genai_export(args, args.work)

    ours_f = Row("FP32", "ptqonnx export", "model.onnx, logits only", mdir / "model.onnx")
    gen_f = Row("FP32, genai", "genai builder", "fp32 cpu, GQA, with past", built or q / "missing.onnx", note=why)
    rows, pairs = paired_rows(args, method_specs(args.calib, rotate=False, w8a8_target="ort-cpu"), q,
                              (ours_f, ", ours", "ours"), (gen_f, ", genai", "genai"), why)
    write_paired(rows, pairs, mdir, args, "Models as users bring them: SmolLM2-135M-Instruct built by "
                 "onnxruntime-genai's model builder, each method vs our own export", "genai.py",
                 "Both come from the same float weights (the GGUF dequantized; the builder reads them saved as a "
                 "Hugging Face folder). The builder's graph is evaluated through its prefill (an empty cache) and "
                 "keeps its inputs and outputs after compiling. Each method runs with the same settings on both.",
                 ", ours", "| model | settings | perplexity, ours | perplexity, genai's | genai vs ours | size MiB "
                 "ours / genai's | prefill vs FP32, ours / genai's |", "genai")

if __name__ == "__main__":
    main()
