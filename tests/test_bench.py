"""Latency benchmarks on tiny models: sane numbers, KV feeding, interleaved ratios."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

from ptqonnx.errors import UserError
from ptqonnx.runtime.bench import BenchResult, bench_decode, bench_prefill, decode_runner, interleaved

V, D, H, HD = 40, 8, 2, 4

PREFILL = f"""
<ir_version: 8, opset_import: ["" : 17]>
lm (int64[batch, seq] input_ids) => (float[batch, seq, {V}] logits)
{{
  h = Gather(emb, input_ids)
  logits = MatMul(h, w)
}}
"""

# One "layer" with an optimum-style cache: present = Concat(past, new) along the sequence axis; logits
# read the cache through a ReduceMean so that decode work grows with the past.
KV = f"""
<ir_version: 8, opset_import: ["" : 18]>
lm (int64[batch, seq] input_ids, int64[batch, total] attention_mask, int64[batch, seq] position_ids,
    float[batch, {H}, past, {HD}] "past_key_values.0.key", float[batch, {H}, past, {HD}] "past_key_values.0.value")
 => (float[batch, seq, {V}] logits, float[batch, {H}, total, {HD}] "present.0.key",
     float[batch, {H}, total, {HD}] "present.0.value")
{{
  h = Gather(emb, input_ids)
  k4 = Reshape(h, shape4)
  k = Transpose<perm = [0, 2, 1, 3]>(k4)
  "present.0.key" = Concat<axis = 2>("past_key_values.0.key", k)
  "present.0.value" = Concat<axis = 2>("past_key_values.0.value", k)
  m = ReduceMean<keepdims = 1>("present.0.key", axes)
  mt = Transpose<perm = [0, 2, 1, 3]>(m)
  m2 = Reshape(mt, shape3)
  x = Add(h, m2)
  logits = MatMul(x, w)
}}
"""


def _save(tmp_path, text: str, name: str, extra: dict[str, np.ndarray] | None = None):
    rng = np.random.default_rng(0)
    weights = {
        "emb": rng.standard_normal((V, D)).astype(np.float32),
        "w": rng.standard_normal((D, V)).astype(np.float32),
        **(extra or {}),
    }
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(proto)
    path = tmp_path / name
    onnx.save(proto, path)
    return path


@pytest.fixture
def prefill_model(tmp_path):
    return _save(tmp_path, PREFILL, "lm.onnx")


@pytest.fixture
def kv_model(tmp_path):
    extra = {
        "shape4": np.array([0, 0, H, HD], np.int64),
        "shape3": np.array([0, 1, D], np.int64),
        "axes": np.array([2], np.int64),
    }
    return _save(tmp_path, KV, "lm_kv.onnx", extra)


def _sane(r: BenchResult, runs: int):
    assert len(r.runs) == runs
    assert 0 < r.p10 <= r.median_ms <= r.p90 < 5_000
    assert r.threads >= 1


def test_bench_prefill(prefill_model):
    r = bench_prefill(prefill_model, seq_len=16, warmup=1, repeats=5, threads=1)
    _sane(r, 5)
    assert r.threads == 1


def test_bench_prefill_runs_a_kv_model_with_empty_past(kv_model):
    _sane(bench_prefill(kv_model, seq_len=8, warmup=0, repeats=3, threads=1), 3)


def test_bench_decode(kv_model):
    r = bench_decode(kv_model, past_len=16, new_tokens=4, warmup=1, repeats=3, threads=1)
    _sane(r, 3)


def test_decode_needs_a_cache(prefill_model):
    with pytest.raises(UserError, match="no past_key_values"):
        decode_runner(prefill_model)


def test_interleaved_ratios():
    calls = []

    def fast():
        calls.append("fast")
        return 1.0

    def slow():
        calls.append("slow")
        return 3.0

    res = interleaved({"fast": fast, "slow": slow}, rounds=4, warmup=0)
    assert calls == ["fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast"]  # rotated order
    assert res.baseline == "fast"
    assert res.medians == {"fast": 1.0, "slow": 3.0}
    assert res.ratios == {"fast": 1.0, "slow": 3.0}
    assert interleaved({"a": lambda: None}, rounds=2).medians["a"] >= 0  # wall time when nothing returned
    with pytest.raises(ValueError, match="baseline"):
        interleaved({"a": fast}, baseline="b")


def test_describe_is_one_readable_line():
    r = BenchResult(median_ms=1167.14, p10=1100.0, p90=1380.56, threads=2, runs=(1100.0, 1167.14, 1380.56))
    assert r.describe() == "median 1167.1 ms (p10 1100.0, p90 1380.6) over 3 runs, 2 threads"
    small = BenchResult(median_ms=12.345, p10=12.0, p90=13.0, threads=1, runs=(12.345,))
    assert small.describe("ms/token") == "median 12.35 ms/token (p10 12.00, p90 13.00) over 1 runs, 1 threads"


def test_bench_cli_prints_each_result_once(prefill_model, kv_model, capsys):
    from ptqonnx.cli import main

    args = ["bench", str(prefill_model), "--kv", str(kv_model), "--seq-len", "8", "--repeats", "3", "--threads", "1"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"prefill 1x8: median [\d.]+ ms \(p10 [\d.]+, p90 [\d.]+\) over 3 runs, 1 threads", lines[0])
    assert re.fullmatch(r"decode: median [\d.]+ ms/token \(p10 [\d.]+, p90 [\d.]+\) over 3 runs, 1 threads", lines[1])


def test_compare_table(tmp_path, prefill_model, kv_model):
    """Two float models and a perturbed copy: sizes from the file system, perplexities equal to `perplexity`
    of each alone, latency ratios from one interleaved run (the baseline's own ratio is exactly 1)."""
    from ptqonnx.runtime.compare import compare_models
    from ptqonnx.runtime.perplexity import perplexity

    other = _save(tmp_path, PREFILL, "other.onnx",
                  {"w": np.random.default_rng(5).standard_normal((D, V)).astype(np.float32)})
    windows = np.random.default_rng(6).integers(0, V, size=(3, 9)).astype(np.int64)
    res = compare_models([prefill_model, other, kv_model], windows=windows, seq_len=8, rounds=3, threads=1)
    assert [r.label for r in res.rows] == ["lm.onnx", "other.onnx", "lm_kv.onnx"]
    base = res.rows[0]
    assert base.prefill_ratio == 1.0 and base.size_ratio == 1.0
    for r, path in zip(res.rows, [prefill_model, other, kv_model]):
        assert r.bytes == path.stat().st_size
        assert r.size_ratio == pytest.approx(path.stat().st_size / prefill_model.stat().st_size, rel=1e-12)
        assert r.perplexity == pytest.approx(perplexity(path, windows).ppl, rel=1e-9)
        assert r.prefill_ms > 0 and r.prefill_ratio > 0 and r.decode_ms is None
    assert res.rows[1].perplexity != pytest.approx(base.perplexity, rel=1e-3)  # other weights, other perplexity
    assert "decode not measured" in res.decode_note and "lm.onnx, other.onnx" in res.decode_note
    lines = res.lines()
    assert len(lines) == 1 + 3 + 1 and "perplexity" in lines[0] and lines[-1].startswith("(latency: median of 3")


def test_compare_decode_when_every_model_has_a_cache(kv_model, capsys):
    from ptqonnx.cli import main

    args = ["bench", str(kv_model), "--compare", str(kv_model), "--seq-len", "8", "--repeats", "2", "--threads", "1"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "decode /token" in lines[0] and len(lines) == 4
    assert lines[1].split()[0:2] == ["lm_kv.onnx", "#1"] and lines[2].split()[0:2] == ["lm_kv.onnx", "#2"]
    assert re.search(r"1\.00x\s+[\d.]+ ms\s+1\.00x$", lines[1])  # prefill and decode ratios of the baseline


def test_feeds_for_an_encoder(tmp_path):
    """No logits: token 0 (the vocabulary is unknown), token_type_ids zeros, and the model runs."""
    from ptqonnx.runtime.bench import ModelFeeds
    from ptqonnx.runtime.ort import make_session

    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    enc (int64[b, s] input_ids, int64[b, s] token_type_ids) => (float[b, s, {D}] last_hidden_state) {{
      e = Gather(emb, input_ids)
      t = Gather(emb, token_type_ids)
      last_hidden_state = Add(e, t)
    }}"""
    path = _save(tmp_path, text, "enc.onnx")
    feeds = ModelFeeds(make_session(path))
    feed = feeds.build(feeds.tokens(5))
    assert feeds.vocab is None and set(feed) == {"input_ids", "token_type_ids"}
    assert not feed["input_ids"].any() and not feed["token_type_ids"].any() and feed["input_ids"].shape == (1, 5)
    _sane(bench_prefill(path, seq_len=5, warmup=0, repeats=2, threads=1), 2)


@pytest.mark.parametrize("args, match", [
    (["bench"], "pass a model"),
    (["bench", "{p}", "--kv", "{k}", "--compare", "{k}"], "--kv is for one model"),
    (["eval", "{p}", "--reference", "{p}", "--compare", "{p}", "--text", "{p}"], "either --reference"),
    (["bench", "{p}", "--compare", "{missing}"], "model file not found"),
])
def test_cli_refusals_are_one_line(prefill_model, kv_model, capsys, args, match):
    from ptqonnx.cli import main

    paths = {"p": prefill_model, "k": kv_model, "missing": prefill_model.parent / "missing.onnx"}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py is only run where a GPU is lent; this keeps it working: with --device cpu on a
    small random model it compares cpu with cpu (identical outputs) and writes its table and JSON."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--model", "tiny", "--hidden", "64",
                           "--layers", "2", "--windows", "2", "--calib", "4", "--seq-len", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    by = {r["check"]: r for r in data["rows"]}
    for method in ("gptq", "awq"):
        row = by[f"{method} --device cpu vs cpu"]
        assert row["ok"] is True and row["ppl_device"] == row["ppl_cpu"] and row["logits_rel_diff"] == 0.0
    assert "| gptq --device cpu vs cpu |" in out.read_text()


def test_a_missing_gpu_provider_is_one_line_never_a_silent_cpu_run(tmp_path, capsys):
    import onnxruntime as ort

    from ptqonnx.cli import main
    from ptqonnx.runtime.ort import make_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA EP")
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[1, N] input_ids) => (float[1, N] logits) { logits = Cast<to = 1>(input_ids) }"""), str(path))
    np.savez(tmp_path / "x.npz", input_ids=np.zeros((2, 1, 4), np.int64))
    for cmd in (["bench", str(path), "--provider", "cuda"], ["eval", str(path), "--provider", "tensorrt",
                                                             "--reference", str(path), "--inputs-npz",
                                                             str(tmp_path / "x.npz")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "this ONNX Runtime has no" in err[0] and "onnxruntime-gpu" in err[0], err
    assert make_session(path, provider="cpu").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="unknown provider 'rocm'"):
        make_session(path, provider="rocm")


def test_calibration_on_a_missing_gpu_provider_is_one_line(tiny_export, calib_text, tmp_path, capsys):
    """`compile --provider cuda` (the calibration runs' EP) and `calibrate --provider tensorrt`: one line before
    any work and nothing written, where this ONNX Runtime has no GPU EP; `--provider cpu` is recorded in
    the recipe."""
    import onnxruntime as ort

    from ptqonnx.cli import main

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA EP")
    src = str(tiny_export / "model.onnx")
    calib = ["--calib-text", str(calib_text), "--calib-samples", "2", "--calib-seq-len", "16"]
    for cmd in (["compile", src, "-o", str(tmp_path / "q.onnx"), "--method", "gptq", "--provider", "cuda", *calib],
                ["calibrate", src, "-o", str(tmp_path / "s.npz"), "--provider", "tensorrt", *calib]):
        assert main(["-q", *cmd]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "this ONNX Runtime has no" in err[0] and "onnxruntime-gpu" in err[0], err
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "s.npz").exists()
    assert main(["-q", "compile", src, "-o", str(tmp_path / "c.onnx"), "--method", "gptq", "--provider", "cpu",
                 *calib]) == 0
    assert "provider: cpu" in (tmp_path / "c.recipe.yaml").read_text()


def test_the_calibration_provider_choices_are_the_runtime_providers():
    """CalibConfig lists the providers without importing onnxruntime; they are runtime.ort's."""
    import dataclasses

    from ptqonnx.config import CalibConfig
    from ptqonnx.runtime.ort import PROVIDERS

    field = next(f for f in dataclasses.fields(CalibConfig) if f.name == "provider")
    assert set(field.metadata["choices"]) == set(PROVIDERS)
