"""ONNX Runtime sessions: the one place that imports onnxruntime for the rest of the package."""

from __future__ import annotations

import logging
from pathlib import Path

from ptqonnx.errors import UserError, require_module

__all__ = ["OPT_LEVELS", "GAP_TOLERANCE", "PRECISE_INT8", "PROVIDERS", "UNFUSED_INT8", "explain_gap", "make_session",
           "optimization_gap", "provider_names", "session_threads"]

# max relative output difference allowed between ORT_DISABLE_ALL and ORT_ENABLE_ALL on a probe input: fusions
# that change the arithmetic by design are held exact (QDQ->MatMulNBits at accuracy level 0), so a gap above
# this is a miscompute (an ORT fusion bug or a malformed rewrite), not quantization error, unless the model
# quantizes activations and its float-activation view agrees (`explain_gap`)
GAP_TOLERANCE = 0.1

# ORT's x86 u8s8 GEMM without VNNI (AVX2: vpmaddubsw) adds pairs of u8*s8 products in int16 and saturates: with
# full-range int8 weights its MatMulIntegerToFloat / QLinearMatMul fusions of QDQ MatMuls are off by up to 20 %
# per layer (measured: tests/test_io.py). The first option selects its exact (slower) kernel instead (ORT 1.32
# fails on some int8-activation QDQ graphs with it: per-axis zero points of the wrong length); the second keeps
# the QDQ nodes unfused (float MatMuls on dequantized values).
PRECISE_INT8 = {"session.x64quantprecision": "1"}
UNFUSED_INT8 = {"session.disable_quant_qdq": "1"}

logger = logging.getLogger(__name__)

# name -> GraphOptimizationLevel attribute
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


# --provider -> the execution providers a session asks for, in priority order (TensorRT's EP hands what it cannot
# run to CUDA's); never the CPU EP for a GPU provider: session.disable_cpu_ep_fallback makes a node no GPU EP
# takes a load error instead of a silent CPU run
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}


def provider_names(provider: str) -> list[str]:
    """The ORT provider names for `provider` (cpu, cuda, tensorrt), or a UserError saying what to install."""
    ort = require_module("onnxruntime", "test")
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    names = list(PROVIDERS[provider])
    have = ort.get_available_providers()
    if names[0] not in have:
        from importlib import metadata

        installed = {d.metadata["Name"].lower() for d in metadata.distributions() if d.metadata["Name"]}
        hint = ("both onnxruntime and onnxruntime-gpu are installed and the CPU build shadows the GPU one: pip "
                "uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
                if {"onnxruntime", "onnxruntime-gpu"} <= installed else
                "install onnxruntime-gpu (pip install -e \".[gpu]\") on a machine with a GPU, or use --provider cpu")
        raise UserError(f"--provider {provider}: this ONNX Runtime has no {names[0]} (it has {', '.join(have)}); "
                        f"{hint}")
    return names


def make_session(
    model: str | Path | bytes,
    *,
    opt_level: str = "all",
    threads: int | None = None,
    providers: list[str] | None = None,
    config: dict[str, str] | None = None,
    provider: str = "cpu",
):
    """An InferenceSession at `opt_level` (default: ORT's default, ORT_ENABLE_ALL) on `provider` (cpu, cuda,
    tensorrt: `PROVIDERS`; a GPU provider never falls back to the CPU EP), or on `providers` as given.

    `model` is a path (external data next to it is found by ORT) or serialized ModelProto bytes.
    """
    ort = require_module("onnxruntime", "test")
    if opt_level not in OPT_LEVELS:
        raise UserError(f"unknown optimization level {opt_level!r}; use one of {sorted(OPT_LEVELS)}")
    if providers is None:
        providers = provider_names(provider)
        if provider != "cpu":
            config = {**(config or {}), "session.disable_cpu_ep_fallback": "1"}
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime could not load the model: {first}") from None
    if providers != ["CPUExecutionProvider"]:
        logger.info("ONNX Runtime session on %s", ", ".join(sess.get_providers()))
    return sess


def session_threads(session) -> int:
    """The intra-op thread count a session runs with (0 means ORT's default: one per core)."""
    import os

    n = session.get_session_options().intra_op_num_threads
    return n if n > 0 else (os.cpu_count() or 1)


def _run(model: str | Path | bytes, feeds, level: str, config: dict[str, str] | None = None) -> list[list]:
    """Outputs of `model` on each feed at `level`, the QDQ -> MatMulNBits fusion at accuracy level 0 (its default,
    4, quantizes activations on purpose); one session at a time, freed after: never two copies of the weights."""
    exact = {"session.qdq_matmulnbits_accuracy_level": "0", **(config or {})}
    sess = make_session(model, opt_level=level, config=exact)
    names = [i.name for i in sess.get_inputs()]
    outs = [sess.run(None, {k: f[k] for k in names}) for f in feeds]
    del sess
    _release_freed_memory()
    return outs


def _max_gap(reference: list[list], other: list[list]) -> float:
    """max over feeds and outputs of max|y - y_ref| / max|y_ref| (inf where one has a NaN/inf the other has not)."""
    import numpy as np

    worst = 0.0
    for ref_outs, outs in zip(reference, other):
        for ref, out in zip(ref_outs, outs):
            ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
            if not np.array_equal(np.isfinite(ref), np.isfinite(out)):
                return float("inf")
            ok = np.isfinite(ref)
            if ok.any():
                worst = max(worst, float(np.abs(ref[ok] - out[ok]).max() / max(np.abs(ref[ok]).max(), 1e-30)))
    return worst


def optimization_gap(model: str | Path | bytes, feeds, config: dict[str, str] | None = None) -> float:
    """`_max_gap` between ORT_DISABLE_ALL's and ORT_ENABLE_ALL's outputs; `config`: more session options."""
    return _max_gap(_run(model, feeds, "disable", config), _run(model, feeds, "all", config))


def _activation_qdq_removed(model_path: Path) -> Path | None:
    """A copy of `model_path`'s graph beside it (sharing its data file) with every activation
    QuantizeLinear -> DequantizeLinear pair bypassed (the DequantizeLinear's readers read the float input),
    weights' DequantizeLinear kept; None when the model quantizes no activation."""
    import onnx
    from onnx import helper

    model_path = Path(model_path)
    m = onnx.load(str(model_path), load_external_data=False)
    consts = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    quants = {n.output[0]: n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    bypass = {n.output[0]: quants[n.input[0]].input[0] for n in m.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in quants}
    if not bypass:
        return None
    nodes = []
    for n in m.graph.node:
        if n.output and n.output[0] in bypass:
            continue
        n.input[:] = [bypass.get(i, i) for i in n.input]
        nodes.append(n)
    used = {i for n in nodes for i in n.input} | {o.name for o in m.graph.output}
    nodes = [n for n in nodes if not (n.op_type == "QuantizeLinear" and n.output[0] in quants
                                      and n.output[0] not in used)]
    for o in m.graph.output:  # a graph output that was a bypassed DequantizeLinear's: keep its name
        if o.name in bypass:
            nodes.append(helper.make_node("Identity", [bypass[o.name]], [o.name]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    out = model_path.with_name(f".{model_path.stem}.float_activations.onnx")
    onnx.save_model(m, str(out))
    return out


def explain_gap(model_path: Path, feeds, gap: float) -> str | None:
    """Why ORT_ENABLE_ALL computes other outputs than ORT_DISABLE_ALL (`gap`, from `optimization_gap`) when it
    is not a miscompute: a note for the user, or None (refuse the model).

    Static activation quantizers make a model's outputs ill-conditioned in float rounding: a fused kernel that
    sums in another order moves an activation across a rounding boundary, a whole step on a coarse grid, and
    that grows through the layers. So the check that separates a miscompute from that is the same graph with
    its activation Q/DQ pairs bypassed (weights' DequantizeLinear, every fusion of them and the rest of the
    graph kept): it must agree at both levels. The note then gives the measured gap, and, where it closes with
    ORT's QDQ fusions off, says that it is ORT's fused int8 kernels (on x86 without VNNI its u8s8 GEMM
    saturates int16 sums) and which session option runs the model exactly."""
    view = _activation_qdq_removed(model_path)
    if view is None:
        return None
    try:
        float_gap = optimization_gap(view, feeds)
    finally:
        view.unlink(missing_ok=True)
    if not float_gap <= GAP_TOLERANCE:
        return None
    ref = _run(model_path, feeds, "disable")
    note = (f"ONNX Runtime's optimized graph computes outputs up to {gap:.3g} (relative) away from its unoptimized "
            f"one on probe inputs, and {float_gap:.2g} with the activation quantizers bypassed: static activation "
            f"grids amplify float rounding differences here (`ptqonnx eval` measures what that costs)")
    if _max_gap(ref, _run(model_path, feeds, "all", UNFUSED_INT8)) <= GAP_TOLERANCE:
        try:
            precise = _max_gap(ref, _run(model_path, feeds, "all", PRECISE_INT8))
        except Exception:  # noqa: BLE001 - ORT's exact-kernel path fails on some graphs: then don't recommend it
            precise = float("inf")
        how = [f"{k}={v}" for k, v in (PRECISE_INT8 if precise <= GAP_TOLERANCE else {}).items()]
        how += [f"{k}={v}" for k, v in UNFUSED_INT8.items()]
        note = (f"ONNX Runtime's fused int8 kernels on this CPU compute outputs up to {gap:.3g} (relative) away "
                f"from this model's QDQ graph, which its other optimizations compute exactly (on x86 without VNNI "
                f"its u8s8 GEMM saturates int16 sums; TensorRT is not affected); on such CPUs set the session "
                f"option {' or '.join(how)} (SessionOptions.add_session_config_entry)")
    return note


def _release_freed_memory() -> None:
    """Hand the freed session's memory back to the OS (glibc keeps freed heap otherwise, so two sessions in a
    row would peak at twice one session's memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
