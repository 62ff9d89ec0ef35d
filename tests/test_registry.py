"""The method registry and the Python API: a method added in this file alone runs from the CLI and the API;
every option the chosen method does not read is refused in one line; saved statistics are reused."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

import numpy as np
import onnx
import pytest

import ptqonnx
from graphs import linear_model, run, save
from ptqonnx.cli import main
from ptqonnx.config import WeightStage, option
from ptqonnx.errors import UserError
from ptqonnx.methods.base import MethodContext, MethodResult
from ptqonnx.numerics.quant import QuantizedWeight, num_blocks
from ptqonnx.plan import PlannedWeight
from ptqonnx.registry import _SPECS, method_spec, register_method, stage_names
from ptqonnx.report import WeightsSummary


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- a toy method, registered here and nowhere else --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SignConfig(WeightStage):
    """Sign-only: each weight becomes ±m, m = the mean |w| of its block (codes z ± 1 on a 4-bit grid)."""

    stage: ClassVar[str] = "signonly"
    shrink: float = option(1.0, "multiply each block's magnitude m by this factor", flag="--sign-shrink")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.shrink <= 1:
            raise ptqonnx.ConfigError(f"{{0}} must be in (0, 1], got {self.shrink}", self.ref("shrink"))


def _sign(w: np.ndarray, block: int, shrink: float) -> QuantizedWeight:
    n, k = w.shape
    kb = num_blocks(k, block)
    padded = np.pad(np.abs(w), ((0, 0), (0, kb * block - k))).reshape(n, kb, block)
    counts = np.minimum(block, k - np.arange(kb) * block)
    m = (padded.sum(-1) / counts * shrink).astype(np.float32)  # [N, k_blocks]
    q = np.where(w >= 0, 9, 7).astype(np.uint8)  # zero point 8: +1 / -1 steps of m
    return QuantizedWeight(q=q, scale=m, zero_point=np.full((n, kb), 8, np.uint8), bits=4, block_size=block,
                           symmetric=True)


def _sign_reference(w_nk: np.ndarray, block: int, shrink: float = 1.0) -> np.ndarray:
    qw = _sign(w_nk, block, shrink)
    idx = np.arange(w_nk.shape[1]) // block
    return np.where(w_nk >= 0, 1.0, -1.0).astype(np.float32) * qw.scale[:, idx]


@pytest.fixture
def signonly():
    @register_method(SignConfig)
    def run_sign(ctx: MethodContext, cfg: SignConfig) -> MethodResult:
        plan = {s.name: PlannedWeight(s, _sign(s.weight_nk(), cfg.group_size, cfg.shrink)) for s in ctx.sites}
        return MethodResult(WeightsSummary(cfg.stage, layers=len(plan)), plan=plan)

    yield SignConfig
    del _SPECS[SignConfig.stage]


def test_a_method_defined_in_one_file_runs_from_the_api_and_the_cli(tmp_path, capsys, signonly):
    model, w = linear_model(64, 16)
    src = save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((1, 3, 64)).astype(np.float32)
    expected = x @ _sign_reference(w.T, 32, 0.5).T
    assert "signonly" in stage_names() and method_spec("signonly").config is SignConfig

    q = ptqonnx.quantize(src, SignConfig(group_size=32, shrink=0.5))
    ptqonnx.save(q, tmp_path / "api.onnx")
    np.testing.assert_allclose(run(tmp_path / "api.onnx", {"x": x})[0], expected, rtol=1e-5, atol=1e-5)

    code, out, err = _cli(capsys, "compile", src, "--method", "signonly", "--group-size", "32", "--sign-shrink",
                          "0.5", "-o", tmp_path / "cli.onnx")
    assert code == 0, err
    assert "quantized 1 linear layers" in out
    np.testing.assert_allclose(run(tmp_path / "cli.onnx", {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert "signonly" in (tmp_path / "cli.recipe.yaml").read_text()
    code, _, err = _cli(capsys, "compile", src, "--method", "signonly", "--sign-shrink", "2")
    assert code == 2 and err.strip() == "ptqonnx compile: error: --sign-shrink must be in (0, 1], got 2.0"
    code, _, err = _cli(capsys, "compile", src, "--sign-shrink", "0.5")
    assert code == 2 and "--sign-shrink applies to --method signonly, not rtn" in err


def test_python_api_accepts_paths_protos_and_ir_models_and_never_modifies_them(tmp_path):
    import onnx_ir as ir

    model, w = linear_model(64, 16)
    before = model.SerializeToString()
    ir_model = ir.from_proto(model)
    outs = [ptqonnx.quantize(m, ptqonnx.RtnConfig(group_size=32)) for m in (model, ir_model)]
    assert model.SerializeToString() == before
    assert [n.op_type for n in ir_model.graph] == ["MatMul"]  # the caller's IR model untouched
    for i, q in enumerate(outs):
        assert [n.op_type for n in q.graph] == ["MatMulNBits"]
        assert q.meta["ptqonnx.report"].quantized == ["node"] or len(q.meta["ptqonnx.report"].quantized) == 1
        ptqonnx.save(q, tmp_path / f"q{i}.onnx")
    assert _sha(tmp_path / "q0.onnx") == _sha(tmp_path / "q1.onnx")
    with pytest.raises(UserError, match="must be a path, an onnx.ModelProto or an onnx_ir.Model"):
        ptqonnx.quantize(42, ptqonnx.RtnConfig())


# -- every option the chosen method does not read is an error ----------------------------------------------

REJECTED = [
    (["--method", "rtn", "--damp", "0.5"], "--damp applies to --method gptq, not rtn"),
    (["--method", "gptq", "--no-clip"], "--no-clip applies to --method awq, not gptq"),
    (["--target", "tensorrt", "--asym"], "TensorRT's INT4/INT8 weights are symmetric (no zero point): drop --asym"),
    (["--target", "tensorrt", "--format", "matmulnbits"], "TensorRT has no MatMulNBits"),
    (["--target", "tensorrt", "--group-size", "32"], "TensorRT blocks INT4 weights by 64 or 128: set --group-size"),
    (["--target", "tensorrt", "--wbits", "8", "--group-size", "128"], "TensorRT takes INT8 weights per output channel"),
    (["--target", "tensorrt", "--scales", "signed"], "TensorRT refuses negative scales"),
    (["--method", "awq", "--target", "tensorrt"], "awq searches its scales and clipping on ONNX Runtime's signed grid"),
    (["--target", "ort-cuda", "--accuracy-level", "4"], "--accuracy-level is an ONNX Runtime CPU knob"),
    (["--target", "ort-cpu", "--format", "qdq"], "--target ort-cpu runs MatMulNBits; drop --format qdq"),
    (["--w8a8", "--target", "ort-cuda"], "W8A8 targets tensorrt or ort-cpu"),
    (["--act-scales", "dynamic"], "--act-scales applies to --w8a8, not rtn"),
    (["--method", "rtn", "--w8a8", "--alpha", "0.9"], "--alpha applies to --method smoothquant, not rtn with w8a8"),
    (["--w8a8", "--percentile", "90"], "--percentile applies to --calib-range percentile"),
    (["--method", "awq+gptq", "--one-shot"], "awq+gptq always calibrates block by block: drop --one-shot"),
    (["--w8a8", "--keep-lm-head", "--quantize-lm-head"], "W8A8 leaves the LM head in float unless --quantize-lm-head"),
    (["--keep-lm-head", "--quantize-lm-head"], "--quantize-lm-head applies to --w8a8, not rtn"),
    (["--quantize-embeddings", "--wbits", "8"], "8-bit weights default to per channel: set --group-size"),
    (["--method", "rtn", "--calib-text", "x.txt"], "rtn needs no calibration data; drop --calib-text"),
    (["--method", "rtn", "--stats", "s.npz"], "rtn needs no statistics; drop --stats"),
    (["--method", "smoothquant"], "smoothquant emits W8A8; add --w8a8"),
    (["--method", "hqq"], "unknown method 'hqq'"),
    (["--method", "awq", "--w8a8"], "awq is weight-only"),
    (["--method", "w8a8"], "unknown method 'w8a8'"),
    (["--w8a8", "--format", "matmulnbits"], "W8A8 is written as QDQ: drop --format"),
    (["--w8a8", "--accuracy-level", "4"], "--accuracy-level is for weight-only MatMulNBits"),
    (["--method", "gptq", "--wbits", "4", "--group-size", "0"], "4-bit weights need a group size"),
]


@pytest.mark.parametrize("argv,message", REJECTED, ids=[" ".join(a) for a, _ in REJECTED])
def test_options_the_method_does_not_read_are_refused(tmp_path, capsys, argv, message):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    before = _sha(src)
    code, out, err = _cli(capsys, "compile", src, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and _sha(src) == before


def test_help_shows_the_defaults_from_the_config_classes(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--damp DAMP dampening, a fraction of mean diag(H) (default: 0.01)",
                   "(default: 128 for 3/4 bits, per channel for 8 bits)", "(default: 20)",
                   "--percentile PERCENTILE percentile for calib_range percentile (default: 99.99 with "
                   "--calib-range percentile)", "(default: rtn)", "(default: 128)"):
        assert needle in text, needle


# -- torch is a dependency of the methods that need it ----------------------------------------------------


def test_missing_torch_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)
    code, _, err = _cli(capsys, "compile", src, "--method", "gptq", "--calib-text", tmp_path / "none.txt")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "gptq needs torch" in err and "pip install 'ptqonnx[torch]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# -- saved statistics ----------------------------------------------------------------------------------------


def test_compile_stats_reuses_a_calibrate_run_bit_for_bit(tmp_path, capsys, tiny_export):
    from ptqonnx.models.tiny import tiny_corpus

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_corpus(800, seed=4)))
    calib = ["--calib-text", text, "--calib-samples", "4", "--calib-seq-len", "32"]
    src = tiny_export / "model.onnx"
    code, _, err = _cli(capsys, "calibrate", src, *calib, "--hessian", "-o", tmp_path / "s.npz")
    assert code == 0, err
    for name, argv in {"sq": ["--method", "smoothquant", "--w8a8"], "rtn8": ["--w8a8"],
                       "gptq1": ["--method", "gptq", "--one-shot"]}.items():
        code, _, err = _cli(capsys, "compile", src, *argv, *calib, "-o", tmp_path / f"{name}.onnx")
        assert code == 0, err
        code, out, err = _cli(capsys, "compile", src, *argv, "--stats", tmp_path / "s.npz", "-o",
                              tmp_path / f"{name}_stats.onnx")
        assert code == 0, err
        assert _sha(tmp_path / f"{name}.onnx") == _sha(tmp_path / f"{name}_stats.onnx"), name
        assert str(tmp_path / "s.npz") in out  # the summary says where the statistics came from
    code, _, err = _cli(capsys, "compile", src, "--method", "gptq", *calib, "--stats", tmp_path / "s.npz")
    assert code == 2 and "calibrates block by block on the partly quantized model" in err
    code, _, err = _cli(capsys, "calibrate", src, *calib, "-o", tmp_path / "nohess.npz")
    code, _, err = _cli(capsys, "compile", src, "--method", "gptq", "--one-shot", "--stats", tmp_path / "nohess.npz")
    assert code == 2 and "lacks statistics" in err and "(xtx)" in err and "--hessian" in err
    assert onnx.load(tmp_path / "sq.onnx").graph.node  # the outputs are real models


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_calibrated_methods_never_modify_the_callers_model(method):
    """Sequential calibration works on private copies of the weights (renaming a shared tensor once renamed
    the caller's initializer: found by tests/test_properties.py)."""
    import onnx_ir as ir

    from graphs import model_from_text

    rng = np.random.default_rng(0)
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[S, 32] x) => (float[S, 16] y) { h = MatMul(x, w1)
        r = Relu(h)
        z = MatMul(r, w2)
        y = Neg(z) }"""
    proto = model_from_text(text, {"w1": rng.standard_normal((32, 32)).astype(np.float32),
                                   "w2": rng.standard_normal((32, 16)).astype(np.float32)})
    before = proto.SerializeToString()
    ir_model = ir.from_proto(proto)
    feeds = [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(3)]
    config = ptqonnx.recipe_for(method, w8a8=method == "smoothquant", **({} if method == "smoothquant" else
                                                                         {"group_size": 16}))
    for m in (proto, ir_model):
        ptqonnx.quantize(m, config, calibration=feeds)
    assert proto.SerializeToString() == before
    assert sorted(ir_model.graph.initializers) == ["w1", "w2"]
    assert ir.to_proto(ir_model).SerializeToString() == ir.to_proto(ir.from_proto(proto)).SerializeToString()
