"""Shared pieces of the benchmark scripts: the real model export, quantizers run in child processes (so
each reports its own time and peak RSS), perplexity on the shared windows, interleaved latency, tables."""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
EVAL_TEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
CALIB_TEXT = SHARED / "wikitext-2-calib" / "valid.txt"
logger = logging.getLogger("benchmarks")


@dataclass
class Row:
    label: str
    tool: str
    settings: str
    path: Path
    quant_s: float | None = None
    peak_rss_mib: float | None = None
    ppl: float | None = None
    tokens: int = 0
    kv_path: Path | None = None
    note: str = ""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)


def ensure_export(work: Path, kv_cache: bool, dtype: str = "float32") -> tuple[Path, float | None]:
    """The SmolLM2-135M export in `work/smollm2` (`work/smollm2_fp16` for dtype float16; made once); returns its
    folder and the export seconds."""
    from ptqonnx.models.export import export_causal_lm

    mdir = work / ("smollm2" if dtype == "float32" else "smollm2_fp16")
    if (mdir / "model.onnx").is_file() and (not kv_cache or (mdir / "model_kv.onnx").is_file()):
        return mdir, None
    t0 = time.perf_counter()
    export_causal_lm("smollm2", mdir, kv_cache=kv_cache, dtype=dtype)
    return mdir, time.perf_counter() - t0


VENV_FLAGS = {  # flag -> (venv folder under --work, help)
    "--inc-python": ("venv-inc", "python of a venv with onnx-neural-compressor"),
    "--modelopt-python": ("venv-modelopt", "python of a venv with nvidia-modelopt[onnx]"),
    "--ort-sq-python": ("venv-ortsq", "python of a venv with onnxruntime and neural-compressor 2.x "
                        "(ORT's SmoothQuant option)"),
    "--optimum-python": ("venv-optimum", "python of a venv with optimum-onnx (it pins transformers 4.57)"),
    "--genai-python": ("venv-genai", "python of a venv with onnxruntime-genai (its model builder)"),
}


def arg_parser(doc: str, *, calib: int | None = None, others_calib: int | None = None,
               others_help: str = "", venvs: tuple[str, ...] = (), reuse: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark script shares: --work, --windows, --rounds; --calib (ours) when `calib`;
    --others-calib and --skip-others when `others_calib`; the other tools' venv pythons named in `venvs`;
    --reuse (keep an earlier run's outputs, `our_row`) when `reuse`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if reuse:
        ap.add_argument("--reuse", action="store_true", help="keep the outputs of an earlier run of this script")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="export and outputs (git-ignored)")
    if calib is not None:
        ap.add_argument("--calib", type=int, default=calib, help=f"calibration windows for ours (default {calib})")
    if others_calib is not None:
        ap.add_argument("--others-calib", type=int, default=others_calib,
                        help=f"calibration windows for the other tools (default {others_calib}){others_help}")
        ap.add_argument("--skip-others", action="store_true", help="only our rows (a quick re-run)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    for flag in venvs:
        folder, text = VENV_FLAGS[flag]
        ap.add_argument(flag, type=Path, default=HERE / "work" / folder / "bin" / "python", help=text)
    return ap


PACKAGE_PARTS = ("pyproject.toml", "README.md", "ptqonnx", "passes", "runtime", "models")  # what the build reads


def snapshot_package(work: Path) -> Path:
    """Install a copy of ptqonnx as it is now into `work/snapshots/<pid>` and import it from there, in this
    process and in every child (`run_child`): editing the checkout while a benchmark runs no longer changes
    the code it measures. Removed at exit."""
    target = work / "snapshots" / str(os.getpid())
    src = target.with_name(f"{target.name}-src")  # a clean copy: no stale build/ from the checkout
    for path in (target, src):
        shutil.rmtree(path, ignore_errors=True)
    for part in PACKAGE_PARTS:
        path = HERE.parent / part
        if path.is_dir():
            shutil.copytree(path, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / part)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
           str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(src, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"could not snapshot ptqonnx: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    atexit.register(shutil.rmtree, target, True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
    logger.info("measuring a snapshot of ptqonnx in %s", target)
    return target


def prepare(args: argparse.Namespace, section: str, *, kv_cache: bool = False) -> tuple[Path, Path, float | None]:
    """Logging, a snapshot of the package (`snapshot_package`), the export (made once) and the section's output
    folder under --work: (model folder, output folder, export seconds or None when it was already there).
    Call before importing anything from ptqonnx."""
    setup_logging()
    if "ptqonnx" in sys.modules:
        raise RuntimeError("benchmarks: call prepare() before importing ptqonnx (it imports from a snapshot)")
    snapshot_package(args.work)
    mdir, export_s = ensure_export(args.work, kv_cache=kv_cache)
    out = args.work / section
    out.mkdir(parents=True, exist_ok=True)
    return mdir, out, export_s


def run_child(code: str, *args: str, python: str | Path | None = None) -> dict:
    """Run `code` (a Python snippet, `args` in scope) in a child process (`python`, default this one);
    returns its JSON result with seconds and the child's peak RSS, or an `error` with the exception's line."""
    wrapper = (
        "import json, resource, sys, time, traceback\n"
        "args = sys.argv[1:]\nt0 = time.perf_counter()\nresult = {}\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.strip().splitlines()) +
        "except BaseException as exc:\n"
        "    result['error'] = f'{type(exc).__name__}: {exc}'.strip().splitlines()[0][:300]\n"
        "result['seconds'] = time.perf_counter() - t0\n"
        "result['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('\\n@@RESULT@@' + json.dumps(result), flush=True)\n"
    )
    # -P: not the working directory first on sys.path (a checkout's ptqonnx/ there would shadow the snapshot)
    proc = subprocess.run([str(python or sys.executable), "-P", "-c", wrapper, *args], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if "@@RESULT@@" in line:  # a library's progress bar may have left the line open
            return json.loads(line.split("@@RESULT@@", 1)[1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"child exited {proc.returncode}: {tail[:300]}"}


OURS = """
from ptqonnx.config import CalibConfig
from ptqonnx.pipeline import compile_model
from ptqonnx.registry import recipe_for
spec = json.loads(args[2])
method = spec.pop("method", "rtn")
w8a8 = spec.pop("w8a8", None)
rotate = spec.pop("rotate", False)
fields = dict(spec.pop("weights", {}))
for stage in ("gptq", "awq", "smoothquant"):  # a stage's settings apply when the method runs that stage
    settings = spec.pop(stage, {})
    if stage in method.split("+"):
        fields.update(settings)
fields.update(w8a8 or {})
fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}  # JSON lists -> tuple fields
calib = CalibConfig(**spec["calib"]) if "calib" in spec else None
recipe = recipe_for(method, w8a8=w8a8 is not None, rotate=rotate, **fields)
compile_model(args[0], args[1], recipe, calibration=calib, force=True)
"""


def quantize_ours(row: Row, src: Path, **spec) -> None:
    record(row, run_child(OURS, str(src), str(row.path), json.dumps(spec, default=str)))


def our_row(args: argparse.Namespace, label: str, settings: str, path: Path, src: Path, **spec) -> Row:
    """A row of ours: `src` compiled with `spec` into `path` (an earlier run's file is kept with --reuse)."""
    row = Row(label, "ptqonnx", settings, path)
    if not (getattr(args, "reuse", False) and path.is_file()):
        quantize_ours(row, src, **spec)
    return row


def method_specs(calib_windows: int, *, rotate: bool = True, w8a8_target: str = "tensorrt") -> list:
    """The methods the paired benchmarks run on two inputs: (label, settings, compile spec) for RTN, GPTQ and
    AWQ at W4 g128 symmetric, RTN with rotations (`rotate`) and SmoothQuant W8A8 for `w8a8_target`."""
    calib = dict(text=str(CALIB_TEXT), samples=calib_windows)
    g128 = dict(bits=4, group_size=128, symmetric=True)
    w8 = dict(bits=8, group_size=None, symmetric=True, format="qdq")
    return [
        ("RTN W4 g128 sym", "no calibration", dict(weights=g128)),
        ("GPTQ W4 g128 sym", f"act-order, sequential, {calib_windows} windows",
         dict(method="gptq", weights=g128, calib=calib)),
        ("AWQ W4 g128 sym", f"scales + clip, sequential, {calib_windows} windows",
         dict(method="awq", weights=g128, calib=calib)),
        *([("RTN W4 g128 sym --rotate", "R1+R2+R4, no calibration", dict(weights=g128, rotate=True))]
          if rotate else []),
        (f"SmoothQuant W8A8 {w8a8_target}", f"alpha 0.5, static per-tensor, {calib_windows} windows",
         dict(method="smoothquant", weights=w8, w8a8=dict(target=w8a8_target), smoothquant=dict(alpha=0.5),
              calib=calib)),
    ]


def paired_rows(args: argparse.Namespace, methods: list, q: Path, first: tuple[Row, str, str],
                second: tuple[Row, str, str], why: str = "") -> tuple[list[Row], list[tuple[Row, Row]]]:
    """Each method compiled from two float inputs, `first` and `second` = (float row, label suffix, file
    stem); `why` (second input missing) gives its rows that note instead. Returns (rows, pairs), the float
    pair first."""
    rows, pairs = [first[0], second[0]], [(first[0], second[0])]
    for i, (label, settings, spec) in enumerate(methods):
        pair = tuple(
            Row(f"{label}{suffix}", "ptqonnx", settings, q / "missing.onnx", note=why) if why and src is second[0]
            else our_row(args, f"{label}{suffix}", settings, q / f"{stem}_{i}.onnx", src.path, **spec)
            for src, suffix, stem in (first, second))
        rows += pair
        pairs.append(pair)
    return rows, pairs


def write_paired(rows: list[Row], pairs: list[tuple[Row, Row]], mdir: Path, args: argparse.Namespace, title: str,
                 script: str, about: str, suffix: str, head: str, section: str) -> None:
    """Evaluate and time `rows`, then write the section: `about` (a paragraph) and `paired_table`."""
    _, lat, lines = evaluate_and_time(rows, mdir, args, title, script)
    lines += [about, ""]
    lines += paired_table(pairs, lat, pairs[0][0], suffix, head)
    print("\n".join(lines))
    write_section(section, lines)


# calibration feeds for the other tools: the same windows as ours (ptqonnx's own window drawing)
FEEDS = """
from ptqonnx.calibration.sources import CalibConfig, calibration_batches
def feeds(model_dir, n):
    return calibration_batches(CalibConfig(text=%r, samples=n), model_dir, ["input_ids"])
""" % str(CALIB_TEXT)

# for a child in another tool's venv (no ptqonnx there): `feeds` from the npz `save_calib_inputs` wrote
# (args[2]) and an Intel onnx-neural-compressor CalibrationDataReader over them
INC_READER = """
import numpy as np, onnx
from onnx_neural_compressor import data_reader
feeds = [{"input_ids": f} for f in np.load(args[2])["input_ids"]]
class Reader(data_reader.CalibrationDataReader):
    def __init__(self):
        self.i = 0
    def get_next(self):
        if self.i >= len(feeds):
            return None
        self.i += 1
        return feeds[self.i - 1]
    def rewind(self):
        self.i = 0
"""

INC_PACKAGES = ("onnx-neural-compressor==1.0", "prettytable", "scipy")  # the last two imported, not declared


def save_calib_inputs(mdir: Path, npz: Path, n: int) -> dict:
    """Write the first `n` calibration windows (ours) to `npz` as input_ids [n, T] for the other tools' venvs;
    the child's result (an `error` if it failed)."""
    return run_child(FEEDS + "import numpy as np\nnp.savez(args[1], input_ids=np.stack("
                     "[f['input_ids'] for f in feeds(args[0], int(args[2]))]))", str(mdir), str(npz), str(n))


def _last_error(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or ["?"])[-1][:300]


def ensure_venv(python: Path, packages: tuple[str, ...]) -> str:
    """Make the venv of `python` with `packages` if it is missing; '' when usable, else why not (for the table)."""
    if python.is_file():
        return ""
    venv = python.parent.parent
    steps = [[sys.executable, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", *packages]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return f"did not install: {_last_error(proc)}"
    return ""


def smollm2_hf(work: Path) -> Path:
    """work/smollm2_hf: SmolLM2's GGUF dequantized and saved as a Hugging Face folder (made once), the float
    weights our export is made from, for the other tools' exporters to read."""
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
    return hf


def run_exporter(python: Path, packages: tuple[str, ...], cmd: list[str], made: Path, tool: str) -> str:
    """Another tool's exporter in its own venv (`ensure_venv`): '' once `made` exists, else why not."""
    why = ensure_venv(python, packages)
    if why:
        return why
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not made.is_file():
        return f"{tool} failed: {_last_error(proc)}"
    return ""


def record(row: Row, res: dict) -> None:
    """Keep a child's time and peak RSS on the row; an error becomes the row's note (shown in the table)."""
    row.quant_s, row.peak_rss_mib = res.get("seconds"), res.get("peak_rss_mib")
    if "error" in res:
        row.note = res["error"]
    logger.info("%s: %s", row.label, res)


def evaluate(rows: list[Row], mdir: Path, windows_n: int):
    from ptqonnx.runtime.perplexity import perplexity
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    windows = eval_windows(tokenize(read_text(EVAL_TEXT), load_tokenizer(mdir)), 512, windows_n)
    for row in rows:
        if row.note or not row.path.is_file():
            continue
        try:
            res = perplexity(row.path, windows)
            row.ppl, row.tokens = res.ppl, res.tokens_evaluated
        except Exception as exc:  # a tool's output that fails to run is a result: record it
            row.note = f"eval failed: {str(exc).strip().splitlines()[0][:300]}"
        logger.info("%s: ppl %s", row.label, row.ppl)
    return windows


def prefill_latency(rows: list[Row], rounds: int):
    from ptqonnx.runtime.bench import interleaved, prefill_runner

    runners, threads = {}, 0
    for row in rows:
        if row.ppl is not None:
            runners[row.label], threads = prefill_runner(row.path)
    return interleaved(runners, rounds=rounds), threads


def evaluate_and_time(rows: list[Row], mdir: Path, args: argparse.Namespace, title: str, script: str):
    """Perplexity of every row on the shared windows (`evaluate`), their prefill latency interleaved
    (`prefill_latency`), and the table's preamble (`header`): (windows, latency, lines)."""
    windows = evaluate(rows, mdir, args.windows)
    lat, threads = prefill_latency(rows, args.rounds)
    return windows, lat, header(title, script, threads, windows, args.rounds)


def size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def header(title: str, script: str, threads: int, windows, rounds: int, *, g128_note: bool = True) -> list[str]:
    """The table's preamble: what produced it, the evaluation windows, how latency was measured; `g128_note`:
    why g128 is the headline of a 4-bit weight table (not said under W8A8 tables)."""
    note = ["SmolLM2's float weights come from a Q4_1 GGUF (4-bit asymmetric, groups of 32): a g32 asymmetric "
            "grid gets a free advantage; the headline here is g128.", ""]
    return [
        f"# {title}",
        "",
        f"Produced by `python benchmarks/{script}` on {datetime.date.today().isoformat()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, ORT threads {threads}).",
        f"Perplexity: first {len(windows)} non-overlapping windows x 512 tokens of WikiText-2 test "
        f"(`wiki.test.raw`, tokenized once; {windows.shape[0] * (windows.shape[1] - 1)} predicted tokens).",
        "Prefill latency: ORT CPU EP at its default optimization level, one 1x512 forward, median of "
        f"{rounds} interleaved rounds; the ratio is the median of per-round ratios to FP32 in the same run "
        "(timings here swing +-20 % with load).",
        "",
    ] + (note if g128_note else [])


def table(rows: list[Row], lat, *, rss: bool = True) -> list[str]:
    fp32 = rows[0]
    cols = "| model | tool | settings | perplexity | delta vs FP32 | quantize s |" + (" peak RSS MiB |" if rss else "")
    lines = [cols + " size MiB | size vs FP32 | prefill ms | prefill vs FP32 |",
             "|" + "---|" * (cols.count("|") - 1 + 4)]
    for r in rows:
        ppl = f"{r.ppl:.4f}" if r.ppl is not None else (r.note or "not run")
        delta = f"{r.ppl - fp32.ppl:+.4f}" if r.ppl is not None and fp32.ppl is not None else ""
        qs = f"{r.quant_s:.1f}" if r.quant_s is not None and not r.note else ""
        mem = (f" {r.peak_rss_mib:.0f} |" if r.peak_rss_mib and not r.note else " |") if rss else ""
        have = r.path.is_file() and not r.note
        sz = f"{size(r.path) / 2**20:.1f} | {size(r.path) / size(fp32.path):.3f}" if have else " | "
        pm = f"{lat.medians[r.label]:.0f}" if r.label in lat.medians else ""
        pr = f"{lat.ratios[r.label]:.2f}x" if r.label in lat.ratios else ""
        lines.append(f"| {r.label} | {r.tool} | {r.settings} | {ppl} | {delta} | {qs} |{mem} {sz} | {pm} | {pr} |")
    return lines


def write_section(name: str, lines: list[str]) -> Path:
    """Write one benchmark's section to benchmarks/results/<name>.md and rebuild benchmarks/results.md from
    all sections (so each script can be re-run alone)."""
    sections = HERE / "results"
    sections.mkdir(exist_ok=True)
    (sections / f"{name}.md").write_text("\n".join(lines) + "\n")
    order = ["foundation", "gptq", "gptq_w3", "awq", "smoothquant"]
    parts = sorted(sections.glob("*.md"), key=lambda p: (order.index(p.stem) if p.stem in order else 99, p.stem))
    out = HERE / "results.md"
    out.write_text("# ptqonnx benchmark results\n\nEach section is produced by the script it names, in one run on "
                   "this project's machine; re-run a script to refresh its section.\n\n"
                   + "\n\n".join(p.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1) for p in parts))
    return out


def paired_table(pairs: list[tuple[Row, Row]], lat, float_row: Row, suffix: str, head: str) -> list[str]:
    """One line per (a, b) pair of the same method on two inputs: perplexity of each, b vs a, sizes and prefill
    ratios; `head` names the columns (a header row of 7 cells), `suffix` is cut from a's label; then the
    quantize times of the rows after the float pair."""
    lines = [head, "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        label = a.label.removesuffix(suffix) if a is not float_row else "float (no quantization)"
        if a.ppl is None or b.ppl is None:
            lines.append(f"| {label} | {a.settings} | {a.ppl or a.note or 'not run'} | {b.ppl or b.note or 'not run'} "
                         "| | | |")
            continue
        rel = (b.ppl - a.ppl) / a.ppl
        lines.append(f"| {label} | {a.settings} | {a.ppl:.4f} | {b.ppl:.4f} | {rel:+.2%} | "
                     f"{size(a.path) / 2**20:.1f} / {size(b.path) / 2**20:.1f} | "
                     f"{lat.ratios.get(a.label, float('nan')):.2f}x / {lat.ratios.get(b.label, float('nan')):.2f}x |")
    timed = [r for pair in pairs[1:] for r in pair]
    q_s = ", ".join(f"{r.label} {r.quant_s:.0f} s" for r in timed if r.quant_s is not None and not r.note)
    return lines + ["", f"Quantize time: {q_s}."]
