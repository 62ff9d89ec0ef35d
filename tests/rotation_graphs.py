"""Tiny pre-norm decoders in ONNX text for the rotation tests: every norm / writer / head form the passes accept,
and the ones they must refuse. Activations are 2-D [S, H] (Gemm needs it), weights seeded."""

from __future__ import annotations

import re

import numpy as np
import onnx

from graphs import model_from_text


def _norm(kind: str, x: str, g: str, out: str) -> list[str]:
    p = f"{out}_"
    if kind == "rms":  # the exporter's form
        return [f"{p}sq = Pow({x}, two)", f"{p}ms = ReduceMean<keepdims=1>({p}sq, last)", f"{p}e = Add({p}ms, eps)",
                f"{p}rt = Sqrt({p}e)", f"{p}inv = Reciprocal({p}rt)", f"{p}n = Mul({x}, {p}inv)",
                f"{out} = Mul({g}, {p}n)"]
    if kind == "rms_div":
        return [f"{p}sq = Mul({x}, {x})", f"{p}ms = ReduceMean<keepdims=1>({p}sq, last)", f"{p}e = Add(eps, {p}ms)",
                f"{p}rt = Sqrt({p}e)", f"{p}n = Div({x}, {p}rt)", f"{out} = Mul({p}n, {g})"]
    if kind == "nogamma":
        return [f"{p}sq = Pow({x}, two)", f"{p}ms = ReduceMean<keepdims=1>({p}sq, last)", f"{p}e = Add({p}ms, eps)",
                f"{p}rt = Sqrt({p}e)", f"{p}inv = Reciprocal({p}rt)", f"{out} = Mul({x}, {p}inv)"]
    if kind == "fused":
        return [f"{out} = RMSNormalization<axis=-1, epsilon=0.00001>({x}, {g})"]
    if kind == "layer":
        return [f"{out} = LayerNormalization<axis=-1, epsilon=0.00001>({x}, {g}, beta)"]
    if kind == "layer_decomposed":
        return [f"{p}mu = ReduceMean<keepdims=1>({x}, last)", f"{p}c = Sub({x}, {p}mu)", f"{p}sq = Pow({p}c, two)",
                f"{p}ms = ReduceMean<keepdims=1>({p}sq, last)", f"{p}e = Add({p}ms, eps)", f"{p}rt = Sqrt({p}e)",
                f"{p}n = Div({p}c, {p}rt)", f"{out} = Mul({p}n, {g})"]
    raise ValueError(kind)


def decoder(norm: str = "rms", *, hidden: int = 20, inter: int = 36, vocab: int = 11, head: str = "tied_transpose",
            gamma_input: bool = False, stream_relu: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Gather → [norm → MatMul up → Relu → MatMul down + b] → Add → [norm → Gemm up → SiLU →
    Gemm(transB) down with C] → Add → final norm → LM head (`tied_transpose`: MatMul(x, Transpose(E)),
    `tied_gemm`: Gemm(x, E, transB=1), `untied`)."""
    h, i, v = hidden, inter, vocab
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    inits = {
        "E": rng.standard_normal((v, h)).astype(np.float32), "Wu1": w(h, i), "Wd1": w(i, h),
        "bd1": rng.standard_normal(h).astype(np.float32), "Wu2": w(h, i), "Wd2t": w(h, i),
        "bd2": rng.standard_normal(h).astype(np.float32), "Wh": w(h, v),
        "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "last": np.array([-1], np.int64),
        "beta": (0.1 * rng.standard_normal(h)).astype(np.float32),
    }
    for g in ("g1", "g2", "gf"):
        inits[g] = (1.0 + 0.3 * rng.standard_normal(h)).astype(np.float32)
    inits["g1"][0] = -0.5  # a negative γ entry: folding must still be exact
    lines = ["x0 = Gather(E, ids)"]
    if stream_relu:
        lines.append("x0r = Relu(x0)")
    lines += _norm(norm, "x0", "g1", "n1")
    lines += ["u1 = MatMul(n1, Wu1)", "a1 = Relu(u1)", "d1 = MatMul(a1, Wd1)", "d1b = Add(d1, bd1)",
              "x1 = Add(x0, d1b)"]
    lines += _norm(norm, "x1", "g2", "n2")
    lines += ["u2 = Gemm(n2, Wu2)", "s2 = Sigmoid(u2)", "a2 = Mul(u2, s2)", "d2 = Gemm<transB=1>(a2, Wd2t, bd2)",
              "x2 = Add(d2, x1)"]
    lines += _norm(norm, "x2", "gf", "nf")
    if head == "tied_transpose":
        lines += ["Et = Transpose<perm=[1, 0]>(E)", "logits = MatMul(nf, Et)"]
    elif head == "tied_gemm":
        lines += ["logits = Gemm<transB=1>(nf, E)"]
    else:
        lines += ["logits = MatMul(nf, Wh)"]
    outputs = f"float[S, {v}] logits" + (f", float[S, {h}] x0r" if stream_relu else "")
    inputs = "int64[S] ids" + (f", float[{h}] g1" if gamma_input else "")
    if gamma_input:
        del inits["g1"]
    opset = 23 if norm == "fused" else 21
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g ({inputs}) => ({outputs}) {{
        {chr(10).join(lines)}
    }}"""
    tokens = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", chr(10).join(lines)))
    return model_from_text(text, {name: arr for name, arr in inits.items() if name in tokens})


def feeds(vocab: int = 11, seq: int = 9, seed: int = 0, gamma_input: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"ids": rng.integers(0, vocab, size=seq).astype(np.int64)}
    if gamma_input:
        out["g1"] = rng.standard_normal(20).astype(np.float32)
    return out
