"""fp16 models in, fp16 models out: the tiny LLaMA exported in float16 compiles with every method and stage.

`ptqonnx export --dtype float16` casts the weights before tracing, so the graph is what transformers computes
in fp16 (its RMSNorm upcasts to float32 inside: Cast -> norm -> Cast -> Mul γ, which the residual-stream walk
sees through for --rotate). Each method's fp16 output must keep the interface (fp16 logits), pass the ONNX
checker and ORT's default level (the compile's own gate), and lose no more against the float32 model than
the same method's float32 output does: rel(q16) <= 1.02 rel(q32) + 0.002 (relative Frobenius error of the
logits against the float32 model on held-out windows). The slack: the fp16 float model itself is 1-2e-3 from
the fp32 one, and its activations round at 2^-11, far below the 4-bit/8-bit grids' error. Measured (e16 /
e32): rtn 0.3332/0.3334, qdq 0.3335/0.3339, gptq 0.2931/0.2927, awq 0.3407/0.3402, smoothquant tensorrt
0.0513/0.0518, ort-cpu 0.0534/0.0526, rotate+rtn 0.3478/0.3480, rotate+gptq 0.2913/0.2966.

Exact rewrites (SmoothQuant/AWQ folds, rotations) re-round every weight they touch in fp16, so their fold
checks allow LOW_FLOAT_FACTOR x the model's own arithmetic error (against its float32 twin) instead of the
float32 1e-4; a wrong fold is still refused, and one that overflows fp16 is a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ptqonnx.errors import UserError
from ptqonnx.models.tiny import tiny_corpus
from ptqonnx.runtime.ort import make_session
from graphs import run_optimized

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

CALIB = ["--calib-samples", "8", "--calib-seq-len", "32"]
METHODS = {
    "rtn": ["--method", "rtn"],
    "rtn-qdq": ["--method", "rtn", "--format", "qdq"],
    "gptq": ["--method", "gptq"],
    "awq": ["--method", "awq", "--awq-grid", "5"],
    "smoothquant-tensorrt": ["--method", "smoothquant", "--w8a8"],
    "smoothquant-ort-cpu": ["--method", "smoothquant", "--w8a8", "--target", "ort-cpu"],
    "rotate-rtn": ["--method", "rtn", "--rotate"],
    "rotate-gptq": ["--method", "gptq", "--rotate"],
}
_CALIBRATED = ("gptq", "awq", "smoothquant")


@pytest.fixture(scope="module")
def exports(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny LLaMA exported in float32 and float16 (no KV variant): dtype -> model.onnx."""
    from ptqonnx.models.export import export_causal_lm

    return {d: export_causal_lm(str(tiny_hf), tmp_path_factory.mktemp(f"tiny_{d}"), kv_cache=False, dtype=d).model_path
            for d in ("float32", "float16")}


def _ids(model: Path) -> np.ndarray:
    from ptqonnx.text import load_tokenizer

    ids = load_tokenizer(model.parent).encode(" ".join(tiny_corpus(40, seed=2))).ids
    return np.array(ids[:96], np.int64).reshape(3, 32)


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    names = [o.name for o in make_session(path).get_outputs()]
    return run_optimized(path, {"input_ids": ids})[names.index("logits")].astype(np.float64)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _compile(src: Path, out: Path, flags: list[str], calib: Path) -> Path:
    from ptqonnx.cli import main

    data = ["--calib-text", str(calib), *CALIB] if any(m in flags[1] for m in _CALIBRATED) \
        else []
    assert main(["-q", "compile", str(src), "-o", str(out), *flags, *data]) == 0
    return out


def test_fp16_export_is_fp16_and_matches_the_fp32_export(exports) -> None:
    m = onnx.load(str(exports["float16"]))
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    big = [t for t in m.graph.initializer if np.prod(t.dims) >= 64 * 64]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    ids = _ids(exports["float32"])
    assert _rel(_logits(exports["float16"], ids), _logits(exports["float32"], ids)) < 1e-2


def test_bfloat16_export_is_refused_in_one_line(tiny_hf: Path, tmp_path: Path) -> None:
    from ptqonnx.models.export import export_causal_lm

    with pytest.raises(UserError, match="bfloat16 kernels.*--dtype float32 or float16"):
        export_causal_lm(str(tiny_hf), tmp_path / "bf", kv_cache=False, dtype="bfloat16")
    assert not (tmp_path / "bf").exists()


@pytest.mark.parametrize("name", list(METHODS))
def test_fp16_model_compiles_and_loses_what_fp32_loses(name: str, exports, calib_text: Path, tmp_path: Path) -> None:
    flags = METHODS[name]
    q16 = _compile(exports["float16"], tmp_path / "q16.onnx", flags, calib_text)
    q32 = _compile(exports["float32"], tmp_path / "q32.onnx", flags, calib_text)
    m = onnx.load(str(q16))
    onnx.checker.check_model(m, full_check=True)
    src = onnx.load(str(exports["float16"]), load_external_data=False)
    sig = lambda g: [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]  # noqa: E731
    assert sig(m.graph) == sig(src.graph)  # fp16 logits out, names kept
    ids = _ids(exports["float32"])
    ref = _logits(exports["float32"], ids)
    e16, e32 = _rel(_logits(q16, ids), ref), _rel(_logits(q32, ids), ref)
    assert 0 < e16 <= 1.02 * e32 + 0.002, (e16, e32)


def test_fold_check_allows_fp16_rounding_but_not_a_wrong_fold(exports, calib_text: Path, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    """The fp16 tolerance is a small multiple of the model's own error, far below what a 1 % wrong fold gives."""
    from ptqonnx.methods.folding import FOLD_TOLERANCE, model_outputs, rewrite_tolerance
    from ptqonnx.passes.fold_scales import FoldScalesPass

    model = ir.load(str(exports["float16"]))
    ids = _ids(exports["float32"])
    feeds = [{"input_ids": ids[:1]}, {"input_ids": ids[1:2]}]
    tol = rewrite_tolerance(model, feeds, model_outputs(model, feeds), FOLD_TOLERANCE, "test")
    assert FOLD_TOLERANCE < tol < 3e-2
    f32 = ir.load(str(exports["float32"]))
    assert rewrite_tolerance(f32, feeds, model_outputs(f32, feeds), FOLD_TOLERANCE, "test") == FOLD_TOLERANCE
    original = FoldScalesPass._scale_const
    monkeypatch.setattr(FoldScalesPass, "_scale_const",
                        lambda self, graph, ref, factor: original(self, graph, ref, factor * 1.05))
    from ptqonnx.cli import main

    rc = main(["-q", "compile", str(exports["float16"]), "-o", str(tmp_path / "q.onnx"),
               *METHODS["smoothquant-tensorrt"], "--calib-text", str(calib_text), *CALIB])
    assert rc != 0 and "float model changed when SmoothQuant scales were folded" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_a_rewrite_that_overflows_fp16_is_a_user_error() -> None:
    from ptqonnx.methods.folding import check_rewrite

    before = [[np.ones((2, 3), np.float16)]]
    after = [[np.array([[1, np.inf, 1], [1, 1, 1]], np.float16)]]
    with pytest.raises(UserError, match="overflows its float type.*smaller --alpha"):
        check_rewrite(before, after, 1e-2, "SmoothQuant scales were folded", 1)
    assert check_rewrite(before, [[np.full((2, 3), 1.001, np.float16)]], 1e-2, "x", 1) < 1e-2


def test_float32_twin_widens_everything_and_leaves_the_model_alone(exports) -> None:
    from ptqonnx.graph.dtype import as_float32, low_float_type

    model = ir.load(str(exports["float16"]))
    before = [(v.name, v.dtype) for n in model.graph for v in n.outputs]
    twin = as_float32(model)
    assert low_float_type(model) == ir.DataType.FLOAT16 and low_float_type(twin) is None
    assert [(v.name, v.dtype) for n in model.graph for v in n.outputs] == before  # types are not shared
    assert not any(v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) for n in twin.graph for v in n.outputs)
    assert not any(n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.FLOAT16 for n in twin.graph)


def test_a_bfloat16_model_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    from ptqonnx.cli import main

    w = numpy_helper.from_array(np.ones((64, 32), ml_dtypes.bfloat16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 32])], initializer=[w])
    src = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(src))
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computes in bfloat16" in err[0] and "float16 or float32" in err[0]
    assert not (tmp_path / "q.onnx").exists()
