"""ptqonnx: an ONNX graph-rewriting post-training quantization compiler.

    import ptqonnx

    model = ptqonnx.quantize("model.onnx", ptqonnx.GptqConfig(bits=4, group_size=128),
                             calibration=ptqonnx.CalibConfig(text="valid.txt", samples=32))
    ptqonnx.save(model, "model.gptq.onnx")

`config` is one stage config, a list of them (`[AwqConfig(), GptqConfig()]`), a `Recipe`, or
`recipe_for("awq+gptq", bits=4, keep_lm_head=True)` (what the CLI's flags build); `load_recipe(path)` reads a
YAML recipe. `import ptqonnx` stays light: torch, onnxruntime, transformers and tensorrt are imported where
used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptqonnx.config import (
    AwqConfig, CalibConfig, ConfigError, GptqConfig, Recipe, RtnConfig, SmoothQuantConfig, StageConfig, W8A8Config,
    WeightStage,
)
from ptqonnx.errors import UserError
from ptqonnx.registry import recipe_for, register_method

__version__ = "0.2.0"

__all__ = [
    "AwqConfig", "CalibConfig", "ConfigError", "GptqConfig", "Recipe", "RtnConfig", "SmoothQuantConfig",
    "StageConfig", "UserError", "W8A8Config", "WeightStage", "__version__", "compile", "load_recipe", "quantize",
    "recipe_for", "register_method", "save",
]


def quantize(model: Any, config: Any, calibration: Any = None, **kwargs: Any):
    """Quantize `model` (a path, an `onnx.ModelProto` or an `onnx_ir.Model`; never modified) and return the
    rewritten `onnx_ir.Model`. See `ptqonnx.pipeline.quantize` for the arguments."""
    from ptqonnx.pipeline import quantize as _quantize

    return _quantize(model, config, calibration, **kwargs)


def save(model: Any, path: str | Path, *, verify: bool = True) -> Path:
    """Check (onnx.checker, and an ONNX Runtime session unless `verify=False`) and write `model` atomically;
    weights go to `PATH.data` beside it when they pass 1.8 GB. Returns the path."""
    from ptqonnx.io import save_model

    out = Path(path)
    save_model(model, out, verify_ort=verify)
    return out


def compile(input_path: str | Path, output_path: str | Path | None, config: Any, **kwargs: Any):  # noqa: A001
    """File to file, as `ptqonnx compile`: returns the `CompileReport` (see `ptqonnx.pipeline.compile_model`)."""
    from ptqonnx.pipeline import compile_model

    return compile_model(input_path, output_path, config, **kwargs)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a YAML recipe (`ptqonnx.recipe`)."""
    from ptqonnx.recipe import load_recipe as _load

    return _load(path)
