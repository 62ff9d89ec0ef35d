"""Calibration: sources, observers, saved statistics and the ORT collection run on a tiny graph."""

from __future__ import annotations

import hashlib
import sys
import types

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

from ptqonnx.calibration import (
    CalibConfig,
    Stat,
    Statistics,
    TensorObserver,
    calibration_batches,
)
from ptqonnx.errors import UserError
from ptqonnx.runtime.collect import collect_statistics

V, D, F = 50, 8, 16

# ids -> embedding -> MatMul -> residual Add -> LayerNorm -> MatMul -> Relu -> MatMul -> logits.
# Add + LayerNormalization and MatMul + Add are fusion candidates at ORT_ENABLE_ALL.
TOY = f"""
<ir_version: 8, opset_import: ["" : 17]>
toy (int64[1, seq] input_ids) => (float[1, seq, {V}] logits)
{{
  h0 = Gather(emb, input_ids)
  a = MatMul(h0, wa)
  s = Add(a, h0)
  n = LayerNormalization<axis = -1, epsilon = 1e-5>(s, gamma, beta)
  u0 = MatMul(n, w1)
  u = Add(u0, b1)
  g = Relu(u)
  logits = MatMul(g, w2)
}}
"""


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "emb": rng.standard_normal((V, D)).astype(f),
        "wa": rng.standard_normal((D, D)).astype(f),
        "gamma": (1 + 0.1 * rng.standard_normal(D)).astype(f),
        "beta": (0.1 * rng.standard_normal(D)).astype(f),
        "w1": rng.standard_normal((D, F)).astype(f),
        "b1": rng.standard_normal(F).astype(f),
        "w2": rng.standard_normal((F, V)).astype(f),
    }


def model_from_text(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    """Parse ONNX text and attach `weights` as initializers."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    return ir.from_proto(proto)


def _toy_model() -> ir.Model:
    return model_from_text(TOY, _weights())


def _reference(ids: np.ndarray) -> dict[str, np.ndarray]:
    """The toy's activations in numpy."""
    w = {k: v.astype(np.float64) for k, v in _weights().items()}
    h0 = w["emb"][ids]
    s = h0 @ w["wa"] + h0
    mu = s.mean(-1, keepdims=True)
    var = ((s - mu) ** 2).mean(-1, keepdims=True)
    n = (s - mu) / np.sqrt(var + 1e-5) * w["gamma"] + w["beta"]
    u = n @ w["w1"] + w["b1"]
    g = np.maximum(u, 0)
    return {"input_ids": ids, "h0": h0, "s": s, "n": n, "u": u, "g": g}


def _feeds(n: int = 5, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, V, size=(1, 7 + i), dtype=np.int64)} for i in range(n)]


ALL = {"absmax", "mean_abs", "minmax", "xtx", "sample"}


@pytest.mark.parametrize("opt_level", ["all", "disable"])
def test_statistics_match_numpy(opt_level):
    feeds = _feeds()
    requests = {"h0": ALL, "s": ALL, "n": ALL, "u": {"xtx", "absmax"}, "g": {"mean_abs", "minmax"}}
    stats = collect_statistics(_toy_model(), feeds, requests, opt_level=opt_level)
    assert set(stats) == set(requests)
    refs = [_reference(f["input_ids"]) for f in feeds]
    for name, kinds in requests.items():
        x = np.concatenate([r[name].reshape(-1, r[name].shape[-1]) for r in refs])  # [n, C]
        st = stats[name]
        assert st.count == x.shape[0]
        assert st.kinds == {Stat(k) for k in kinds}
        tol = dict(rtol=1e-4, atol=1e-4)
        if "absmax" in kinds:
            np.testing.assert_allclose(st.absmax, np.abs(x).max(0), **tol)
        if "mean_abs" in kinds:
            np.testing.assert_allclose(st.mean_abs, np.abs(x).mean(0), **tol)
        if "minmax" in kinds:
            np.testing.assert_allclose([st.min, st.max], [x.min(), x.max()], **tol)
        if "xtx" in kinds:
            assert st.xtx.dtype == np.float64
            np.testing.assert_allclose(st.xtx, x.T @ x, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(st.hessian(), 2 / x.shape[0] * (x.T @ x), rtol=1e-4, atol=1e-3)
        if "sample" in kinds:  # fewer rows than the reservoir: every row, in order
            np.testing.assert_allclose(st.sample, x, **tol)


def test_graph_input_statistics_come_from_the_feed():
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, V, size=(1, 9), dtype=np.int64)} for _ in range(3)]
    stats = collect_statistics(_toy_model(), feeds, {"input_ids": {"minmax"}})
    ids = np.concatenate([f["input_ids"].ravel() for f in feeds])
    assert (stats["input_ids"].min, stats["input_ids"].max) == (ids.min(), ids.max())


def test_observer_streaming_equals_one_shot_and_reservoir_is_bounded_and_seeded():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((3, 11, 6)).astype(np.float32) for _ in range(7)]  # 231 rows
    whole = np.concatenate([c.reshape(-1, 6) for c in chunks])
    obs = TensorObserver(ALL, sample_rows=50, seed=3)
    for c in chunks:
        obs.update(c)
    st = obs.finalize()
    np.testing.assert_allclose(st.xtx, whole.astype(np.float64).T @ whole, rtol=1e-12)
    np.testing.assert_array_equal(st.absmax, np.abs(whole).max(0))
    assert st.sample.shape == (50, 6)
    # every sampled row is a real row, without repeats
    rows = {r.tobytes() for r in whole}
    assert all(r.tobytes() in rows for r in st.sample)
    assert len({r.tobytes() for r in st.sample}) == 50
    again = TensorObserver(ALL, sample_rows=50, seed=3)
    for c in chunks:
        again.update(c)
    np.testing.assert_array_equal(again.finalize().sample, st.sample)


def test_observer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown statistic"):
        TensorObserver({"median"})


def test_scaled_is_exact_for_x_over_s():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    a, b = TensorObserver(ALL), TensorObserver(ALL)
    a.update(x)
    b.update((x.astype(np.float64) / s).astype(np.float32))
    sa, sb = Statistics({"x": a.finalize()}).scaled("x", s)["x"], b.finalize()
    np.testing.assert_allclose(sa.absmax, sb.absmax, rtol=1e-6)
    np.testing.assert_allclose(sa.mean_abs, sb.mean_abs, rtol=1e-6)
    np.testing.assert_allclose(sa.xtx, sb.xtx, rtol=1e-5)
    np.testing.assert_allclose(sa.sample, sb.sample, rtol=1e-6)
    assert sa.min is None and sa.minmax_stale and sa.count == sb.count


def test_npz_round_trip_with_awkward_names(tmp_path):
    rng = np.random.default_rng(0)
    entries = {}
    for i, name in enumerate(["/model/layers.0/mlp/Mul_output_0", "a::b", "x.npy"]):
        obs = TensorObserver(ALL if i != 1 else {"absmax"}, sample_rows=8)
        obs.update(rng.standard_normal((2, 10, 4)).astype(np.float32))
        entries[name] = obs.finalize()
    stats = Statistics(entries).scaled("x.npy", np.full(4, 2.0, np.float32))
    path = stats.save(tmp_path / "stats.npz")
    back = Statistics.load(path)
    assert list(back) == list(stats)
    for name, st in stats.items():
        got = back[name]
        assert (got.count, got.channels, got.min, got.max, got.minmax_stale) == (
            st.count, st.channels, st.min, st.max, st.minmax_stale,
        )
        for f in ("absmax", "mean_abs", "xtx", "sample"):
            want = getattr(st, f)
            if want is None:
                assert getattr(got, f) is None
            else:
                np.testing.assert_array_equal(getattr(got, f), want)


def test_load_rejects_foreign_npz(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(2))
    with pytest.raises(UserError, match="not a ptqonnx statistics file"):
        Statistics.load(tmp_path / "x.npz")


def test_unknown_value_name_is_a_user_error():
    with pytest.raises(UserError, match=r"no values named \['nope'\]"):
        collect_statistics(_toy_model(), _feeds(1), {"n": {"absmax"}, "nope": {"absmax"}})
    with pytest.raises(UserError, match="constant initializers"):
        collect_statistics(_toy_model(), _feeds(1), {"w1": {"absmax"}})


def test_input_model_and_file_unchanged(tmp_path):
    model = _toy_model()
    outputs_before = [v.name for v in model.graph.outputs]
    path = tmp_path / "toy.onnx"
    ir.save(model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    collect_statistics(model, _feeds(2), {"g": {"absmax"}, "n": {"xtx"}})
    assert [v.name for v in model.graph.outputs] == outputs_before
    stats = collect_statistics(path, _feeds(2), {"g": {"absmax"}})
    assert stats["g"].count == 7 + 8
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.onnx"]


def test_model_with_external_data(tmp_path):
    path = tmp_path / "toy.onnx"
    ir.save(_toy_model(), path, external_data="toy.onnx.data", size_threshold_bytes=0)
    feeds = _feeds(2)
    stats = collect_statistics(path, feeds, {"n": {"absmax"}})
    x = np.concatenate([_reference(f["input_ids"])["n"].reshape(-1, D) for f in feeds])
    np.testing.assert_allclose(stats["n"].absmax, np.abs(x).max(0), rtol=1e-4, atol=1e-4)


def test_progress_is_reported():
    seen = []
    collect_statistics(_toy_model(), _feeds(3), {"g": {"absmax"}}, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


# --- sources --------------------------------------------------------------------------------------------


class _WordTokenizer:
    """Stands in for `tokenizers.Tokenizer`: one id per whitespace-separated word."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self._Enc([len(w) for w in text.split()])


@pytest.fixture
def word_tokenizer(monkeypatch):
    import ptqonnx.calibration.sources as sources

    monkeypatch.setattr(sources, "load_tokenizer", lambda d: _WordTokenizer())


def test_calib_config_validation():
    with pytest.raises(ValueError, match="samples"):
        CalibConfig(samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        CalibConfig(seq_len=1)
    with pytest.raises(ValueError, match="not both"):
        CalibConfig(text="a.txt", npz="b.npz")
    assert CalibConfig(text="a.txt").text.name == "a.txt"


def test_text_source_windows(tmp_path, word_tokenizer):
    (tmp_path / "c.txt").write_text(" ".join("w" * (i % 7 + 1) for i in range(200)))
    cfg = CalibConfig(text=tmp_path / "c.txt", samples=4, seq_len=16, seed=0)
    feeds = calibration_batches(cfg, tmp_path, ["input_ids", "attention_mask"])
    assert len(feeds) == 4
    assert feeds[0]["input_ids"].shape == (1, 16) and feeds[0]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds[0]["attention_mask"], np.ones((1, 16)))
    again = calibration_batches(cfg, tmp_path, ["input_ids", "attention_mask"])
    np.testing.assert_array_equal(feeds[3]["input_ids"], again[3]["input_ids"])


def test_text_source_errors(tmp_path, word_tokenizer):
    (tmp_path / "short.txt").write_text("a b c")
    with pytest.raises(UserError, match="not more than one window"):
        calibration_batches(CalibConfig(text=tmp_path / "short.txt", seq_len=8), tmp_path)
    with pytest.raises(UserError, match="not found"):
        calibration_batches(CalibConfig(text=tmp_path / "missing.txt"), tmp_path)
    with pytest.raises(UserError, match=r"also needs past_key_values.0.key; pass --calib-npz"):
        calibration_batches(  # a name alone: no shape to build its empty cache from
            CalibConfig(text=tmp_path / "short.txt"), tmp_path, ["input_ids", "past_key_values.0.key"]
        )
    many = ["input_ids"] + [f"extra_{i}" for i in range(5)]
    with pytest.raises(UserError, match=r"needs extra_0, extra_1, extra_2 and 2 more; pass --calib-npz"):
        calibration_batches(CalibConfig(text=tmp_path / "short.txt"), tmp_path, many)


def _kv_inputs(key_shape, dtype=ir.DataType.FLOAT) -> list[ir.Value]:
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    return [ids, *(ir.Value(name=f"past_key_values.0.{kv}", type=ir.TensorType(dtype), shape=ir.Shape(key_shape))
                   for kv in ("key", "value"))]


def test_text_feeds_an_empty_cache(tmp_path, word_tokenizer):
    """A KV-cache export calibrates through its prefill: the cache inputs get zero-length arrays of the
    graph's dtype with its fixed heads and head_dim; an unbuildable cache is one line naming the fix."""
    (tmp_path / "t.txt").write_text("x " * 100)
    cfg = CalibConfig(text=tmp_path / "t.txt", samples=2, seq_len=8)
    feeds = calibration_batches(cfg, tmp_path, _kv_inputs(["batch", 2, "past", 16], ir.DataType.FLOAT16))
    assert len(feeds) == 2 and feeds[0]["input_ids"].shape == (1, 8)
    for kv in ("key", "value"):
        past = feeds[0][f"past_key_values.0.{kv}"]
        assert past.shape == (1, 2, 0, 16) and past.dtype == np.float16
    with pytest.raises(UserError, match=r"symbolic axis 1 .*export with fixed heads and head_dim, or pass"):
        calibration_batches(cfg, tmp_path, _kv_inputs(["batch", "heads", "past", 16]))
    with pytest.raises(UserError, match=r"past_key_values.0.key has type INT64, not a float type; pass"):
        calibration_batches(cfg, tmp_path, _kv_inputs(["batch", 2, "past", 16], ir.DataType.INT64))
    np.savez(tmp_path / "c.npz", input_ids=np.arange(16, dtype=np.int64).reshape(2, 8))  # the cache left out
    feeds = calibration_batches(CalibConfig(npz=tmp_path / "c.npz"), tmp_path, _kv_inputs(["b", 2, "p", 16]))
    assert len(feeds) == 2 and feeds[1]["past_key_values.0.value"].shape == (1, 2, 0, 16)


def test_env_text_default(tmp_path, word_tokenizer, monkeypatch):
    (tmp_path / "env.txt").write_text("x " * 100)
    monkeypatch.setenv("PTQONNX_CALIB_TEXT", str(tmp_path / "env.txt"))
    assert len(calibration_batches(CalibConfig(samples=2, seq_len=8), tmp_path)) == 2


def test_npz_source(tmp_path):
    ids = np.arange(30, dtype=np.int64).reshape(3, 10)
    np.savez(tmp_path / "c.npz", input_ids=ids)
    feeds = calibration_batches(CalibConfig(npz=tmp_path / "c.npz"), tmp_path, ["input_ids"])
    assert len(feeds) == 3
    np.testing.assert_array_equal(feeds[1]["input_ids"], ids[1:2])
    np.savez(tmp_path / "bad.npz", tokens=ids)
    with pytest.raises(UserError, match=r"unknown \['tokens'\].*missing \['input_ids'\]"):
        calibration_batches(CalibConfig(npz=tmp_path / "bad.npz"), tmp_path, ["input_ids"])
    with pytest.raises(UserError, match="not found"):
        calibration_batches(CalibConfig(npz=tmp_path / "nope.npz"), tmp_path)


def _no_wikitext(monkeypatch, module):
    monkeypatch.delenv("PTQONNX_CALIB_TEXT", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_no_data_offline_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore details")

    _no_wikitext(monkeypatch, types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError) as err:
        calibration_batches(CalibConfig(), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("no calibration data: pass --calib-text FILE or --calib-npz FILE")
    assert "Couldn't reach 'wikitext'" in msg

    _no_wikitext(monkeypatch, None)  # `import datasets` raises ImportError
    with pytest.raises(UserError, match="WikiText-2 download failed: the `datasets` package is not installed"):
        calibration_batches(CalibConfig(), tmp_path)


def test_float32_chunked_xtx_close_to_float64():
    """The fast path (float32 GEMM per update, float64 total) stays within float32 rounding of the exact sum."""
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((512, 48)).astype(np.float32) * 10 for _ in range(6)]
    fast = TensorObserver({"xtx"}, xtx_chunk_dtype=np.float32)
    for c in chunks:
        fast.update(c)
    whole = np.concatenate(chunks).astype(np.float64)
    exact = whole.T @ whole
    assert fast.finalize().xtx.dtype == np.float64
    np.testing.assert_allclose(fast.finalize().xtx, exact, rtol=1e-5, atol=1e-3 * np.abs(exact).max() * 1e-3)
