"""Property-based tests (hypothesis) over small random graphs — MatMul/Gemm with and without transB and bias,
RMSNorm / LayerNormalization, residual adds, shared weights, odd K — for every method and format: never an
unexpected exception (a refusal is a one-line UserError), every output passes onnx.checker (inside save) and
runs in ONNX Runtime, and stays within a bound of the float model's output.

Bounds: relative error ||y_q - y|| / ||y|| on the calibration-like probe input. Gaussian weights lose about
10 % per layer at 4 bits (g16-g32, measured on these graphs) and at most three linear layers are chained
with norms in between: 0.5. 8-bit weights (and W8A8's static int8 activations): 0.15.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ptqonnx
from graphs import run
from ptqonnx.errors import UserError

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
K_SIZES = (16, 20, 36, 48, 64, 72, 100)


@st.composite
def graphs(draw):
    """(ModelProto, K): x [S, K] -> a few layers -> y, seeded initializers."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    k = draw(st.sampled_from(K_SIZES))
    nodes, inits = [], []
    h, width, idx = "x", k, 0

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def fresh(prefix):
        nonlocal idx
        idx += 1
        return f"{prefix}{idx}"

    shared = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["matmul", "gemm", "rmsnorm_linear", "layernorm_linear", "residual", "shared"]))
        if kind in ("rmsnorm_linear", "layernorm_linear"):
            out = fresh("n")
            g = init(fresh("gamma"), rng.uniform(0.5, 1.5, width))
            if kind == "layernorm_linear":
                b = init(fresh("beta"), rng.normal(0, 0.1, width))
                nodes.append(helper.make_node("LayerNormalization", [h, g, b], [out], axis=-1, epsilon=1e-5))
            else:
                sq, mean, eps, rs, nrm = (fresh(p) for p in ("sq", "mean", "eps", "rs", "nrm"))
                e, two = init(fresh("e"), np.array(1e-5)), init(fresh("two"), np.array(2.0))
                axes = fresh("axes")
                inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                nodes += [helper.make_node("Pow", [h, two], [sq]),
                          helper.make_node("ReduceMean", [sq, axes], [mean], keepdims=1),
                          helper.make_node("Add", [mean, e], [eps]), helper.make_node("Sqrt", [eps], [rs]),
                          helper.make_node("Div", [h, rs], [nrm]), helper.make_node("Mul", [nrm, g], [out])]
            h = out
            kind = "matmul"
        n = width if kind == "residual" else draw(st.sampled_from(K_SIZES))
        w = rng.standard_normal((width, n)) / np.sqrt(width)
        out = fresh("y")
        if kind == "gemm":
            trans_b = draw(st.booleans())
            wname = init(fresh("w"), w.T if trans_b else w)
            ins = [h, wname] + ([init(fresh("c"), rng.normal(0, 0.1, n))] if draw(st.booleans()) else [])
            nodes.append(helper.make_node("Gemm", ins, [out], transB=int(trans_b)))
        elif kind == "shared" and shared is not None and shared[1] == width:
            nodes.append(helper.make_node("MatMul", [h, shared[0]], [out]))  # the same initializer read twice
            n = shared[2]
        else:
            wname = init(fresh("w"), w)
            shared = (wname, width, n)
            mm = out if not draw(st.booleans()) else fresh("mm")
            nodes.append(helper.make_node("MatMul", [h, wname], [mm]))
            if mm != out:
                nodes.append(helper.make_node("Add", [mm, init(fresh("b"), rng.normal(0, 0.1, n))], [out]))
        if kind == "residual":
            res = fresh("r")
            nodes.append(helper.make_node("Add", [h, out], [res]))
            out = res
        h, width = out, n
    nodes.append(helper.make_node("Neg", [h], ["y"]))  # not an LM head: W8A8 quantizes every layer
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model, k, seed


def _feeds(k: int, seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed + 1)
    return [{"x": rng.standard_normal((24, k)).astype(np.float32)} for _ in range(n)]


def _check(tmp_path, model, k, seed, config, bound):
    feeds = _feeds(k, seed)
    try:
        q = ptqonnx.quantize(model, config, calibration=feeds)
    except UserError as exc:  # a refusal is allowed: one line, and only for reasons a user can act on
        assert "\n" not in str(exc) and str(exc)
        return
    path = tmp_path / "q.onnx"
    ptqonnx.save(q, path)  # onnx.checker full check + ORT at ENABLE_ALL vs DISABLE_ALL
    src = tmp_path / "f.onnx"
    onnx.save(model, str(src))
    x = _feeds(k, seed + 7, 1)[0]
    (ref,) = run(src, x, "disable")
    (got,) = run(path, x, "all", {"session.qdq_matmulnbits_accuracy_level": "0"})
    err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    assert np.isfinite(got).all() and err < bound, (err, config)


WEIGHT_ONLY = [
    ("rtn", dict(bits=4, group_size=16)), ("rtn", dict(bits=4, group_size=32, symmetric=False, format="qdq")),
    ("rtn", dict(bits=8, group_size=0)), ("gptq", dict(bits=4, group_size=16)),
    ("gptq", dict(bits=4, group_size=16, sequential=False, format="qdq")), ("awq", dict(bits=4, group_size=16)),
    ("awq+gptq", dict(bits=4, group_size=16, symmetric=False)),
]


@pytest.mark.parametrize("method,fields", WEIGHT_ONLY, ids=[f"{m}-{f}" for m, f in WEIGHT_ONLY])
def test_weight_only_methods_on_random_graphs(tmp_path, method, fields):
    bound = 0.15 if fields["bits"] == 8 else 0.5

    @SETTINGS
    @given(graphs())
    def prop(g):
        model, k, seed = g
        _check(tmp_path, model, k, seed, ptqonnx.recipe_for(method, **fields), bound)

    prop()


W8A8 = [
    ("rtn", dict()), ("smoothquant", dict(target="ort-cpu")), ("smoothquant", dict(alpha="auto")),
    ("smoothquant", dict(target="ort-cpu", act_scales="dynamic")),
]


@pytest.mark.parametrize("method,fields", W8A8, ids=[f"{m}-{f}" for m, f in W8A8])
def test_w8a8_on_random_graphs(tmp_path, method, fields):
    @SETTINGS
    @given(graphs())
    def prop(g):
        model, k, seed = g
        _check(tmp_path, model, k, seed, ptqonnx.recipe_for(method, w8a8=True, **fields), 0.15)

    prop()
