"""Rotation probe on SmolLM2-135M: rotated float models (R1, R1+R2, R1+R2+R4) against FP32, their activation
outlier profiles, and (with --quantize) RTN W4 g128 and static W8A8 (rtn, ort-cpu) perplexities of each.

    python benchmarks/rotation_probe.py [--work DIR] [--check-windows 4] [--profile-windows 2] [--quantize]

1. export SmolLM2 (no KV cache) once into WORK/smollm2;
2. write WORK/rot_{r1,r12,r124}/model.onnx: FoldNormGammaPass + RotateResidualPass (random Hadamard, seed 0),
   + RotateValueHeadsPass, + OnlineHadamardPass; each checked with onnx.checker;
3. float check: perplexity of the first `--check-windows` 512-token windows of WikiText-2 test for FP32 and each
   rotated model, and the max |Δlogits| / max |logits| on the first window;
4. outlier profile on `--profile-windows` windows: for every layer and each linear-layer input (q/k/v, o_proj,
   gate/up, down_proj), the per-channel |x| maximum over tokens; printed as max/median over channels
   (1 = flat) and the tensor's |x| maximum (what a static per-tensor INT8 grid must cover);
5. --quantize: `ptqonnx compile` (rtn W4 g128; rtn --w8a8 --target ort-cpu with 16 calibration windows of
   wikitext-2-calib) and `ptqonnx eval` (`--windows`, default 40) of FP32 and each rotated model, one at a time.

Writes WORK/rotation_probe.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, HERE, ensure_export, setup_logging  # noqa: E402

VARIANTS = {"r1": 1, "r12": 2, "r124": 3}  # name -> how many of [R1, R2, R4] after the γ fold


def rotate(src: Path, dst: Path, upto: int) -> dict:
    import onnx
    import onnx_ir as ir

    from ptqonnx.passes.rotate_fold_gamma import FoldNormGammaPass
    from ptqonnx.passes.rotate_heads import RotateValueHeadsPass
    from ptqonnx.passes.rotate_online import OnlineHadamardPass
    from ptqonnx.passes.rotate_residual import RotateResidualPass

    t0 = time.perf_counter()
    model = ir.load(str(src))
    fold = FoldNormGammaPass()
    passes = [fold, RotateResidualPass(), RotateValueHeadsPass(), OnlineHadamardPass()][: upto + 1]
    modified = [p(model).modified for p in passes]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"modified": modified, "untied_bytes": fold.untied_bytes, "seconds": time.perf_counter() - t0}


def windows(tok_dir: Path, n: int) -> np.ndarray:
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    return eval_windows(tokenize(read_text(EVAL_TEXT), load_tokenizer(tok_dir)), 512, n)


def float_check(fp32: Path, rotated: Path, w: np.ndarray) -> dict:
    from ptqonnx.runtime.ort import make_session
    from ptqonnx.runtime.perplexity import perplexity

    a = make_session(fp32).run(["logits"], {"input_ids": w[:1]})[0]
    b = make_session(rotated).run(["logits"], {"input_ids": w[:1]})[0]
    return {"ppl": perplexity(rotated, w).ppl, "max_rel_logits": float(np.abs(a - b).max() / np.abs(a).max())}


def activations(path: Path) -> dict[str, str]:
    """'{layer}.{kind}' -> value name of each linear layer input, found on the residual stream."""
    import onnx_ir as ir

    from ptqonnx.graph.attention import attention_path
    from ptqonnx.graph.residual import find_residual_stream

    stream = find_residual_stream(ir.load(str(path)))
    assert stream, stream.reason
    out = {}
    for i, norm in enumerate(stream.norms[:-1]):
        out[f"{i // 2}.{'qkv' if i % 2 == 0 else 'gate_up'}"] = norm.output.name
    for i, w in enumerate(stream.writers):
        out[f"{i // 2}.{'o' if attention_path(w.site.activation) is not None else 'down'}"] = w.site.activation.name
    return out


def profile(path: Path, w: np.ndarray) -> dict[str, tuple[float, float]]:
    """'{layer}.{kind}' -> (max/median of per-channel |x| maxima, |x| maximum) over the windows."""
    import onnx_ir as ir

    from ptqonnx.runtime.ort import make_session

    names = activations(path)
    model = ir.load(str(path))
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name in names.values():
        model.graph.outputs.append(values[name])
    probe = path.with_name("probe.onnx")
    ir.save(model, str(probe))
    sess = make_session(probe)
    absmax: dict[str, np.ndarray] = {}
    for row in w:
        outs = sess.run(list(names.values()), {"input_ids": row[None]})
        for key, x in zip(names, outs):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            absmax[key] = m if key not in absmax else np.maximum(absmax[key], m)
    probe.unlink()
    return {k: (float(m.max() / np.median(m)), float(m.max())) for k, m in absmax.items()}


def cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "ptqonnx.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptqonnx {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def quantized_ppl(model: Path, tok_dir: Path, n: int) -> dict[str, float]:
    out = {}
    recipes = {"rtn_w4g128": ["--method", "rtn"],
               "w8a8_static_ortcpu": ["--method", "rtn", "--w8a8", "--target", "ort-cpu", "--calib-text",
                                      str(CALIB_TEXT), "--calib-samples", "16", "--tokenizer", str(tok_dir)]}
    for name, flags in recipes.items():
        q = model.with_name(f"model.{name}.onnx")
        cli("compile", str(model), *flags, "-o", str(q))
        text = cli("eval", str(q), "--text", str(EVAL_TEXT), "--max-windows", str(n), "--tokenizer", str(tok_dir))
        out[name] = float(re.search(r"perplexity ([0-9.]+)", text).group(1))
        print(f"  {model.parent.name} {name}: {out[name]:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="export and outputs (git-ignored)")
    ap.add_argument("--check-windows", type=int, default=4)
    ap.add_argument("--profile-windows", type=int, default=2)
    ap.add_argument("--quantize", action="store_true", help="also compile and evaluate RTN W4 and W8A8 static")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows for --quantize")
    args = ap.parse_args()
    setup_logging()
    mdir, _ = ensure_export(args.work, kv_cache=False)
    fp32 = mdir / "model.onnx"
    results: dict = {"variants": {}}
    models = {"fp32": fp32}
    for name, upto in VARIANTS.items():
        dst = args.work / f"rot_{name}" / "model.onnx"
        results["variants"][name] = rotate(fp32, dst, upto)
        models[name] = dst
    w = windows(mdir, max(args.check_windows, args.profile_windows))
    from ptqonnx.runtime.perplexity import perplexity

    results["float"] = {"fp32": {"ppl": perplexity(fp32, w[: args.check_windows]).ppl, "max_rel_logits": 0.0}}
    for name in VARIANTS:
        results["float"][name] = float_check(fp32, models[name], w[: args.check_windows])
    print(f"\n| model | ppl ({args.check_windows} windows) | max rel Δlogits | passes modified | untied bytes |")
    print("|---|---|---|---|---|")
    for name, r in results["float"].items():
        v = results["variants"].get(name, {})
        print(f"| {name} | {r['ppl']:.4f} | {r['max_rel_logits']:.2e} | {v.get('modified', '')} | "
              f"{v.get('untied_bytes', '')} |")
    results["profile"] = {name: profile(path, w[: args.profile_windows]) for name, path in models.items()}
    kinds = ("qkv", "o", "gate_up", "down")
    print("\nmax/median of per-channel |x| max (|x| max) per layer input")
    print("| layer | " + " | ".join(f"{k} {m}" for k in kinds for m in models) + " |")
    print("|---|" + "---|" * (len(kinds) * len(models)))
    for layer in range(len(results["profile"]["fp32"]) // len(kinds)):
        cells = [f"{results['profile'][m][f'{layer}.{k}'][0]:.1f} ({results['profile'][m][f'{layer}.{k}'][1]:.0f})"
                 for k in kinds for m in models]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    if args.quantize:
        results["quantized"] = {name: quantized_ppl(path, mdir, args.windows) for name, path in models.items()}
    (args.work / "rotation_probe.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.work / 'rotation_probe.json'}")


if __name__ == "__main__":
    main()
