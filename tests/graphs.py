"""Tiny test graphs in ONNX text with seeded initializers, and ORT helpers shared by the tests."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


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


def int8_matmul_model(k: int = 256, n: int = 64) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One static W8A8 MatMul (QDQ, full-range int8 weights per column) and an input whose products with the
    weights mostly have one sign (rows of W share a sign; outlier channels do this): the case where ORT's x86
    u8s8 kernel without VNNI saturates its int16 pair sums."""
    rng = np.random.default_rng(0)
    sign = np.where(rng.random((k, 1)) < 0.5, -1, 1)
    w = (sign * rng.integers(64, 128, (k, n))).astype(np.int8)
    inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.float32(0.1), "xs"),
             numpy_helper.from_array(np.int8(0), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = np.repeat(sign.T.astype(np.float32) * 12.7, 4, axis=0)
    return model, {"x": x}


@functools.cache
def ort_int8_kernel_saturates() -> bool:
    """Whether ORT's default fused int8 GEMM on this CPU misses `int8_matmul_model`'s QDQ outputs (x86 without
    VNNI: its u8s8 kernel saturates int16 pair sums)."""
    from ptqonnx.runtime.ort import optimization_gap

    model, feeds = int8_matmul_model()
    return optimization_gap(model.SerializeToString(), [feeds]) > 1e-3


def run_optimized(path: Path, feeds: dict[str, np.ndarray]):
    """Outputs at ORT_ENABLE_ALL, where a static W8A8 model's QDQ MatMuls run in ORT's fused int8 kernels; on a
    CPU where those saturate (`ort_int8_kernel_saturates`) in ORT's exact kernel instead, or, where ORT fails
    on the graph with it (int8 activations, ORT 1.32), with the QDQ fusions off: the outputs ORT computes on a
    CPU with VNNI."""
    if not ort_int8_kernel_saturates():
        return run(path, feeds, "all")
    from ptqonnx.runtime.ort import PRECISE_INT8, UNFUSED_INT8

    try:
        return run(path, feeds, "all", PRECISE_INT8)
    except Exception:  # noqa: BLE001 - see runtime/ort.py
        return run(path, feeds, "all", UNFUSED_INT8)


class SkewedSession:
    """An ORT session whose outputs are 1.5x the real ones (a simulated fusion that miscomputes)."""

    def __init__(self, sess):
        self.sess = sess

    def get_inputs(self):
        return self.sess.get_inputs()

    def run(self, names, feed):
        return [o * 1.5 for o in self.sess.run(names, feed)]


def signature(path: Path) -> list[tuple[str, int, int]]:
    """Every graph input and output: (name, elem type, rank)."""
    m = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in (*m.graph.input, *m.graph.output)]


def compile_cli(src: Path, out: Path, *flags: str) -> Path:
    """`ptqonnx -q compile src -o out flags...`, checking that the interface is kept."""
    from ptqonnx.cli import main

    assert main(["-q", "compile", str(src), "-o", str(out), *flags]) == 0
    assert signature(out) == signature(src)  # every input/output name, dtype and rank kept
    return out


def held_out_ids(folder: Path) -> np.ndarray:
    """3 x 32 token ids of the tiny corpus (seed 2, not the calibration text's) by the tokenizer in `folder`."""
    from ptqonnx.models.tiny import tiny_corpus
    from ptqonnx.text import load_tokenizer

    ids = load_tokenizer(folder).encode(" ".join(tiny_corpus(40, seed=2))).ids
    return np.array(ids[:96], np.int64).reshape(3, 32)


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def prefill_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of each row of `ids` through the prefill (an empty cache)."""
    from ptqonnx.runtime.bench import ModelFeeds
    from ptqonnx.runtime.ort import make_session

    sess = make_session(path)
    feeds = ModelFeeds(sess)
    return np.concatenate([sess.run(["logits"], feeds.build(row[None, :]))[0] for row in ids])


def decode_gap(path: Path, ids: np.ndarray) -> float:
    """Max relative difference between the prefill's logits at the last position and a one-token decode of
    that position after a prefill of the tokens before it (its cache fed back)."""
    from ptqonnx.runtime.bench import ModelFeeds
    from ptqonnx.runtime.ort import make_session

    sess = make_session(path)
    feeds = ModelFeeds(sess)
    worst = 0.0
    for row in ids:
        full = sess.run(["logits"], feeds.build(row[None, :]))[0][0, -1]
        outs = sess.run(None, feeds.build(row[None, :-1]))
        step = sess.run(["logits"], feeds.build(row[None, -1:], feeds.presents_as_past(outs)))[0][0, -1]
        worst = max(worst, float(np.abs(step - full).max() / np.abs(full).max()))
    return worst


def activations(model_path: Path, names: list[str], feeds) -> dict[str, np.ndarray]:
    """Each named value over all feeds, rows [R, K] (the float model, no graph optimizations)."""
    model = onnx.load(str(model_path))
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    runs = [sess.run(names, f) for f in feeds]
    return {n: np.concatenate([r[i].reshape(-1, r[i].shape[-1]) for r in runs]) for i, n in enumerate(names)}


def float_weights(path: Path) -> dict[str, np.ndarray]:
    """weight name -> W [N, K] of the float model: a MatMul's weight is stored [K, N], a tied LM head's table
    [N, K] behind a Transpose."""
    model = onnx.load(str(path))
    transposed = {n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    return {i.name: (a if i.name in transposed else a.T) for i in model.graph.initializer
            if i.name.endswith(".weight") and (a := numpy_helper.to_array(i).astype(np.float32)).ndim == 2}


def cnn_model(opset: int = 21, seed: int = 0, conv_transpose: bool = True) -> onnx.ModelProto:
    """A small edge CNN on images x [N, 3, 16, 16]: a 3x3 Conv with bias, a depthwise 3x3 Conv (group 8), a 1x1
    Conv, (a 1x1 ConvTranspose,) global average pooling and a Gemm classifier giving `scores` [N, 10]."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = {"w1": w(8, 3, 3, 3), "b1": w(8), "w2": w(8, 1, 3, 3), "w3": w(16, 8, 1, 1), "b3": w(16),
             "wc": w(10, 16), "bc": w(10)}
    ct = ""
    if conv_transpose:
        inits["wt"] = w(16, 16, 1, 1)
        ct = "t = ConvTranspose(h3, wt)\n        h4 = Relu(t)"
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    cnn (float[N, 3, 16, 16] x) => (float[N, 10] scores) {{
        c1 = Conv<pads=[1, 1, 1, 1], kernel_shape=[3, 3]>(x, w1, b1)
        h1 = Relu(c1)
        c2 = Conv<pads=[1, 1, 1, 1], group=8>(h1, w2)
        h2 = Relu(c2)
        c3 = Conv(h2, w3, b3)
        h3 = Relu(c3)
        {ct or "h4 = Identity(h3)"}
        p = GlobalAveragePool(h4)
        f = Flatten(p)
        scores = Gemm<transB=1>(f, wc, bc)
    }}"""
    return model_from_text(text, inits)
