"""Pipeline behaviour: site scan and skips, pass `modified` flags, config validation, the input never
touched, atomic output, and the CLI's one-line errors."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphs import linear_model, model_from_text, run, save
from ptqonnx.cli import main
from ptqonnx.errors import UserError
from ptqonnx.graph import find_linear_sites
from ptqonnx.numerics.quant import fake_quantize
from ptqonnx.passes.embeddings import QuantizeEmbeddingsPass, embedding_block_size
from ptqonnx.passes.matmul_nbits import LowerToMatMulNBitsPass
from ptqonnx.passes.qdq import LowerToQdqPass
from ptqonnx.config import ConfigError, Recipe, RtnConfig
from ptqonnx.pipeline import compile_model, default_output_path

NO_WEIGHT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[4, 8] a, float[8, 3] b) => (float[4, 3] y) { y = MatMul(a, b) }"""


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scan_skips_non_constant_weight_with_reason():
    scan = find_linear_sites(ir.from_proto(model_from_text(NO_WEIGHT, {})))
    assert scan.sites == [] and scan.skipped[0].reason == "weight is a graph input, not a constant"


ATTENTION_LIKE = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4, 8] q, float[2, 4, 8] k, float[2, 8] x) => (float[2, 4, 4] s, float[2, 3] y) {
    kt = Transpose<perm=[0, 2, 1]>(k)
    s = MatMul(q, kt)
    w = Reshape(wflat, shape)
    y = MatMul(x, w)
}"""


def test_scan_names_activation_matmuls_and_unfolded_weights():
    inits = {"wflat": np.ones(24, np.float32), "shape": np.array([8, 3], np.int64)}
    scan = find_linear_sites(ir.from_proto(model_from_text(ATTENTION_LIKE, inits)))
    reasons = [s.reason for s in scan.skipped]  # graph order
    assert scan.sites == [] and len(reasons) == 2
    assert reasons[0].startswith("activation x activation")
    assert reasons[1] == ("weight is computed by Reshape, not a constant (constant-fold the "
                                             "graph first, e.g. onnxscript.optimizer.fold_constants)")


def test_lowering_passes_report_unmodified_on_empty_plan():
    model = ir.from_proto(linear_model(32, 8)[0])
    assert LowerToMatMulNBitsPass({})(model).modified is False
    assert LowerToQdqPass({})(model).modified is False
    assert QuantizeEmbeddingsPass(4, 32, True)(model).modified is False  # no Gather


def test_embedding_block_size_falls_back_to_a_divisor():
    assert embedding_block_size(576, 128) == 64
    assert embedding_block_size(576, 32) == 32
    assert embedding_block_size(40, 32) is None


@pytest.mark.parametrize(
    "weights,options",
    [(dict(bits=5), {}), (dict(group_size=100), {}), (dict(group_size=8), {}), ({}, dict(format="int4")),
     (dict(bits=4, group_size=None), {}), ({}, dict(format="qdq", accuracy_level=4)), ({}, dict(accuracy_level=7)),
     (dict(bits="4"), {}), (dict(symmetric=1), {})],
)
def test_config_validation(weights, options):
    with pytest.raises(ConfigError):
        Recipe((RtnConfig(**weights),), **options)


def test_qdq_allows_non_power_of_two_groups():
    assert Recipe((RtnConfig(group_size=96),), format="qdq").weights.group_size == 96


def test_input_unchanged_and_default_output_beside_it(tmp_path):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    before = _sha(src)
    cfg = Recipe((RtnConfig(),))
    rep = compile_model(src, None, cfg)
    assert rep.output_path == default_output_path(src, cfg) == tmp_path / "m.rtn_w4g128_matmulnbits.onnx"
    assert _sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp leftovers
        "m.onnx", "m.rtn_w4g128_matmulnbits.onnx", "m.rtn_w4g128_matmulnbits.recipe.yaml"]


def test_default_output_names_differ_by_format(tmp_path):
    src = tmp_path / "m.onnx"
    names = {default_output_path(src, Recipe((RtnConfig(),), format=f)).name for f in ("matmulnbits", "qdq")}
    assert names == {"m.rtn_w4g128_matmulnbits.onnx", "m.rtn_w4g128_qdq.onnx"}


def test_refuses_to_overwrite_input(tmp_path):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    before = _sha(src)
    with pytest.raises(UserError, match="is the input file"):
        compile_model(src, src, RtnConfig())
    assert _sha(src) == before


def test_failed_save_leaves_no_partial_output(tmp_path, monkeypatch):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"

    def broken_session(*a, **k):
        raise UserError("ONNX Runtime could not load the model: simulated")

    monkeypatch.setattr("ptqonnx.runtime.ort.make_session", broken_session)
    with pytest.raises(UserError):
        compile_model(src, out, RtnConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_existing_output_replaced_only_when_complete(tmp_path):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists; pass --force"):
        compile_model(src, out, RtnConfig())
    assert out.read_bytes() == b"old"
    compile_model(src, out, RtnConfig(), force=True)
    assert onnx.load(out).graph.node[0].op_type == "MatMulNBits"


def test_external_data_model_round_trip(tmp_path, monkeypatch):
    """Large models keep weights in a .data file; force that path with a tiny threshold."""
    monkeypatch.setattr("ptqonnx.io.EXTERNAL_DATA_THRESHOLD", 0)
    model, w = linear_model(64, 16)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    out = tmp_path / "o.onnx"
    rep = compile_model(src, out, RtnConfig())
    assert (tmp_path / "o.onnx.data").is_file() and rep.output_bytes > out.stat().st_size
    x = np.ones((1, 2, 64), np.float32)
    (y,) = run(out, {"x": x})
    np.testing.assert_allclose(y, x @ fake_quantize(w.T, 4, 128, True).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_sequential_calibration_reads_external_data(tmp_path, tiny_export, calib_text, method):
    """Sequential GPTQ/AWQ run one ORT session per block; with the weights in external data those sessions
    were made from bytes, which ORT refuses ("External data path ... escapes working directory"). The tiny
    llama saved with external data compiles to the same model as the one-file export."""
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(tiny_export / "model.onnx")), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data")  # tensors over 1 KiB, as exporters do
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (src.parent / f).write_bytes((tiny_export / f).read_bytes())
    flags = ["--method", method, "--calib-text", str(calib_text), "--calib-samples", "4", "--calib-seq-len", "32"]
    outs = []
    for model in (tiny_export / "model.onnx", src):
        outs.append(tmp_path / f"q_{len(outs)}.onnx")
        assert main(["-q", "compile", str(model), "-o", str(outs[-1]), *flags]) == 0
    ids = np.arange(32, dtype=np.int64)[None] % 300
    a, b = (run(o, {"input_ids": ids})[0] for o in outs)
    np.testing.assert_array_equal(a, b)


# --- CLI -------------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(list(argv)))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_compile_reports_counts(tmp_path, capsys):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    code, out, _ = _cli(capsys, "compile", str(src), "-o", str(tmp_path / "q.onnx"), "--block-size", "32", "--asym")
    assert code == 0 and "quantized 1 linear layers; skipped 0" in out
    node = onnx.load(tmp_path / "q.onnx").graph.node[0]
    assert {a.name: a.i for a in node.attribute}["block_size"] == 32 and len(node.input) == 4


@pytest.mark.parametrize(
    "argv_tail,needle",
    [
        (["--group-size", "100"], "not a power of two"),
        (["--wbits", "5"], "invalid choice"),
        (["--format", "qdq", "--accuracy-level", "4"], "--accuracy-level applies to --format matmulnbits only"),
        (["--method", "gptq", "--calib-samples", "0"], "--calib-samples must be at least 1"),
        (["--method", "gptq", "--damp", "2"], "--damp must be in (0, 1)"),
    ],
)
def test_cli_bad_flags_one_line_exit_2(tmp_path, capsys, argv_tail, needle):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    code, out, err = _cli(capsys, "compile", str(src), *argv_tail)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_bad_inputs_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    save(model_from_text(NO_WEIGHT, {}), tmp_path / "noweight.onnx")
    save(linear_model(64, 16, opset=17)[0], tmp_path / "old.onnx")
    cases = [
        (["compile", str(tmp_path / "missing.onnx")], "model file not found"),
        (["compile", str(tmp_path / "junk.onnx")], "not a readable ONNX model"),
        (["compile", str(tmp_path / "noweight.onnx")], "no quantizable MatMul/Gemm"),
        (["compile", str(tmp_path / "old.onnx"), "--format", "qdq"], "needs opset 21"),
        (["eval", str(tmp_path / "missing.onnx"), "--text", str(tmp_path / "t.txt")], "model file not found"),
        (["bench", str(tmp_path / "missing.onnx")], "model file not found"),
    ]
    files_before = sorted(p.name for p in tmp_path.iterdir())
    for argv, needle in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before
