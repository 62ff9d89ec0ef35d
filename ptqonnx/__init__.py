"""ptqonnx: an ONNX graph-rewriting post-training quantization compiler.

`import ptqonnx` stays light: torch, onnxruntime, transformers and tensorrt are imported where used.
"""

from __future__ import annotations

from ptqonnx.errors import UserError

__all__ = ["UserError", "__version__"]
__version__ = "0.1.0"
