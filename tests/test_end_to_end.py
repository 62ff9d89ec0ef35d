"""End to end on exported LLaMA graphs: the tiny random model (fast) and the real SmolLM2-135M (slow).

References: the PyTorch model with the same fake-quantized weights (tiny), and ONNX Runtime's own
MatMulNBitsQuantizer, whose packed weights ours must equal byte for byte (real model)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from ptqonnx.cli import main
from ptqonnx.numerics.quant import fake_quantize
from ptqonnx.config import CalibConfig, RtnConfig
from ptqonnx.pipeline import compile_model
from ptqonnx.registry import recipe_for
from graphs import real_windows, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(hf_dir: Path, ids: np.ndarray, *, bits, group, symmetric, quantize_lm_head=True):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (quantize_lm_head or name != "lm_head"):
                w = mod.weight.detach().numpy()  # [N, K]
                mod.weight = torch.nn.Parameter(torch.from_numpy(fake_quantize(w, bits, group, symmetric)))
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize(
    "fmt,symmetric,keep_lm_head", [("matmulnbits", True, False), ("matmulnbits", False, True), ("qdq", False, False)]
)
def test_tiny_llama_rtn_equals_fake_quantized_torch(tmp_path, tiny_hf, tiny_export, fmt, symmetric, keep_lm_head):
    cfg = recipe_for("rtn", bits=4, group_size=32, symmetric=symmetric, format=fmt, keep_lm_head=keep_lm_head)
    out = tmp_path / "q.onnx"
    rep = compile_model(tiny_export / "model.onnx", out, cfg)
    n_linear = 2 * 7 + (0 if keep_lm_head else 1)
    assert len(rep.quantized) == n_linear
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear") == n_linear
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 24)).astype(np.int64)
    ref = _torch_logits(tiny_hf, ids, bits=4, group=32, symmetric=symmetric, quantize_lm_head=not keep_lm_head)
    config = {"session.qdq_matmulnbits_accuracy_level": "0"}
    (logits,) = run(out, {"input_ids": ids}, "all", config)
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=2e-4)


def test_tiny_kv_model_compiles_and_decodes(tmp_path, tiny_export):
    """The KV-cache export quantizes the same layers and still runs prefill + decode."""
    out = tmp_path / "kv.onnx"
    rep = compile_model(tiny_export / "model_kv.onnx", out, RtnConfig())
    assert len(rep.quantized) == 15
    from ptqonnx.runtime.bench import bench_decode

    res = bench_decode(out, past_len=8, new_tokens=3, repeats=1, warmup=0)
    assert res.median_ms > 0


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flow_on_tiny_export(tmp_path, tiny_export, capsys):
    """compile -> eval -> calibrate -> bench, as a user types them."""
    work = tmp_path / "m"
    shutil.copytree(tiny_export, work)
    text = tmp_path / "t.txt"
    from ptqonnx.models.tiny import tiny_corpus

    text.write_text(" ".join(tiny_corpus(300, seed=5)))
    code, out, err = _cli(capsys, "compile", work / "model.onnx", "--wbits", "4", "--group-size", "32",
                          "--quantize-embeddings")
    assert code == 0, err
    q = work / "model.rtn_w4g32_matmulnbits.onnx"
    assert q.is_file() and "quantized 15 linear layers and 1 embedding tables" in out
    code, out, err = _cli(capsys, "eval", q, "--text", text, "--seq-len", "64", "--max-windows", "3")
    assert code == 0, err
    assert "over 189 tokens (3 windows x 64)" in out
    fp = float(_cli(capsys, "eval", work / "model.onnx", "--text", text, "--seq-len", "64",
                    "--max-windows", "3")[1].split()[1])
    assert np.isfinite(fp) and fp > 1
    code, out, err = _cli(capsys, "calibrate", work / "model.onnx", "--calib-text", text, "--calib-samples", "4",
                          "--calib-seq-len", "32", "-o", tmp_path / "s.npz", "--hessian")
    assert code == 0, err
    from ptqonnx.calibration import Statistics

    stats = Statistics.load(tmp_path / "s.npz")
    # q/k/v share one input, gate/up another: 2 layers x 4 distinct activations + the LM head's input
    assert len(stats) == 9
    assert all(st.xtx is not None and st.count == 4 * 32 for st in stats.values())
    code, out, err = _cli(capsys, "bench", q, "--seq-len", "16", "--repeats", "2")
    assert code == 0 and "prefill 1x16: median" in out
    code, out, err = _cli(capsys, "eval", q, "--text", text, "--seq-len", "100000")
    assert code == 2 and "shorter than one window" in err


def test_cli_verbosity_and_version(tmp_path, tiny_export, capsys, caplog):
    """--version; -v / -q after the subcommand as before it; -q silences the per-block progress lines (logged
    by ptqonnx.progress); a library caller's `progress` callback still gets GPTQ's line per stage."""
    with pytest.raises(SystemExit) as exc:
        _cli(capsys, "--version")
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("ptqonnx ")
    text = tmp_path / "t.txt"
    from ptqonnx.models.tiny import tiny_corpus

    text.write_text(" ".join(tiny_corpus(300, seed=5)))
    args = ("compile", tiny_export / "model.onnx", "--method", "gptq", "--calib-text", text, "--calib-samples", "4",
            "--calib-seq-len", "32", "-o", tmp_path / "g.onnx", "--force")
    with caplog.at_level(logging.INFO, logger="ptqonnx"):  # restores the level main sets
        code, _, err = _cli(capsys, *args)
        assert code == 0 and "GPTQ block 4/7 (" in caplog.text
        for quiet in (("-q", *args), (*args, "-q")):
            caplog.clear()
            code, out, err = _cli(capsys, *quiet)
            assert code == 0 and "GPTQ block" not in caplog.text + err and "wrote" in out
        code, out, _ = _cli(capsys, *args, "-v")
    assert code == 0 and "-v lists all" not in out  # every skip listed
    said: list[str] = []
    compile_model(tiny_export / "model.onnx", tmp_path / "g2.onnx", recipe_for("gptq"), progress=said.append,
                  calibration=CalibConfig(text=text, samples=4, seq_len=32))
    assert any(line.startswith("GPTQ block 4/7, stage 2/2 (") for line in said)  # gate/up then down_proj


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_rtn_is_byte_identical_to_onnxruntime_rtn(smollm2_export, tmp_path):
    """Same algorithm, same grid: every MatMulNBits weight, scale and zero point equals ORT's own output,
    and the perplexity on 2 windows is the same."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from ptqonnx.runtime.perplexity import perplexity

    src = smollm2_export.model_path
    ours = tmp_path / "ours.onnx"
    rep = compile_model(src, ours, RtnConfig(symmetric=False))
    assert len(rep.quantized) == 211  # 30 layers x 7 + the tied LM head (read through a Transpose)
    ort_q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=128, is_symmetric=False, bits=4))
    ort_q.process()
    theirs = {t.name: onnx.numpy_helper.to_array(t) for t in ort_q.model.model.graph.initializer}
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
    packed = [n for n in theirs if n.endswith(("_Q4", "_scales", "_zero_points"))]
    assert len(packed) == 3 * 210  # ORT leaves the LM head (not an initializer) in float
    for name in packed:
        np.testing.assert_array_equal(mine[name].reshape(theirs[name].shape), theirs[name], err_msg=name)

    keep = tmp_path / "keep.onnx"
    compile_model(src, keep, recipe_for("rtn", symmetric=False, keep_lm_head=True))
    ort_path = tmp_path / "ort.onnx"
    onnx.save(ort_q.model.model, str(ort_path))
    windows = real_windows(smollm2_export, 2, chars=30_000)
    assert perplexity(keep, windows).ppl == pytest.approx(perplexity(ort_path, windows).ppl, rel=1e-6)
