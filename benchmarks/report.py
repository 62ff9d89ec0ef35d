"""The README's example of `compile --report DIR`: SmolLM2-135M compiled as the report is meant to be read,
written to benchmarks/results/report_smollm2/ (report.md, report.json, plots).

    python benchmarks/report.py [--work benchmarks/work] [--model PATH] [--calib 32]

The compile is `--rotate --w8a8` (R1+R2+R4 rotation, INT8 weights per channel, static per-tensor INT8
activations, TensorRT form): the case whose per-layer error and outlier profile say most — the input
outliers that rotation removes, and which layers still lose most under static activations.
Calibration: 32 windows of the shared WikiText-2 validation text; the report's measurements: 4 more
windows drawn with the next seed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, HERE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=HERE / "work", help="where the export and the output go")
    p.add_argument("--model", type=Path, help="an existing SmolLM2 model.onnx (default: export it into --work)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows")
    args = p.parse_args()
    from ptqonnx.cli import main as cli

    model = args.model or args.work / "smollm2" / "model.onnx"
    if not model.is_file():
        assert cli(["export", "smollm2", "-o", str(model.parent), "--no-kv-cache"]) == 0
    out = HERE / "results" / "report_smollm2"
    if out.exists():
        shutil.rmtree(out)
    args.work.mkdir(parents=True, exist_ok=True)
    code = cli(["compile", str(model), "-o", str(args.work / "smollm2.rotate_w8a8.onnx"), "--rotate", "--w8a8",
                "--calib-text", str(CALIB_TEXT), "--calib-samples", str(args.calib), "--force", "--report", str(out)])
    sys.exit(code)


if __name__ == "__main__":
    main()
