"""Mixed precision under a size budget: SmolLM2-135M perplexity against bits per weight for RTN, GPTQ and
AWQ+GPTQ at W4 g128, uniform and with `--budget-bits` 4.75 / 5.0 / 5.25 (the layers whose measured RTN error
drops most per added bit raised to 8 bits per channel), plus a plot of the curve.

    python benchmarks/budget.py [--work benchmarks/work] [--windows 40] [--calib 32] [--reuse]

Bits per weight are counted from the written MatMulNBits bytes (codes, scales, zero points) over the
quantized layers' weights; the LM head (SmolLM2's tied table, untied to be quantized) is one of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, HERE, Row, arg_parser, evaluate, our_row, prepare, size, write_section

BUDGETS = (None, 4.75, 5.0, 5.25)
METHODS = (("RTN", "rtn"), ("GPTQ", "gptq"), ("AWQ+GPTQ", "awq+gptq"))


def bits_per_weight(path: Path) -> tuple[float, int]:
    """(bits per quantized weight from the bytes written, as `ptqonnx inspect` counts them: codes, scales, zero
    points; how many layers are 8-bit)."""
    from ptqonnx.inspect import inspect_model

    info = inspect_model(path)
    return info.summary.bits_per_weight, sum(1 for layer in info.linear_layers if layer.weight_quant.bits == 8)


def plot(points: dict[str, list[tuple[float, float]]], fp32: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in points.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(fp32, color="grey", linestyle="--", label=f"FP32 {fp32:.2f}")
    ax.set_xlabel("bits per quantized weight (codes + scales, as written)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: perplexity vs size, W4 g128 with 8-bit layers under a budget")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    args = arg_parser(__doc__, calib=32, reuse=True).parse_args()
    mdir, q, _ = prepare(args, "budget")
    calib = dict(text=str(CALIB_TEXT), samples=args.calib)
    fp32 = Row("FP32", "-", "float32 export", mdir / "model.onnx")
    rows, meta = [fp32], {}
    for name, method in METHODS:
        for b in BUDGETS:
            label = f"{name} W4 g128" + (f", budget {b:g}" if b else ", uniform")
            weights = dict(bits=4, group_size=128, symmetric=True, **({"budget_bits": b} if b else {}))
            spec = dict(method=method, weights=weights, **({"calib": calib} if method != "rtn" or b else {}))
            settings = (f"{args.calib} windows" if method != "rtn" or b else "no data") + (
                f", --budget-bits {b:g}" if b else "")
            rows.append(our_row(args, label, settings, q / f"{method.replace('+', '_')}_{b or 'u'}.onnx", fp32.path,
                                **spec))
            meta[label] = name
    windows = evaluate(rows, mdir, args.windows)
    lines = [
        "# Mixed precision under a budget: SmolLM2-135M-Instruct, W4 g128 + 8-bit layers",
        "",
        f"Produced by `python benchmarks/budget.py`; perplexity on the first {len(windows)} windows x 512 tokens of "
        "WikiText-2 test; calibration (GPTQ, AWQ, and the budget's ranking for RTN) "
        f"{args.calib} windows of the WikiText-2 validation text. Bits per weight are counted from the written "
        "MatMulNBits bytes (codes padded to whole blocks, float32 scales) over every quantized layer, the LM head "
        "included. SmolLM2's K = 576 is not a multiple of 128, so each row's codes are padded to 640: the grid "
        "alone takes 4.63 bits per weight (4.72 at K = 576, 4.25 at K = 1536), and a raised layer, 8 bits per "
        "channel written as blocks of 128, 9.17 at K = 576 (8.25 at K = 1536).",
        "",
        "| model | settings | bits per weight | 8-bit layers | perplexity | delta vs FP32 | size MiB | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    points: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        ppl = f"{r.ppl:.4f}" if r.ppl is not None else (r.note or "not run")
        delta = f"{r.ppl - fp32.ppl:+.4f}" if r.ppl is not None and r is not fp32 else ""
        have = r.path.is_file() and not r.note
        bpw, high = bits_per_weight(r.path) if have and r is not fp32 else (None, None)
        qs = f"{r.quant_s:.1f}" if r.quant_s is not None and not r.note else ""
        lines.append(f"| {r.label} | {r.settings} | {'' if bpw is None else f'{bpw:.3f}'} | "
                     f"{'' if high is None else high} | {ppl} | {delta} | "
                     f"{f'{size(r.path) / 2**20:.1f}' if have else ''} | {qs} |")
        if bpw is not None and r.ppl is not None:
            points.setdefault(meta[r.label], []).append((bpw, r.ppl))
    if points and fp32.ppl is not None:
        plot(points, fp32.ppl, HERE / "results" / "budget.png")
        lines += ["", "![perplexity vs bits per weight](budget.png)"]
    print("\n".join(lines))
    write_section("budget", lines)


if __name__ == "__main__":
    main()
