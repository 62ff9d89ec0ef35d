"""`compile --report DIR`: the compile's report as files — `report.json` (everything, machine-readable),
`report.md` (for a person deciding whether the output ships) and its PNG plots (matplotlib, extra
`[report]`): per-layer error by depth and kind, the input outlier profile before and after the float
rewrites, and the size breakdown.

Everything here reads the `CompileReport` the pipeline filled in; nothing is measured here. Files are
written to temporary names and renamed into place, so a failed write never leaves a half report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from ptqonnx.errors import UserError, require_module
from ptqonnx.io import write_atomic
from ptqonnx.report import CompileReport

__all__ = ["REPORT_FILES", "check_report_dir", "write_report", "versions"]

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "layer_error.png", "outliers.png", "sizes.png")
SCHEMA_VERSION = 1
_PACKAGES = ("ptqonnx", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "transformers")
_KIND_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "head", "other")


def check_report_dir(path: Path, *, force: bool = False) -> None:
    """Before any compute: the folder can be made, and an earlier report there is replaced only with --force;
    matplotlib is installed."""
    require_module("matplotlib", "report")
    if path.exists() and not path.is_dir():
        raise UserError(f"--report {path} is a file, not a folder; pass a folder (it is created if missing)")
    old = [n for n in REPORT_FILES if (path / n).exists()]
    if old and not force:
        raise UserError(f"{path} already holds a report ({', '.join(old[:2])}); pass --force to replace it, or "
                        "another --report folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the report folder {path} ({exc.strerror}); pass a writable --report "
                        "folder") from None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a compile's numbers (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_report(report: CompileReport, folder: Path) -> list[Path]:
    """Write report.json, report.md and the plots into `folder` (made if missing); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA_VERSION, "versions": versions(), **report.to_dict()}
    written = [write_atomic(folder / "report.json", json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")]
    plots = _plots(report, folder)
    written.append(write_atomic(folder / "report.md", _markdown(report, data["versions"], plots)))
    for stale in set(REPORT_FILES) - {p.name for p in written + plots}:  # an earlier report's (--force)
        (folder / stale).unlink(missing_ok=True)
    logger.info("report written to %s (%s)", folder, ", ".join(p.name for p in written + plots))
    return written + plots


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: such floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -- plots ------------------------------------------------------------------------------------------------


def _plots(report: CompileReport, folder: Path) -> list[Path]:
    if not report.layers and not report.sizes:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, draw in (("layer_error.png", _plot_errors), ("outliers.png", _plot_outliers),
                       ("sizes.png", _plot_sizes)):
        fig = draw(plt, report)
        if fig is None:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=folder)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
            os.replace(tmp, folder / name)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        out.append(folder / name)
    return out


def _positions(report: CompileReport) -> list[tuple[float, Any]]:
    """x position of each layer: its block index, or its order after the last block for unnumbered layers."""
    last = max((m.depth for m in report.layers if m.depth is not None), default=-1)
    extra = 0
    out = []
    for m in report.layers:
        if m.depth is None:
            extra += 1
        out.append((m.depth if m.depth is not None else last + extra, m))
    return out


def _plot_errors(plt, report: CompileReport):
    if not report.layers:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    by_kind = defaultdict(list)
    with_act = any(m.act_rel_mse is not None for m in report.layers)
    for x, m in _positions(report):
        by_kind[m.kind].append((x, max(_error(m), 1e-12)))
    for kind in sorted(by_kind, key=lambda k: _KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER)):
        xs, ys = zip(*by_kind[kind])
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("block (depth)")
    on_data = all(m.on_data for m in report.layers)
    ax.set_ylabel(("relative output MSE (static inputs quantized too)" if with_act else "relative output MSE")
                  if on_data else "relative weight MSE (no data)")
    ax.set_title("quantization error per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _plot_outliers(plt, report: CompileReport):
    pts = [(x, m) for x, m in _positions(report) if m.outlier_after is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    idx = list(range(len(pts)))
    changed = any(m.outlier_before != m.outlier_after for _, m in pts)
    if changed:
        ax.plot(idx, [m.outlier_before or float("nan") for _, m in pts], ".", label="input model")
    ax.plot(idx, [m.outlier_after or float("nan") for _, m in pts], ".",
            label="quantized from (after rewrites)" if changed else "input (no float rewrites)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("max / median of per-channel |x| max")
    ax.set_title("activation outliers at each layer's input")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_sizes(plt, report: CompileReport):
    if not report.sizes:
        return None
    fig, ax = plt.subplots(figsize=(7, 2.2))
    left = 0.0
    for label, n in report.sizes.items():
        mib = n / 2**20
        ax.barh(["output"], [mib], left=left, label=f"{label} {mib:.1f} MiB")
        left += mib
    if report.input_bytes:
        ax.barh(["input"], [report.input_bytes / 2**20], color="grey", label=f"input {_mib(report.input_bytes)}")
    ax.set_xlabel("MiB")
    ax.set_title("model size")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# -- markdown ---------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _markdown(report: CompileReport, vers: dict[str, str | None], plots: list[Path]) -> str:
    shown = {p.name for p in plots}
    recipe = report.recipe
    lines = ["# ptqonnx compile report", "",
             f"- input: `{report.input_path}` ({_mib(report.input_bytes)})",
             f"- output: `{report.output_path}` ({_mib(report.output_bytes)})",
             f"- method: {recipe.method if recipe is not None else '?'}; stages: "
             f"{', '.join(s.stage for s in recipe.stages) if recipe is not None else '?'}",
             f"- {report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB",
             f"- versions: {', '.join(f'{k} {v}' for k, v in vers.items() if v)}", "",
             "## What it did", "", "```", *report.lines(), "```", ""]
    if report.layers:
        lines += ["## Quantization error per layer", "", report.analysis + ".", ""]
        if "layer_error.png" in shown:
            lines += ["![per-layer error](layer_error.png)", ""]
        lines += _error_tables(report)
    if report.sensitivity:
        lines += ["## Sensitivity (`--sensitivity`)", "", f"Measured by {report.sensitivity_measured}; every layer "
                  "in report.json, the 20 most sensitive here.", "",
                  "| rank | layer | N x K | error on the grid | at 8 bits | bits per weight |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {i} | `{c.name}` | {c.weights} | {c.base_error:.3g} | {c.high_error:.3g} | {c.base_bits:.2f} |"
                  for i, c in enumerate(report.sensitivity[:20], 1)] + [""]
    if "outliers.png" in shown:
        lines += ["## Activation outliers", "",
                  "max / median of each layer input's per-channel absolute maximum (1-3: flat; tens or more: a few "
                  "channels dominate a per-tensor scale).", "", "![outliers](outliers.png)", ""]
        lines += _outlier_table(report)
    if report.sizes:
        lines += ["## Size", "", "| part | MiB |", "|---|---:|"]
        lines += [f"| {k} | {n / 2**20:.2f} |" for k, n in report.sizes.items()]
        lines += [f"| output file | {report.output_bytes / 2**20:.2f} |",
                  f"| input file | {report.input_bytes / 2**20:.2f} |", ""]
        if "sizes.png" in shown:
            lines += ["![sizes](sizes.png)", ""]
    if report.timings:
        lines += ["## Time per step", "", "| step | s |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report.timings.items()] + [""]
    if report.skipped:
        lines += ["## Not quantized", "", "| layer | op | why |", "|---|---|---|"]
        lines += [f"| `{s.node}` | {s.op_type} | {s.reason} |" for s in report.skipped] + [""]
    return "\n".join(lines)


def _error(m) -> float:
    """A layer's error as the report ranks it: with its input quantized where that was measured (static W8A8),
    else its weight's alone."""
    return m.act_rel_mse if m.act_rel_mse is not None else m.rel_mse


def _error_tables(report: CompileReport) -> list[str]:
    with_act = any(m.act_rel_mse is not None for m in report.layers)
    key = _error
    by_kind = defaultdict(list)
    for m in report.layers:
        by_kind[m.kind].append(key(m))
    what = "error (static inputs quantized too)" if with_act else "error"
    out = [f"| kind | layers | median {what} | max {what} |", "|---|---:|---:|---:|"]
    for kind in sorted(by_kind, key=lambda k: _KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER)):
        v = sorted(by_kind[kind])
        out.append(f"| {kind} | {len(v)} | {v[len(v) // 2]:.3g} | {v[-1]:.3g} |")
    worst = sorted(report.layers, key=key, reverse=True)[:10]
    act = " | with input quantized" if with_act else ""
    out += ["", "The layers that lose most:", "", f"| layer | weight | N x K | bits / block | weight error{act} |",
            "|---|---|---|---|---:|" + ("---:|" if with_act else "")]
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    out += [f"| `{m.name}` | `{m.weight}` | {m.shape[0]} x {m.shape[1]} | {m.bits} / {min(m.block_size, m.shape[1])} "
            f"| {m.rel_mse:.3g}" + (f" | {fmt(m.act_rel_mse)}" if with_act else "") + " |" for m in worst]
    return out + [""]


def _outlier_table(report: CompileReport) -> list[str]:
    pts = [m for m in report.layers if m.outlier_after is not None]
    worst = sorted(pts, key=lambda m: m.outlier_before or 0.0, reverse=True)[:10]
    out = ["| layer | weight | input model | quantized from |", "|---|---|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    out += [f"| `{m.name}` | `{m.weight}` | {fmt(m.outlier_before)} | {fmt(m.outlier_after)} |" for m in worst]
    return out + [""]
