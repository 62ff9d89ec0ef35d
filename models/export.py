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

The KV layout (kv_heads, head_dim per layer) is measured from the cache the model itself returns on a
two-token input, not read from config fields, whose names differ per architecture (`num_key_value_heads`,
GPT-2's `n_head`, OPT's and GPT-NeoX's `num_attention_heads`; `head_dim` explicit or hidden / heads). The
cache handed to the model is a plain `DynamicCache` of full layers, also for architectures with
sliding-window layers (Gemma-2, Mistral with `sliding_window`): `present` then always holds all
`total_sequence` positions (the onnxruntime-genai contract) and the window is applied by the model's own
sliding-window attention mask over that full cache, so logits equal the full-sequence model's. An
architecture whose cache is not one (key, value) pair of rank-4 tensors per layer is refused for
`model_kv.onnx` (pass --no-kv-cache).

Tokenizer: saved with the model's own class by transformers, then `tokenizer_config.json` names
`PreTrainedTokenizerFast` (known to transformers 4.x and 5.x alike; 5.x writes `TokenizersBackend`,
which 4.57 cannot load); the vocabulary and pre/post-processing live in `tokenizer.json`. A source
without tokenizer files exports the graphs without a tokenizer (one warning; `tokenizer_path` None).
"""

from __future__ import annotations

import inspect
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
from ptqonnx.progress import Advance, progress_task

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
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a tokenizer.json-backed class transformers 4.x and 5.x both know
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
    tokenizer_path: Path | None  # None when the source had no tokenizer files
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    seconds: float
    max_abs_diff: float | None  # ORT vs torch logits on the export example, when verified


EXPORT_DTYPES = ("float32", "float16")  # bfloat16: ONNX Runtime's CPU build has no bf16 Where/MatMul to verify it
# ORT against torch on the export example, relative to the logit scale: fp32 agrees to rounding; fp16 kernels
# accumulate differently (tiny LLaMA fp16: 1.4e-3)
_VERIFY_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


def export_causal_lm(
    source: str,
    out_dir: str | Path,
    *,
    kv_cache: bool = True,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    dtype: str = "float32",
) -> ExportResult:
    """Export `source` ("smollm2" or a local HF causal-LM folder) into `out_dir`.

    Files are written into a temporary folder beside `out_dir` and moved in at the end, so an
    interrupted export never leaves a half-written model. With `verify`, `model.onnx` is run in
    ONNX Runtime on the example input and compared with the torch logits (`max_abs_diff`). `dtype`
    (`EXPORT_DTYPES`: "float32" or "float16") is the float type the exported graph computes in (as optimum's
    `--dtype`): the weights are cast before tracing, so norms and softmax keep transformers' own float32 upcasts.
    bfloat16 is refused: ONNX Runtime's CPU build cannot run (so cannot verify or calibrate) a bf16 graph.
    """
    require_module("torch", "export")
    require_module("onnxscript", "export")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"cannot export in {dtype!r} (ONNX Runtime's CPU build has no bfloat16 kernels to verify "
                        f"and calibrate it); pass --dtype {' or '.join(EXPORT_DTYPES)}")
    if opset < 18:
        raise UserError(f"opset {opset} is too old for the dynamo exporter; pass --opset 18 or newer (21 preferred)")
    steps = 3 + int(verify) + int(kv_cache)  # load, model.onnx, [verify], [model_kv.onnx], the rest
    with _quiet(), progress_task("export", steps) as advance:
        return _export(source, Path(out_dir), kv_cache=kv_cache, opset=opset, verify=verify, dtype=dtype,
                       advance=advance)


def _export(source: str, out: Path, *, kv_cache: bool, opset: int, verify: bool, dtype: str,
            advance: Advance) -> ExportResult:
    torch = require_module("torch", "export")
    t0 = time.perf_counter()
    model, tokenizer = load_hf_causal_lm(source)
    advance(info=f"loaded {source}")
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.set_attn_implementation("eager")
    cfg = model.config
    vocab = int(cfg.vocab_size)
    layout = _cache_layout(model) if kv_cache else None
    num_layers = int(cfg.num_hidden_layers)
    num_kv_heads, head_dim = layout[0][0] if layout else _config_kv(cfg)

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
            reference = model(input_ids=ids, use_cache=False).logits.float().numpy()
        _save(onnx_program.model, tmp / MODEL_FILE, opset, {"logits": ["batch", "sequence", "vocab"]})
        logger.debug("exported %s (%.1f s)", MODEL_FILE, time.perf_counter() - t0)  # at INFO: the progress line
        advance(info=f"traced {MODEL_FILE}")

        max_abs_diff = None
        if verify:
            max_abs_diff = _verify(tmp / MODEL_FILE, ids.numpy(), reference, _VERIFY_TOLERANCE[dtype])
            advance(info=f"verified against torch: max |diff| {max_abs_diff:.2e}")

        if kv_cache:
            t1 = time.perf_counter()
            _export_kv(model, tmp / MODEL_KV_FILE, opset, layout, vocab, getattr(torch, dtype))
            logger.debug("exported %s (%.1f s)", MODEL_KV_FILE, time.perf_counter() - t1)
            advance(info=f"traced {MODEL_KV_FILE}")

        _save_config(cfg, type(model).__name__, tmp / CONFIG_FILE, dtype)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, source)
        _move_into(tmp, out)
        advance(info="config and tokenizer saved" if tokenizer is not None else "config saved")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    seconds = time.perf_counter() - t0
    logger.info("export of %s into %s done in %.1f s", source, out, seconds)
    return ExportResult(
        out_dir=out,
        model_path=out / MODEL_FILE,
        kv_model_path=out / MODEL_KV_FILE if kv_cache else None,
        config_path=out / CONFIG_FILE,
        tokenizer_path=out / TOKENIZER_FILE if tokenizer is not None else None,
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
            cache = transformers.DynamicCache(pairs)  # full layers only (see the module docstring)
            outputs = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{_cache_arg(self.m): cache},
            )
            present = _cache_of(outputs)
            flat = []
            for layer in present.layers:
                flat.extend((layer.keys, layer.values))
            return (outputs.logits, *flat)

    return LogitsOnly, WithCache


def _cache_arg(model) -> str:
    """The forward argument taking the cache: `cache` from transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(outputs):
    """The cache a forward returned (`cache` from transformers 5.x, `past_key_values` before)."""
    cache = outputs.get("cache") if hasattr(outputs, "get") else None
    return cache if cache is not None else outputs.past_key_values


def _logits_only(model):
    return _module_classes()[0](model)


_Layout = list[tuple[tuple[int, int], tuple[int, int]]]  # per layer: key (heads, dim), value (heads, dim)


def _config_kv(cfg) -> tuple[int, int]:
    """(kv_heads, head_dim) from the config when no KV graph is made: `num_key_value_heads` where the
    architecture has one, else one K/V head per head (GPT-2, OPT, GPT-NeoX); `head_dim` else hidden / heads."""
    heads = int(cfg.num_attention_heads)  # GPT-2's n_head through its config's attribute_map
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return kv_heads, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def _cache_layout(model) -> _Layout:
    """The (heads, dim) of every layer's key and value in the cache the model returns for two tokens."""
    torch = require_module("torch", "export")
    with torch.no_grad():
        cache = _cache_of(model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True))
    layers = getattr(cache, "layers", None)
    kinds = (type(cache).__name__, model.config.model_type)
    if not layers or not all(getattr(lay, "keys", None) is not None and getattr(lay, "values", None) is not None
                             and lay.keys.dim() == 4 and lay.values.dim() == 4 for lay in layers):
        raise UserError(f"{kinds[1]}: its cache ({kinds[0]}) is not one (key, value) pair of [batch, heads, "
                        "sequence, dim] tensors per layer, the form model_kv.onnx takes; pass --no-kv-cache")
    if any(lay.keys.shape[2] != 2 for lay in layers):
        raise UserError(f"{kinds[1]}: its cache does not keep one entry per position (a compressed cache); "
                        "pass --no-kv-cache")
    return [((int(lay.keys.shape[1]), int(lay.keys.shape[3])), (int(lay.values.shape[1]), int(lay.values.shape[3])))
            for lay in layers]


def _export_kv(model, path: Path, opset: int, layout: _Layout, vocab: int, dtype) -> None:
    torch = require_module("torch", "export")
    _, WithCache = _module_classes()
    batch, seq, past = 2, 3, 5
    num_layers = len(layout)
    rng = np.random.default_rng(1)
    ids = torch.tensor(rng.integers(0, vocab, size=(batch, seq)), dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq).contiguous()
    kv_dims = [dims for pair in layout for dims in pair]  # (heads, dim) of past i, in input order
    kv = tuple(
        torch.randn(batch, heads, past, dim, generator=torch.Generator().manual_seed(i)).to(dtype)
        for i, (heads, dim) in enumerate(kv_dims)
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
    out_dims.update({n: ["batch", h, "total_sequence", d] for n, (h, d) in zip(present_names, kv_dims)})
    in_dims = {n: ["batch", h, "past_sequence", d] for n, (h, d) in zip(kv_names, kv_dims)}
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


def _verify(path: Path, ids: np.ndarray, reference: np.ndarray, tolerance: float) -> float:
    from ptqonnx.runtime.ort import make_session

    session = make_session(path, opt_level="all")
    (logits,) = session.run(["logits"], {"input_ids": ids})
    diff = float(np.max(np.abs(logits.astype(np.float32) - reference)))
    scale = float(np.max(np.abs(reference))) or 1.0
    if not np.isfinite(diff) or diff > tolerance * max(scale, 1.0):
        raise RuntimeError(f"exported {path.name} disagrees with torch: max |diff| {diff:.3g} (logit scale {scale:.3g})")
    logger.debug("verified %s against torch: max |diff| %.2e", path.name, diff)
    return diff


def _save_config(cfg, architecture: str, path: Path, dtype: str = "float32") -> None:
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
    data["dtype"] = data["torch_dtype"] = dtype
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer, folder: Path, source: str) -> None:
    """save_pretrained, then name a class in tokenizer_config.json that transformers 4.x and 5.x both load."""
    tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{source} has no fast tokenizer ({TOKENIZER_FILE}); pass a model with a tokenizers-backed "
                        "tokenizer")
    path = folder / TOKENIZER_CONFIG_FILE
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key in ("backend", "is_local", "local_files_only"):  # 5.x's backend marker; load-time kwargs it keeps
        data.pop(key, None)
    data["tokenizer_class"] = TOKENIZER_CLASS
    # the input names the source's tokenizer class declares: PreTrainedTokenizerFast would otherwise add
    # token_type_ids, which a decoder's generate() refuses (transformers 4.57, optimum's ORTModelForCausalLM)
    data["model_input_names"] = list(tokenizer.model_input_names)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MODEL_FILE + ".data", MODEL_KV_FILE + ".data", MODEL_KV_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                  "special_tokens_map.json"):
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
