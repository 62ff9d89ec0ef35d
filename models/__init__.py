"""Hugging Face causal LM -> ONNX export, the real default model (SmolLM2-135M), tiny test models.

Modules (import them directly; none imports torch or transformers at import time):

- `ptqonnx.models.export`: `export_causal_lm(source, out_dir)` writes `model.onnx` (input_ids -> logits),
  optionally `model_kv.onnx` (optimum/genai KV-cache names), `config.json` and the tokenizer.
- `ptqonnx.models.smollm2`: `locate_smollm2_gguf()`, `load_hf_causal_lm(source)`.
- `ptqonnx.models.tiny`: `build_tiny_llama(out_dir)`, a seeded random LLaMA + byte-level BPE tokenizer.
"""
