"""ptqonnx.runtime.tensorrt against the real TensorRT-RTX parser and ahead-of-time builder (no GPU needed).

Skipped where tensorrt_rtx is not installed (`pip install -e ".[trt-check]"`). The graphs are
tests/test_check.py's: each records what TensorRT-RTX 1.7 does with it (`Case.trt`), and these tests hold
the parser/builder to that record, so the checker's rules and the real parser are compared on every graph.
Where they differ on purpose (a ragged last block and negative INT4 scales pass TensorRT-RTX; the checker
flags them) the test says so.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

from graphs import CALIB_TEXT, model_from_text, save
from ptqonnx.check import check_model, errors, format_findings
from ptqonnx.runtime.tensorrt import ShapeRange, build_engine, default_profile, parse_onnx, tensorrt_available
from test_check import ACT8, CASES, COMPLIANT, S8, W8, Case, _neg, linear

pytestmark = pytest.mark.skipif(not tensorrt_available(), reason="tensorrt_rtx not installed (extra trt-check)")



def _file(tmp_path: Path, graph, name: str = "m.onnx") -> Path:
    return save(model_from_text(*graph), tmp_path / name)


@pytest.mark.parametrize("case", [c for c in CASES if c.target == "tensorrt"], ids=lambda c: c.id)
def test_tensorrt_rtx_does_what_the_case_records(tmp_path, case: Case):
    result = build_engine(_file(tmp_path, case.graph))
    outcome, _, text = case.trt.partition(": ")
    if outcome == "builds":
        assert result.ok, result.parse.errors + result.errors
    elif outcome == "parse-error":
        assert not result.parse.ok and any(text in e for e in result.parse.errors), result.parse.errors
    else:
        assert result.parse.ok and not result.ok and any(text in e for e in result.errors), result.errors


@pytest.mark.parametrize("name", [n for n, (_, t) in COMPLIANT.items() if "tensorrt" in t])
def test_compliant_graphs_build(tmp_path, name):
    graph = COMPLIANT[name][0]
    assert check_model(ir.from_proto(model_from_text(*graph)), "tensorrt") == []
    result = build_engine(_file(tmp_path, graph), tmp_path / "out" / "m.plan")
    assert result.ok, result.parse.errors + result.errors
    plan = tmp_path / "out" / "m.plan"
    assert result.plan_path == plan and plan.stat().st_size == result.plan_bytes > 0
    assert [p.name for p in plan.parent.iterdir()] == ["m.plan"]  # no temporary file left behind
    (name_x, (_, _, k)), = result.parse.inputs  # x [B, S, K]: batch and sequence dynamic
    assert result.profile == {name_x: ShapeRange((1, 1, k), (1, 128, k), (4, 512, k))}


def test_negative_scale_is_refused_by_the_parser_at_the_node_the_checker_names(tmp_path):
    graph = linear(64, 32, W8, _neg(S8), act=ACT8)
    parsed = parse_onnx(_file(tmp_path, graph))
    assert not parsed.ok
    assert parsed.errors[0].startswith("w_dq (DequantizeLinear): ")
    assert "Scale coefficients must all be positive" in parsed.errors[0]
    assert [f.node for f in check_model(ir.from_proto(model_from_text(*graph)), "tensorrt")] == ["w_dq"]
    assert not build_engine(_file(tmp_path, graph), tmp_path / "m.plan").ok and not (tmp_path / "m.plan").exists()


def test_ragged_block_passes_tensorrt_but_not_the_checker(tmp_path):
    """K=192 with block 128: ONNX means blocks of 128 and 64; TensorRT-RTX takes the block from the shapes
    (192 / 2 scales = 96) and builds it without a word: only the checker catches it. (When the scale count
    does not divide K, e.g. 320 / 3, the parser refuses: case block-ragged-refused.)"""
    case = next(c for c in CASES if c.id == "block-ragged")
    assert build_engine(_file(tmp_path, case.graph)).ok
    findings = check_model(ir.from_proto(model_from_text(*case.graph)), "tensorrt")
    assert [f.rule for f in errors(findings)] == ["trt-block-ragged"]


def test_profiles_and_compute_capabilities(tmp_path):
    path = _file(tmp_path, COMPLIANT["int8 per-channel weight + per-tensor activation"][0])
    r = build_engine(path, profiles={"x": ShapeRange((1, 1, 64), (2, 8, 64), (2, 16, 64))},
                     compute_capabilities=["SM86", "sm89"])
    assert r.ok and r.profile["x"].max == (2, 16, 64)
    from ptqonnx.errors import UserError

    with pytest.raises(UserError, match="not inputs of the network"):
        build_engine(path, profiles={"y": ShapeRange((1,), (1,), (1,))})
    with pytest.raises(UserError, match="unknown compute capability"):
        build_engine(path, compute_capabilities=["SM90"])
    with pytest.raises(UserError, match="model file not found"):
        parse_onnx(tmp_path / "missing.onnx")


def test_default_profile():
    prof = default_profile([("input_ids", (-1, -1)), ("past", (-1, 4, -1, 16)), ("static", (1, 8))],
                           batch=(1, 2, 8), sequence=(1, 64, 256))
    assert prof == {"input_ids": ShapeRange((1, 1), (2, 64), (8, 256)),
                    "past": ShapeRange((1, 4, 1, 16), (2, 4, 64, 16), (8, 4, 256, 16))}


@pytest.mark.skipif(not CALIB_TEXT.is_file(), reason="calibration text not found")
def test_tiny_llama_compile_outputs(tmp_path, tiny_export):
    """Real `ptqonnx compile` outputs of the tiny LLaMA: the checker is sound where the parser can tell (no
    checker error -> it parses and builds; a parser refusal -> the checker has an error)."""
    from ptqonnx.cli import main

    calib = ["--calib-text", CALIB_TEXT, "--calib-samples", "4", "--calib-seq-len", "64"]
    variants = {
        "w8a8-tensorrt": ["--method", "rtn", "--w8a8", *calib],
        "w8a8-ort-cpu": ["--method", "rtn", "--w8a8", "--target", "ort-cpu", *calib],
        "qdq-int4": ["--method", "rtn", "--format", "qdq"],
        "qdq-int4-positive": ["--method", "rtn", "--format", "qdq", "--scales", "positive"],
        "qdq-int4-asym": ["--method", "rtn", "--format", "qdq", "--asym"],
        "matmulnbits": ["--method", "rtn"],
        "w8a8-fp8-tensorrt": ["--method", "smoothquant", "--w8a8", "--w8a8-type", "fp8", *calib],
        "weight-only-tensorrt-rtn": ["--method", "rtn", "--target", "tensorrt"],
        "weight-only-tensorrt-gptq": ["--method", "gptq", "--target", "tensorrt", *calib],
    }
    report = {}
    for name, flags in variants.items():
        out = tmp_path / f"{name}.onnx"
        assert main(["-q", "compile", str(tiny_export / "model.onnx"), *map(str, flags), "-o", str(out)]) == 0
        findings = check_model(ir.load(str(out)), "tensorrt")
        built = build_engine(out)
        report[name] = (built.parse.errors[:1] + built.errors[:1], sorted({f.rule for f in errors(findings)}))
        if not errors(findings):
            assert built.ok, (name, built.parse.errors, built.errors)
        if not built.parse.ok:
            assert errors(findings), (name, built.parse.errors, format_findings(findings))
    w8a8 = ir.load(str(tmp_path / "w8a8-tensorrt.onnx"))
    weight_scales = [node.inputs[1].const_value.numpy() for node in w8a8.graph if node.op_type == "DequantizeLinear"
                     and node.inputs[0].const_value is not None]
    assert weight_scales and all((s >= 0).all() for s in weight_scales)  # --target tensorrt: positive grid
    # W8A8 for TensorRT passes the checker, parses and builds (the signed grid's negative scales were refused
    # at the first weight DequantizeLinear: "Scale coefficients must all be positive"); the INT4 QDQ file with
    # the signed grid builds too, since TensorRT-RTX 1.7 lets INT4 through while NvInfer.h requires positive
    assert report["w8a8-tensorrt"] == ((), []), report["w8a8-tensorrt"]
    assert report["qdq-int4-positive"] == ((), []), report["qdq-int4-positive"]
    for name in ("w8a8-fp8-tensorrt", "weight-only-tensorrt-rtn", "weight-only-tensorrt-gptq"):  # nothing to flag
        assert report[name] == ((), []) and check_model(ir.load(str(tmp_path / f"{name}.onnx")), "tensorrt") == []
    assert "Non-zero zero point is not supported" in report["w8a8-ort-cpu"][0][0]
    assert {"trt-qdq-type", "trt-zero-point"} <= set(report["w8a8-ort-cpu"][1])
    assert "Failed to import initializer" in report["qdq-int4-asym"][0][0]
    assert report["matmulnbits"][1] == ["trt-domain"]
    assert "MatMulNBits" in report["matmulnbits"][0][0]


def test_check_and_build_engine_commands(tmp_path, capsys):
    """`ptqonnx check --target tensorrt --build` runs the rules and TensorRT-RTX; `build-engine` writes the plan
    atomically, and a model TensorRT cannot parse is one error line (exit 2) with nothing written."""
    from ptqonnx.cli import main

    good = _file(tmp_path, COMPLIANT["int8 per-channel weight + per-tensor activation"][0], "good.onnx")
    bad = _file(tmp_path, linear(64, 32, W8, _neg(S8), act=ACT8), "bad.onnx")
    assert main(["check", str(good), "--target", "tensorrt", "--build"]) == 0
    assert "TensorRT-RTX parse and ahead-of-time build: ok" in capsys.readouterr().out
    assert main(["check", str(bad), "--target", "tensorrt"]) == 1
    out = capsys.readouterr().out
    assert "error trt-scale-positive at w_dq" in out and "Scale coefficients must all be positive" in out
    assert main(["build-engine", str(good), "-o", str(tmp_path / "e" / "good.plan"), "--sequence", "1,8,64"]) == 0
    assert (tmp_path / "e" / "good.plan").stat().st_size > 0 and "built" in capsys.readouterr().out
    assert main(["build-engine", str(bad), "-o", str(tmp_path / "bad.plan")]) == 2
    assert "TensorRT-RTX could not parse" in capsys.readouterr().err and not (tmp_path / "bad.plan").exists()
