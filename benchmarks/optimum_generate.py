"""The optimum round trip on the real model: SmolLM2-135M-Instruct's KV-cache export (`ptqonnx export`:
model_kv.onnx) compiled into a folder of its own, loaded by `optimum.onnxruntime.ORTModelForCausalLM` and
its tokenizer by `transformers.AutoTokenizer`, generating greedily through optimum's cache handling.

    python benchmarks/optimum_generate.py [--work benchmarks/work] [--calib 128] [--tokens 40]
                                          [--optimum-python .venv-optimum/bin/python]

optimum-onnx pins transformers 4.57, so the generation runs in its own venv (`bash tests/optimum_env.sh`
makes it; made here too if missing). `compile -o DIR/model.onnx` copies config, generation config and tokenizer
beside the output, so DIR loads as is. Each model answers the same chat prompts (the model's chat template,
greedy); decode speed is tokens per second of `generate()` on this machine's 2 cores (one run each, not
interleaved: a sanity figure, not a benchmark). Writes benchmarks/results/optimum_generate.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, HERE, ensure_export, run_child, setup_logging, write_section

OPTIMUM_ENV = HERE.parent / ".venv-optimum"
PROMPTS = ("What is the capital of France?", "Give me three tips for staying healthy.")

GENERATE = """
import time
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
import optimum.version, transformers
folder, file_name, tokens, prompts = args[0], args[1], int(args[2]), args[3:]
tok = AutoTokenizer.from_pretrained(folder)
model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name, use_cache=True, use_io_binding=False)
result["versions"] = f"optimum {optimum.version.__version__}, transformers {transformers.__version__}"
result["tokenizer"] = type(tok).__name__
result["answers"] = []
for prompt in prompts:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=tokens, do_sample=False)
    dt = time.perf_counter() - t0
    new = out[0][enc["input_ids"].shape[1]:]
    result["answers"].append({"prompt": prompt, "text": tok.decode(new, skip_special_tokens=True),
                              "tokens": int(new.shape[0]), "tokens_per_s": int(new.shape[0]) / dt})
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--calib", type=int, default=128, help="GPTQ calibration windows (default 128)")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per answer (default 40)")
    p.add_argument("--optimum-python", type=Path, default=OPTIMUM_ENV / "bin" / "python")
    args = p.parse_args()
    setup_logging()
    if not args.optimum_python.is_file():
        import subprocess

        subprocess.run(["bash", str(HERE.parent / "tests" / "optimum_env.sh")], check=True)
    from ptqonnx.config import CalibConfig, GptqConfig, RtnConfig, as_recipe
    from ptqonnx.pipeline import compile_model

    mdir, _ = ensure_export(args.work, kv_cache=True)
    calib = CalibConfig(text=CALIB_TEXT, samples=args.calib)
    models = {"FP32 (ptqonnx export, model_kv.onnx)": (mdir, "model_kv.onnx")}
    for label, recipe in (("RTN W4 g128", RtnConfig(bits=4, group_size=128)),
                          ("GPTQ W4 g128", as_recipe(GptqConfig(bits=4, group_size=128), calibration=calib))):
        out = args.work / "optimum_generate" / label.split()[0].lower()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        report = compile_model(mdir / "model_kv.onnx", out / "model.onnx", recipe, force=True)
        models[f"{label} (compile model_kv.onnx -o {out.name}/model.onnx)"] = (out, "model.onnx")
        print(f"{label}: {len(report.quantized)} layers, copied {', '.join(report.companions)}")
    results = {label: run_child(GENERATE, str(folder), name, str(args.tokens), *PROMPTS, python=args.optimum_python)
               for label, (folder, name) in models.items()}
    first = next(iter(results.values()))
    lines = ["# optimum round trip: SmolLM2-135M-Instruct generating through ORTModelForCausalLM", "",
             "`python benchmarks/optimum_generate.py`: each folder loaded with `ORTModelForCausalLM.from_pretrained"
             "(DIR, file_name=..., use_cache=True)` and `AutoTokenizer.from_pretrained(DIR)` "
             f"({first.get('versions', '?')}, tokenizer class {first.get('tokenizer', '?')}); the chat template, "
             f"greedy, at most {args.tokens} new tokens. GPTQ calibrated on {args.calib} windows of WikiText-2 "
             "validation. Tokens per second: one `generate()` on this machine's 2 cores (not interleaved: a "
             "sanity figure).", ""]
    for label, res in results.items():
        lines += [f"## {label}", ""]
        if "error" in res:
            lines += [f"failed: {res['error']}", ""]
            continue
        for a in res["answers"]:
            answer = a["text"].strip().replace("\n", " ")
            lines += [f"- **{a['prompt']}** {answer} *({a['tokens']} tokens, {a['tokens_per_s']:.0f} tokens/s)*"]
        lines.append("")
    print("wrote", write_section("optimum_generate", lines))


if __name__ == "__main__":
    main()
