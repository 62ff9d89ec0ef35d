"""Conv layers: a ResNet-style CNN compiled with ptqonnx's Conv support next to ONNX Runtime's quantize_static.

No image model or dataset can be downloaded here, so the net is built in torch (seeded random weights,
BatchNorm with random running statistics, residual adds, stride-2 stages, a Linear classifier) and exported
with torch.onnx (the dynamo exporter, opset 21); the images are seeded Gaussian noise (32 for calibration, 64 held out). Quality is measured
against the FP32 model on the held-out images: top-1 agreement and the relative error of the logits
(||y - y_fp32|| / ||y_fp32||, mean over images). Latency: ORT CPU EP at its default optimization level, one
1x3x96x96 image, median of interleaved rounds, ratio to FP32 in the same run. TensorRT: TensorRT-RTX's
ahead-of-time build of each file (no GPU), where `tensorrt_rtx` is installed.

    python benchmarks/conv.py [--work benchmarks/work] [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, logger, setup_logging, size, write_section  # noqa: E402

SIDE = 160


def build_net(path: Path, residual: bool = True) -> Path:
    """The ResNet-style net, or (`residual` False) a plain chain of 3x3 Conv -> ReLU (VGG-style)."""
    import torch

    nn = torch.nn
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                   nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.a(x) + self.skip(x))

    if residual:
        body = [Block(64, 64, 1), Block(64, 128, 2), Block(128, 128, 1), Block(128, 256, 2), Block(256, 256, 1)]
    else:
        body = [m for c, st in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (256, 1))
                for m in (nn.Conv2d(c if st == 1 else c // 2, c, 3, st, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())]
    net = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *body,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(net, (torch.randn(1, 3, SIDE, SIDE),), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          opset_version=21)  # FP8 activations after a Relu need opset 21 (passes/w8a8.py)
    return path


def ort_static(src: Path, npz: Path, dst: Path) -> Path:
    """ONNX Runtime's own static quantizer, QDQ, per-channel int8 weights, uint8 activations (its defaults)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    images = np.load(npz)["image"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        subprocess.run([sys.executable, "-m", "onnxruntime.quantization.preprocess", "--input", str(src),
                        "--output", str(pre)], check=True, capture_output=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    setup_logging()

    work = args.work / "conv"
    rng = np.random.default_rng(0)
    npz = work / "calib.npz"
    work.mkdir(parents=True, exist_ok=True)
    np.savez(npz, image=rng.standard_normal((32, 3, SIDE, SIDE)).astype(np.float32))
    held = rng.standard_normal((64, 3, SIDE, SIDE)).astype(np.float32)
    lines = [
        "# Conv layers (CNNs)",
        "",
        f"Produced by `python benchmarks/conv.py` on {datetime.date.today().isoformat()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores).",
        "Two torch-built nets with seeded random weights (BatchNorm with random running statistics, folded by the "
        "exporter), exported by torch.onnx's dynamo exporter at opset 21: a ResNet-style one (13 Conv layers, 5 "
        "residual blocks) and a plain VGG-style chain (7 Conv -> ReLU), each with a Linear head; images: seeded "
        f"Gaussian noise, 1x3x{SIDE}x{SIDE}, 32 for calibration, 64 held out (no image data or model can be "
        "downloaded here, so these are distortion measurements against FP32, not accuracy on a task).",
        f"Latency: ORT CPU EP, default optimization level, batch 1, median of {args.rounds} interleaved rounds; ratio "
        "to FP32 in the same run. TensorRT: TensorRT-RTX ahead-of-time build on this CPU-only machine.",
    ]
    for residual in (True, False):
        name = "resnet" if residual else "plain"
        lines += ["", f"## {'ResNet-style' if residual else 'plain chain'}", ""]
        lines += _measure(build_net(work / f"{name}.onnx", residual), work / name, npz, held, args.rounds)
    print("\n".join(lines))
    write_section("conv", lines)


def _measure(src: Path, work: Path, npz: Path, held: np.ndarray, rounds: int) -> list[str]:
    import onnxruntime as ort

    from ptqonnx.cli import main as cli
    from ptqonnx.runtime.bench import interleaved
    from ptqonnx.runtime.tensorrt import build_engine, tensorrt_available

    work.mkdir(parents=True, exist_ok=True)

    variants = {
        "rtn, weight-only (Conv INT8 per channel; Linear head float)": ["--method", "rtn", "--keep-lm-head"],
        "rtn --w8a8 --target ort-cpu": ["--method", "rtn", "--w8a8", "--target", "ort-cpu", "--calib-npz", str(npz)],
        "rtn --w8a8 (target tensorrt)": ["--method", "rtn", "--w8a8", "--calib-npz", str(npz)],
        "rtn --w8a8 --w8a8-type fp8 (target tensorrt)": ["--method", "rtn", "--w8a8", "--w8a8-type", "fp8",
                                                         "--calib-npz", str(npz)],
    }
    files = {"FP32": src}
    for i, (label, flags) in enumerate(variants.items()):
        out = work / f"v{i}.onnx"
        logger.info("compiling %s", label)
        assert cli(["-q", "compile", str(src), *flags, "-o", str(out), "--force"]) == 0, label
        files[label] = out
    files["ORT quantize_static (QDQ, per-channel, uint8 activations)"] = ort_static(src, npz, work / "ort_static.onnx")

    sessions = {label: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for label, f in files.items()}
    ref = np.concatenate([sessions["FP32"].run(None, {"image": held[i:i + 1]})[0] for i in range(len(held))])
    rows = []
    x1 = held[:1]
    lat = interleaved({label: (lambda s=s: s.run(None, {"image": x1})) for label, s in sessions.items()},
                      rounds=rounds, baseline="FP32")
    for label, sess in sessions.items():
        y = np.concatenate([sess.run(None, {"image": held[i:i + 1]})[0] for i in range(len(held))])
        top1 = float((y.argmax(1) == ref.argmax(1)).mean())
        rel = float(np.mean(np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)))
        built = "-"
        if tensorrt_available():
            b = build_engine(files[label])
            why = " ".join(str(e) for e in (b.parse.errors + b.errors)[:1])
            built = "builds" if b.ok else f"fails: {why[:110]}..."
        rows.append(f"| {label} | {top1 * 100:.1f} % | {rel:.4f} | {lat.ratios[label]:.2f}x "
                    f"({lat.medians[label]:.1f} ms) | {size(files[label]) / 2**20:.2f} | {built} |")
    return ["| model | top-1 = FP32's | logits rel. error | ORT CPU latency | MiB | TensorRT-RTX |",
            "|---|---:|---:|---:|---:|---|", *rows]


if __name__ == "__main__":
    main()
