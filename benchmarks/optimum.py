"""Models as users bring them: SmolLM2-135M exported by optimum (`optimum-cli export onnx --task
text-generation-with-past`: input_ids, attention_mask, position_ids and 60 past_key_values.* in, logits and
present.* out) compiled with each method, next to the same method on our own export (`ptqonnx export`).

    python benchmarks/optimum.py [--work benchmarks/work] [--windows 40] [--rounds 3] [--calib 32] [--reuse]
                                 [--optimum-python PY]

optimum-onnx pins transformers 4.57, so its exporter runs in its own venv (made under --work if missing:
torch 2.13 CPU, optimum-onnx, onnxruntime). It reads a Hugging Face folder: the script saves the GGUF's
dequantized float weights as one (the weights our export is made from). Calibration of the optimum graph
runs through its empty-cache prefill; perplexity is the prefill of each window (an empty cache), prefill
latency the same. The question (issue: a KV-cache export that users have scores as well as our own export).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, arg_parser, method_specs, paired_rows, prepare, run_exporter, smollm2_hf, \
    write_paired

OPTIMUM_PACKAGES = ("torch==2.13.0", "optimum-onnx", "onnxruntime")


def optimum_export(args, work: Path) -> tuple[Path | None, str]:
    """SmolLM2 through optimum's exporter into work/optimum_smollm2 (made once): (model path, why not)."""
    out = work / "optimum_smollm2"
    if (out / "model.onnx").is_file():
        return out / "model.onnx", ""
    hf = smollm2_hf(work)
    cli = args.optimum_python.parent / "optimum-cli"
    why = run_exporter(args.optimum_python, OPTIMUM_PACKAGES, [
        str(cli), "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past", str(out)],
        out / "model.onnx", "optimum-cli")
    if why:
        return None, why
    (out / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())  # ours: transformers 4.57 skips it
    theta, want = (json.loads((d / "config.json").read_text()).get("rope_theta") for d in (out, hf))
    if theta != want:
        return None, f"optimum exported rope_theta {theta}, the model's is {want}"
    return out / "model.onnx", ""


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True, venvs=("--optimum-python",)).parse_args()
    mdir, q, _ = prepare(args, "optimum")
    opt, why = optimum_export(args, args.work)

    ours_f = Row("FP32", "ptqonnx export", "model.onnx, logits only", mdir / "model.onnx")
    opt_f = Row("FP32, optimum", "optimum-cli", "with past, 63 inputs", opt or q / "missing.onnx", note=why)
    rows, pairs = paired_rows(args, method_specs(args.calib), q, (ours_f, ", ours", "ours"),
                              (opt_f, ", optimum", "optimum"), why)
    write_paired(rows, pairs, mdir, args, "Models as users bring them: SmolLM2-135M-Instruct exported by optimum "
                 "(with past), each method vs our own export", "optimum.py",
                 "Both exports come from the same float weights (the GGUF dequantized; optimum reads them saved as a "
                 "Hugging Face folder). optimum's graph is evaluated through its prefill (an empty cache) and keeps "
                 "its 63 inputs and 61 outputs after compiling. Each method runs with the same settings on both.",
                 ", ours", "| model | settings | perplexity, ours | perplexity, optimum's | optimum vs ours | size MiB "
                 "ours / optimum's | prefill vs FP32, ours / optimum's |", "optimum")

if __name__ == "__main__":
    main()
