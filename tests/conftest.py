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
