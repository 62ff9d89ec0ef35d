"""`eval`: perplexity against an independent numpy computation on a tiny graph, on the tiny LLaMA with and
without KV cache, and errors; cosine similarity of an encoder's outputs against numpy's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import model_from_text, save
from ptqonnx.errors import UserError
from ptqonnx.runtime.compare import cosine, output_similarity
from ptqonnx.runtime.perplexity import perplexity, window_nll

VOCAB = 11
D = 8
# A BERT-like encoder: token + token-type embeddings, masked, one linear layer -> last_hidden_state, and a
# pooled output tanh(h[:, 0] @ wp)
ENCODER = f"""<ir_version: 10, opset_import: ["" : 21]>
enc (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, int64[batch, seq] token_type_ids)
 => (float[batch, seq, {D}] last_hidden_state, float[batch, {D}] pooler_output) {{
  e = Gather(emb, input_ids)
  t = Gather(temb, token_type_ids)
  m = Cast<to = 1>(attention_mask)
  m3 = Unsqueeze(m, axes)
  x = Add(e, t)
  xm = Mul(x, m3)
  last_hidden_state = MatMul(xm, w)
  first = Gather<axis = 1>(last_hidden_state, zero)
  p = MatMul(first, wp)
  pooler_output = Tanh(p)
}}"""


def _encoder_weights(noise: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = {"emb": rng.standard_normal((VOCAB, D)), "temb": rng.standard_normal((2, D)), "w": rng.standard_normal((D, D)),
         "wp": rng.standard_normal((D, D))}
    w["w"] = w["w"] + noise * np.random.default_rng(1).standard_normal((D, D))  # the "quantization error"
    w = {k: v.astype(np.float32) for k, v in w.items()}
    return {**w, "axes": np.array([2], np.int64), "zero": np.array(0, np.int64)}


def _encoder_numpy(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, types: np.ndarray):
    """The encoder in float64 numpy: (last_hidden_state, pooler_output)."""
    f = {k: v.astype(np.float64) for k, v in w.items()}
    h = (f["emb"][ids] + f["temb"][types]) * mask[..., None] @ f["w"]
    return h, np.tanh(h[:, 0] @ f["wp"])


def _numpy_cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]


def _bigram_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """logits[b, t, :] = table[input_ids[b, t], :] (a bigram model), in ONNX text."""
    table = (np.random.default_rng(0).standard_normal((VOCAB, VOCAB)) * 3).astype(np.float32)
    model = onnx.parser.parse_model(
        f"""<ir_version: 10, opset_import: ["" : 21]>
        g (int64[batch, sequence] input_ids) => (float[batch, sequence, {VOCAB}] logits) {{
            logits = Gather<axis = 0>(table, input_ids)
        }}"""
    )
    model.graph.initializer.append(numpy_helper.from_array(table, "table"))
    onnx.checker.check_model(model)
    path = tmp_path / "bigram.onnx"
    onnx.save(model, str(path))
    return path, table


def _reference_ppl(table: np.ndarray, windows: np.ndarray) -> float:
    """Independent: softmax probabilities in float64, then the mean of -log p(next token)."""
    t = table.astype(np.float64)
    probs = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)
    nll = [-math.log(probs[w[i], w[i + 1]]) for w in windows for i in range(len(w) - 1)]
    return math.exp(sum(nll) / len(nll))


def test_perplexity_matches_numpy_reference(tmp_path: Path) -> None:
    path, table = _bigram_model(tmp_path)
    windows = np.random.default_rng(1).integers(0, VOCAB, size=(5, 17)).astype(np.int64)
    seen = []
    res = perplexity(path, windows, progress=lambda done, total: seen.append((done, total)))
    assert res.windows == 5 and res.tokens_evaluated == 5 * 16
    assert res.ppl == pytest.approx(_reference_ppl(table, windows), rel=1e-9)
    assert res.nll_mean == pytest.approx(math.log(res.ppl), rel=1e-12)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_window_nll_ignores_last_logit_and_first_token() -> None:
    logits = np.zeros((4, VOCAB), np.float32)
    logits[3] = 1e9  # the last position predicts nothing inside the window
    tokens = np.array([5, 1, 2, 3])
    assert window_nll(logits, tokens) == pytest.approx(3 * math.log(VOCAB), rel=1e-12)


def test_perplexity_of_tiny_llama_matches_torch(tiny_export: Path, tiny_hf: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ptqonnx.models.tiny import tiny_corpus
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    text = " ".join(tiny_corpus(60, seed=3))
    windows = eval_windows(tokenize(text, load_tokenizer(tiny_export)), 32, 6)
    res = perplexity(tiny_export / "model.onnx", windows, threads=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows), use_cache=False).logits.numpy()
    nll = sum(window_nll(lg, w) for lg, w in zip(logits, windows))
    assert res.ppl == pytest.approx(math.exp(nll / res.tokens_evaluated), rel=1e-5)


def test_text_shorter_than_one_window_is_user_error(tiny_export: Path) -> None:
    from ptqonnx.text import eval_windows, load_tokenizer, tokenize

    tokens = tokenize("A short text.", load_tokenizer(tiny_export))
    with pytest.raises(UserError, match="shorter than one window"):
        eval_windows(tokens, 512)


def test_kv_model_gives_the_no_cache_perplexity(tiny_export: Path) -> None:
    """model_kv.onnx (prefill after an empty cache) and model.onnx hold the same weights: same perplexity."""
    windows = np.random.default_rng(2).integers(0, 300, size=(4, 24)).astype(np.int64)
    plain = perplexity(tiny_export / "model.onnx", windows, threads=1)
    kv = perplexity(tiny_export / "model_kv.onnx", windows, threads=1)
    assert kv.tokens_evaluated == plain.tokens_evaluated == 4 * 23
    assert kv.ppl == pytest.approx(plain.ppl, rel=1e-4)


def test_eval_cli_prints_its_result_once(tiny_export: Path, tmp_path: Path, capsys) -> None:
    from ptqonnx.cli import main
    from ptqonnx.models.tiny import tiny_corpus

    text = tmp_path / "t.txt"
    text.write_text(" ".join(tiny_corpus(60, seed=3)))
    printed = []
    for name in ("model.onnx", "model_kv.onnx"):
        args = ["eval", str(tiny_export / name), "--text", str(text), "--seq-len", "32", "--threads", "1"]
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and "perplexity" not in err
        printed.append(out)
    assert printed[0].startswith("perplexity ") and printed[0] == printed[1]  # same to 4 decimals


def test_model_without_logits_points_to_reference(tmp_path: Path) -> None:
    path = save(model_from_text(ENCODER, _encoder_weights(0.0)), tmp_path / "enc.onnx")
    with pytest.raises(UserError, match="no logits.*--reference"):
        perplexity(path, np.zeros((1, 8), np.int64))


@pytest.mark.parametrize(
    "windows, match",
    [
        (np.zeros((0, 8), np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros((2, 1), np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros(8, np.int64), r"\[n >= 1, seq >= 2\]"),
        (np.zeros((1, 8), np.float32), "must be integers"),
        (np.full((1, 8), VOCAB, np.int64), "outside the model's vocabulary"),
    ],
)
def test_bad_windows_are_user_errors(tmp_path: Path, windows: np.ndarray, match: str) -> None:
    path, _ = _bigram_model(tmp_path)
    with pytest.raises(UserError, match=match):
        perplexity(path, windows)


def test_missing_model_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model not found"):
        perplexity(tmp_path / "missing.onnx", np.zeros((1, 8), np.int64))


def test_cosine_of_encoder_outputs_matches_numpy(tmp_path: Path) -> None:
    ref_w, q_w = _encoder_weights(0.0), _encoder_weights(0.3)
    ref = save(model_from_text(ENCODER, ref_w), tmp_path / "ref.onnx")
    quant = save(model_from_text(ENCODER, q_w), tmp_path / "q.onnx")
    windows = np.random.default_rng(3).integers(0, VOCAB, size=(5, 6)).astype(np.int64)

    same = output_similarity(ref, ref, windows)
    assert same.samples == 5 and [o.name for o in same.outputs] == ["last_hidden_state", "pooler_output"]
    for o in same.outputs:
        assert o.mean == pytest.approx(1.0, abs=1e-12) and o.min == pytest.approx(1.0, abs=1e-12)

    # token windows are fed with attention_mask = 1 and token_type_ids = 0
    ones, zeros = np.ones_like(windows), np.zeros_like(windows)
    want = [_numpy_cosines(a, b) for a, b in zip(_encoder_numpy(q_w, windows, ones, zeros),
                                                 _encoder_numpy(ref_w, windows, ones, zeros))]
    got = output_similarity(quant, ref, windows)
    for o, cos in zip(got.outputs, want):
        assert o.mean == pytest.approx(np.mean(cos), abs=1e-6) and o.min == pytest.approx(np.min(cos), abs=1e-6)
        assert o.min < 1 - 1e-4
    assert got.outputs[0].mean < 1


def test_cosine_eval_from_npz_through_the_cli(tmp_path: Path, capsys) -> None:
    from ptqonnx.cli import main

    ref_w, q_w = _encoder_weights(0.0), _encoder_weights(0.3)
    ref = save(model_from_text(ENCODER, ref_w), tmp_path / "ref.onnx")
    quant = save(model_from_text(ENCODER, q_w), tmp_path / "q.onnx")
    rng = np.random.default_rng(4)
    arrays = {"input_ids": rng.integers(0, VOCAB, size=(4, 7)), "attention_mask": rng.integers(0, 2, size=(4, 7)),
              "token_type_ids": rng.integers(0, 2, size=(4, 7))}  # [samples, seq]: each sample is a batch of 1
    arrays["attention_mask"][:, 0] = 1  # the pooled first token is never masked (no all-zero outputs)
    np.savez(tmp_path / "inputs.npz", **arrays)
    assert main(["eval", str(quant), "--reference", str(ref), "--inputs-npz", str(tmp_path / "inputs.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    feeds = (arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])
    want = [_numpy_cosines(a, b) for a, b in zip(_encoder_numpy(q_w, *feeds), _encoder_numpy(ref_w, *feeds))]
    assert lines == [f"{name}: cosine similarity mean {np.mean(c):.6f}, min {np.min(c):.6f} over 4 samples"
                     for name, c in zip(["last_hidden_state", "pooler_output"], want)]
    assert main(["eval", str(quant), "--inputs-npz", str(tmp_path / "inputs.npz")]) == 2  # no reference
    assert "--reference" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", **{k: v[:, None] for k, v in arrays.items()})  # one axis too many
    assert main(["eval", str(quant), "--reference", str(ref), "--inputs-npz", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Invalid rank for input: input_ids" in err[0]


def test_cosine_edge_cases() -> None:
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
    assert cosine(np.array([1.0, 0.0]), np.array([-1.0, 0.0])) == -1.0
    with pytest.raises(UserError, match="different sizes"):
        cosine(np.zeros(3), np.zeros(4))
