"""Latency benchmarks on tiny models: sane numbers, KV feeding, interleaved ratios."""

from __future__ import annotations

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
