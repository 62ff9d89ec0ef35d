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
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, Row, arg_parser, ensure_venv, evaluate_and_time, our_row, paired_table, \
    prepare, write_section

OPTIMUM_PACKAGES = ("torch==2.13.0", "optimum-onnx", "onnxruntime")


def optimum_export(args, work: Path) -> tuple[Path | None, str]:
    """SmolLM2 through optimum's exporter into work/optimum_smollm2 (made once): (model path, why not)."""
    out = work / "optimum_smollm2"
    if (out / "model.onnx").is_file():
        return out / "model.onnx", ""
    why = ensure_venv(args.optimum_python, OPTIMUM_PACKAGES)
    if why:
        return None, why
    hf = work / "smollm2_hf"
    if not (hf / "config.json").is_file():
        from ptqonnx.models.smollm2 import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm("smollm2")
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        config = json.loads((hf / "config.json").read_text())
        # transformers 5 writes rope_parameters only; 4.57 (optimum's) ignores it and takes rope_theta 1e4 (the
        # model's is 1e5), exporting another model: write the 4.x keys too
        config.update(rope_theta=config["rope_parameters"]["rope_theta"], rope_scaling=None)
        (hf / "config.json").write_text(json.dumps(config, indent=2))
    cli = args.optimum_python.parent / "optimum-cli"
    proc = subprocess.run([str(cli), "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past",
                           str(out)], capture_output=True, text=True)
    if proc.returncode or not (out / "model.onnx").is_file():
        return None, f"optimum-cli failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    (out / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())  # ours: transformers 4.57 skips it
    theta, want = (json.loads((d / "config.json").read_text()).get("rope_theta") for d in (out, hf))
    if theta != want:
        return None, f"optimum exported rope_theta {theta}, the model's is {want}"
    return out / "model.onnx", ""


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True, venvs=("--optimum-python",)).parse_args()
    mdir, q, _ = prepare(args, "optimum")
    opt, why = optimum_export(args, args.work)

    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    g128 = dict(bits=4, group_size=128, symmetric=True)
    w8 = dict(bits=8, group_size=None, symmetric=True, format="qdq")
    methods = [  # label, settings, spec
        ("RTN W4 g128 sym", "no calibration", dict(weights=g128)),
        ("GPTQ W4 g128 sym", f"act-order, sequential, {args.calib} windows",
         dict(method="gptq", weights=g128, calib=calib)),
        ("AWQ W4 g128 sym", f"scales + clip, sequential, {args.calib} windows",
         dict(method="awq", weights=g128, calib=calib)),
        ("RTN W4 g128 sym --rotate", "R1+R2+R4, no calibration", dict(weights=g128, rotate=True)),
        ("SmoothQuant W8A8 tensorrt", f"alpha 0.5, static per-tensor, {args.calib} windows",
         dict(method="smoothquant", weights=w8, w8a8=dict(target="tensorrt"), smoothquant=dict(alpha=0.5),
              calib=calib)),
    ]
    ours_f = Row("FP32", "ptqonnx export", "model.onnx, logits only", mdir / "model.onnx")
    opt_f = Row("FP32, optimum", "optimum-cli", "with past, 63 inputs", opt or q / "missing.onnx", note=why)
    rows, pairs = [ours_f, opt_f], [(ours_f, opt_f)]
    for i, (label, settings, spec) in enumerate(methods):
        a = our_row(args, f"{label}, ours", settings, q / f"ours_{i}.onnx", ours_f.path, **spec)
        b = our_row(args, f"{label}, optimum", settings, q / f"optimum_{i}.onnx", opt_f.path, **spec) \
            if opt else Row(f"{label}, optimum", "ptqonnx", settings, q / "missing.onnx", note=why)
        rows += [a, b]
        pairs.append((a, b))
    _, lat, lines = evaluate_and_time(
        rows, mdir, args, "Models as users bring them: SmolLM2-135M-Instruct exported by optimum (with past), each "
        "method vs our own export", "optimum.py")
    lines += ["Both exports come from the same float weights (the GGUF dequantized; optimum reads them saved as a "
              "Hugging Face folder). optimum's graph is evaluated through its prefill (an empty cache) and keeps "
              "its 63 inputs and 61 outputs after compiling. Each method runs with the same settings on both.", ""]
    lines += paired_table(pairs, lat, ours_f, ", ours", "| model | settings | perplexity, ours | perplexity, "
                          "optimum's | optimum vs ours | size MiB ours / optimum's | prefill vs FP32, ours / "
                          "optimum's |")
    print("\n".join(lines))
    write_section("optimum", lines)


if __name__ == "__main__":
    main()
