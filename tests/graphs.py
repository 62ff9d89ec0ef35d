"""Tiny test graphs in ONNX text with seeded initializers, and ORT helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB_TEXT = SHARED_DATA / "wikitext-2-calib" / "valid.txt"  # calibration only
TEST_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"  # evaluation only


# multi-head attention on q, k, v [B, S, H*D] (the `heads` shape splits heads; the caller merges `a` back):
# QKᵀ, Softmax, P·V, as our exporter writes it; used inside test graphs' f-strings as {ATTENTION}
ATTENTION = """qh = Reshape(q, heads)
        qt = Transpose<perm=[0, 2, 1, 3]>(qh)
        kh = Reshape(k, heads)
        kt = Transpose<perm=[0, 2, 3, 1]>(kh)
        sc = MatMul(qt, kt)
        pr = Softmax<axis=-1>(sc)
        vh = Reshape(v, heads)
        vt = Transpose<perm=[0, 2, 1, 3]>(vh)
        a = MatMul(pr, vt)"""


def real_windows(export, n: int, chars: int = 40_000) -> list:
    """The first `n` 512-token windows of the first `chars` characters of WikiText-2 test, tokenized with the
    exported model's tokenizer (`export`: an ExportResult)."""
    from ptqonnx.text import eval_windows, load_tokenizer, read_text, tokenize

    return list(eval_windows(tokenize(read_text(TEST_TEXT)[:chars], load_tokenizer(export.out_dir)), 512, n))


def model_from_text(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, arr in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def linear_model(k: int, n: int, seed: int = 0, opset: int = 21) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x @ W with W [K, N] a seeded initializer."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[B, S, {k}] x) => (float[B, S, {n}] y) {{ y = MatMul(x, w) }}"""
    return model_from_text(text, {"w": w}), w


def run(path: Path, feeds: dict[str, np.ndarray], level: str = "all", config: dict[str, str] | None = None):
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def int8_activation_bound(x: np.ndarray, w_hat_kn: np.ndarray, block: int) -> np.ndarray:
    """Worst-case |error| of y = x @ W_hat when x is quantized to int8 per block of `block` along K
    (symmetric, scale absmax/127, as MatMulNBits accuracy_level 4 does): sum_k |W_hat[k, n]| * s_k / 2."""
    k = x.shape[-1]
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (-k) % block)])
    xb = xb.reshape(*x.shape[:-1], -1, block)
    step = np.abs(xb).max(axis=-1, keepdims=True) / 127.0
    half = np.broadcast_to(step / 2, xb.shape).reshape(*x.shape[:-1], -1)[..., :k]
    return half @ np.abs(w_hat_kn)
