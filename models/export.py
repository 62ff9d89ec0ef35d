"""Hugging Face causal LM -> ONNX (`model.onnx`, optionally `model_kv.onnx`), with config and tokenizer.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). The TorchScript exporter
(`dynamo=False`) fails on transformers 5.x LLaMA (`aten::diff` in the mask code has no ONNX symbolic).
The dynamo exporter's optimizer folds `Transpose(weight)` into the initializer, so every linear layer
is a plain `MatMul(x, W)` with a constant `W` [K, N] (in_features, out_features), the layout the
quantizer expects. The one exception is a tied `lm_head`: its weight is the embedding table
[vocab, hidden], shared with the `Gather`, and reaches its MatMul through a `Transpose` (the table is
stored once, not duplicated).

Attention is exported with transformers' eager implementation (explicit MatMul / Softmax / MatMul
with an additive causal mask) rather than SDPA, whose decomposition adds IsNaN/Where guards per layer.

After export the graph is tidied with onnx_ir: linear weights are renamed after their module
(`model.layers.0.self_attn.q_proj.weight`, stored as [K, N] = the torch weight transposed), the export
wrapper's prefix is dropped from names, and only the `pkg.torch.onnx.name_scopes` metadata is kept.

Graphs (optimum / onnxruntime-genai names):
  model.onnx     input_ids int64 [batch, sequence] -> logits float32 [batch, sequence, vocab]
                 (causal over the full window; no attention mask, positions 0..sequence-1)
  model_kv.onnx  input_ids [batch, sequence], attention_mask int64 [batch, total_sequence],
                 position_ids int64 [batch, sequence],
                 past_key_values.{i}.key / .value float32 [batch, kv_heads, past_sequence, head_dim]
                 -> logits, present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ptqonnx.errors import UserError, require_module
from ptqonnx.models.smollm2 import load_hf_causal_lm

__all__ = [
    "MODEL_FILE",
    "MODEL_KV_FILE",
    "DEFAULT_OPSET",
    "ExportResult",
    "export_causal_lm",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MODEL_KV_FILE = "model_kv.onnx"
CONFIG_FILE = "config.json"
DEFAULT_OPSET = 21
_TWO_GB = 2**31 - 1
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")
_KEEP_METADATA = "pkg.torch.onnx.name_scopes"
_WRAPPER_PREFIX = "m."


@dataclass(frozen=True)
class ExportResult:
    """What `export_causal_lm` wrote. `kv_model_path` is None when the KV-cache graph was not requested."""

    out_dir: Path
    model_path: Path
    kv_model_path: Path | None
    config_path: Path
    tokenizer_path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    seconds: float
    max_abs_diff: float | None  # ORT vs torch logits on the export example, when verified


def export_causal_lm(
    source: str,
    out_dir: str | Path,
    *,
    kv_cache: bool = True,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> ExportResult:
    """Export `source` ("smollm2" or a local HF causal-LM folder) into `out_dir`.

    Files are written into a temporary folder beside `out_dir` and moved in at the end, so an
    interrupted export never leaves a half-written model. With `verify`, `model.onnx` is run in
    ONNX Runtime on the example input and compared with the torch logits (`max_abs_diff`).
    """
    require_module("torch", "export")
    require_module("onnxscript", "export")
    if opset < 18:
        raise UserError(f"opset {opset} is too old for the dynamo exporter; pass --opset 18 or newer (21 preferred)")
    with _quiet():
        return _export(source, Path(out_dir), kv_cache=kv_cache, opset=opset, verify=verify)


def _export(source: str, out: Path, *, kv_cache: bool, opset: int, verify: bool) -> ExportResult:
    torch = require_module("torch", "export")
    t0 = time.perf_counter()
    model, tokenizer = load_hf_causal_lm(source)
    model.set_attn_implementation("eager")
    cfg = model.config
    num_layers = int(cfg.num_hidden_layers)
    num_kv_heads = int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    vocab = int(cfg.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ids = torch.tensor(
            np.random.default_rng(0).integers(0, vocab, size=(2, 8)), dtype=torch.int64
        )  # batch 2 so the batch dimension stays symbolic
        with torch.no_grad():
            onnx_program = torch.onnx.export(
                _logits_only(model).eval(),
                (ids,),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}},
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            reference = model(input_ids=ids, use_cache=False).logits.numpy()
        _save(onnx_program.model, tmp / MODEL_FILE, opset, {"logits": ["batch", "sequence", "vocab"]})
        logger.info("exported %s (%.1f s)", MODEL_FILE, time.perf_counter() - t0)

        max_abs_diff = None
        if verify:
            max_abs_diff = _verify(tmp / MODEL_FILE, ids.numpy(), reference)

        if kv_cache:
            t1 = time.perf_counter()
            _export_kv(model, tmp / MODEL_KV_FILE, opset, num_layers, num_kv_heads, head_dim, vocab)
            logger.info("exported %s (%.1f s)", MODEL_KV_FILE, time.perf_counter() - t1)

        _save_config(cfg, type(model).__name__, tmp / CONFIG_FILE)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise UserError(f"{source} has no fast tokenizer (tokenizer.json); pass a model with a tokenizers-backed tokenizer")
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    seconds = time.perf_counter() - t0
    logger.info("export of %s into %s done in %.1f s", source, out, seconds)
    return ExportResult(
        out_dir=out,
        model_path=out / MODEL_FILE,
        kv_model_path=out / MODEL_KV_FILE if kv_cache else None,
        config_path=out / CONFIG_FILE,
        tokenizer_path=out / "tokenizer.json",
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        seconds=seconds,
        max_abs_diff=max_abs_diff,
    )


def _module_classes():
    """nn.Module wrappers, defined lazily so importing this module does not import torch."""
    torch = require_module("torch", "export")
    transformers = require_module("transformers", "export")

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    class WithCache(torch.nn.Module):
        """Flat tensors <-> transformers DynamicCache (layer i's key/value at 2i, 2i+1)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = transformers.DynamicCache(pairs, config=self.m.config)
            outputs = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = outputs.past_key_values
            flat = []
            for layer in present.layers:
                flat.extend((layer.keys, layer.values))
            return (outputs.logits, *flat)

    return LogitsOnly, WithCache


def _logits_only(model):
    return _module_classes()[0](model)


def _export_kv(model, path: Path, opset: int, num_layers: int, kv_heads: int, head_dim: int, vocab: int) -> None:
    torch = require_module("torch", "export")
    _, WithCache = _module_classes()
    batch, seq, past = 2, 3, 5
    rng = np.random.default_rng(1)
    ids = torch.tensor(rng.integers(0, vocab, size=(batch, seq)), dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq).contiguous()
    kv = tuple(
        torch.randn(batch, kv_heads, past, head_dim, generator=torch.Generator().manual_seed(i))
        for i in range(2 * num_layers)
    )
    kv_names = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    past_dims = {0: "batch", 2: "past_sequence"}
    dynamic_shapes = (
        {0: "batch", 1: "sequence"},
        {0: "batch", 1: "total_sequence"},
        {0: "batch", 1: "sequence"},
        tuple([past_dims] * len(kv)),  # the *past varargs form one entry
    )
    with torch.no_grad():
        program = torch.onnx.export(
            WithCache(model).eval(),
            (ids, mask, pos, *kv),
            input_names=["input_ids", "attention_mask", "position_ids", *kv_names],
            output_names=["logits", *present_names],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    out_dims = {"logits": ["batch", "sequence", "vocab"]}
    out_dims.update({n: ["batch", kv_heads, "total_sequence", head_dim] for n in present_names})
    in_dims = {n: ["batch", kv_heads, "past_sequence", head_dim] for n in kv_names}
    in_dims["attention_mask"] = ["batch", "total_sequence"]
    _save(program.model, path, opset, out_dims, in_dims)


def _save(model, path: Path, opset: int, output_dims: dict[str, list], input_dims: dict[str, list] | None = None) -> None:
    """Tidy names and metadata, check the opset, and save (external data only past 2 GB)."""
    ir = require_module("onnx_ir", "export")
    got = model.opset_imports.get("", None)
    if got != opset:
        raise UserError(f"the exporter emitted opset {got}, not {opset}; pass --opset {got}")
    graph = model.graph
    _rename_values(graph)
    for node in graph.all_nodes():
        for key in [k for k in node.metadata_props if k != _KEEP_METADATA]:
            del node.metadata_props[key]
    for value in graph.outputs:
        if value.name in output_dims:
            value.shape = ir.Shape(output_dims[value.name])
    for value in graph.inputs:
        if input_dims and value.name in input_dims:
            value.shape = ir.Shape(input_dims[value.name])
    model.producer_name = "ptqonnx"
    size = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    if size > _TWO_GB:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        # Load initializers into memory so none keep pointing at the exporter's temporary files.
        for v in graph.initializers.values():
            if v.const_value is not None and not isinstance(v.const_value, ir.Tensor):
                v.const_value = ir.Tensor(v.const_value.numpy(), name=v.name)
        ir.save(model, path)


def _rename_values(graph) -> None:
    """Linear weights -> `{module}.weight`; drop the export wrapper prefix `m.` everywhere."""
    taken = {v.name for v in graph.initializers.values()}
    renames: dict[Any, str] = {}
    for node in graph:
        if node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or len(w.uses()) != 1 or w.name.startswith(_WRAPPER_PREFIX):
            continue
        scopes = node.metadata_props.get(_KEEP_METADATA)
        if not scopes:
            continue
        try:
            module = json.loads(scopes.replace("'", '"'))[-2]
        except (ValueError, IndexError):
            continue
        module = module[len(_WRAPPER_PREFIX):] if module.startswith(_WRAPPER_PREFIX) else module
        new = f"{module}.weight"
        if new not in taken:
            renames[w] = new
            taken.add(new)
    for v in graph.initializers.values():
        if v not in renames and v.name.startswith(_WRAPPER_PREFIX):
            new = v.name[len(_WRAPPER_PREFIX):]
            if new not in taken:
                renames[v] = new
                taken.add(new)
    for v, new in renames.items():
        v.name = new  # onnx_ir re-keys graph.initializers
    for node in graph:
        scopes = node.metadata_props.get(_KEEP_METADATA)
        if scopes:
            node.metadata_props[_KEEP_METADATA] = scopes.replace("'m.", "'")


def _verify(path: Path, ids: np.ndarray, reference: np.ndarray) -> float:
    from ptqonnx.runtime.ort import make_session

    session = make_session(path, opt_level="all")
    (logits,) = session.run(["logits"], {"input_ids": ids})
    diff = float(np.max(np.abs(logits - reference)))
    scale = float(np.max(np.abs(reference))) or 1.0
    if not np.isfinite(diff) or diff > 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"exported {path.name} disagrees with torch: max |diff| {diff:.3g} (logit scale {scale:.3g})")
    logger.info("verified %s against torch: max |diff| %.2e", path.name, diff)
    return diff


def _save_config(cfg, architecture: str, path: Path) -> None:
    """HF config.json, readable by transformers 4.57 too (plain `rope_theta` beside `rope_parameters`)."""
    data = cfg.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    data["architectures"] = [architecture]
    rope = data.get("rope_parameters") or {}
    if "rope_theta" not in data and isinstance(rope, dict) and "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    if "dtype" in data and "torch_dtype" not in data:
        data["torch_dtype"] = data["dtype"]
    data["dtype"] = data["torch_dtype"] = "float32"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _move_into(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MODEL_FILE + ".data", MODEL_KV_FILE + ".data", MODEL_KV_FILE):
        if (out / stale).exists() and not (tmp / stale).exists():
            (out / stale).unlink()
    for item in sorted(tmp.iterdir()):
        os.replace(item, out / item.name)


@contextmanager
def _quiet() -> Iterator[None]:
    """For the duration: no transformers tqdm bars, exporter/optimizer chatter at WARNING, and no
    deprecation/UserWarnings from torch.export internals (they concern torch's code, not the user's)."""
    hf_logging = require_module("transformers.utils.logging", "export")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if was_enabled:
            hf_logging.enable_progress_bar()
