"""Model files in and out: load an ONNX model for rewriting, and save one checked and atomically.

The input file is only ever read. The output is written into a temporary folder beside the destination,
checked there (onnx.checker, then an ONNX Runtime session at its default optimization level), and only
then moved into place; a failure anywhere leaves no partial output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from ptqonnx.errors import UserError

__all__ = ["EXTERNAL_DATA_THRESHOLD", "file_bytes", "load_model", "save_model"]

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers above which weights go to a .data file


def file_bytes(path: Path) -> int:
    """The model file plus any external-data files next to it that it references."""
    total = path.stat().st_size
    for data in path.parent.glob(path.name + ".data"):
        total += data.stat().st_size
    return total


def load_model(path: str | Path) -> ir.Model:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}; pass the path of an .onnx file")
    try:
        return ir.load(str(p))
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for non-ONNX bytes
        raise UserError(f"{p} is not a readable ONNX model ({type(exc).__name__}); pass an .onnx file") from None


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, output: Path, *, verify_ort: bool = True) -> None:
    """Check and write `model` to `output` atomically (temp folder beside it, then rename)."""
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp = tmpdir / output.name
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        ir.save(model, str(tmp), external_data=f"{output.name}.data" if external else None)
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise RuntimeError(f"internal error: the emitted model fails onnx.checker: {first}") from exc
        if verify_ort:
            from ptqonnx.runtime.ort import make_session

            make_session(tmp)  # raises UserError with ORT's first line if it cannot load
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, model last
            os.replace(f, output.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
