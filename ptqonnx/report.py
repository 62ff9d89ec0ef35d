"""The typed report of a compile, built by the pipeline from the methods' summaries.

Methods never touch the report: each returns a `StageSummary` (a frozen dataclass of names and numbers) in
its `MethodResult`; the pipeline adds what it measured itself (sites, skips, sizes, time, memory). `lines()`
is what the CLI prints; `to_dict()` is the JSON form.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptqonnx.graph import Skip

__all__ = [
    "StageSummary", "WeightsSummary", "ConvSummary", "BudgetSummary", "ScalesSummary", "RotationSummary", "W8A8Summary",
    "CompileReport",
]


@dataclass(frozen=True)
class StageSummary:
    """What one stage did. Subclasses add fields; `lines()` says it in words (empty: nothing worth a line)."""

    stage: str

    def lines(self) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **_jsonable(dataclasses.asdict(self))}


@dataclass(frozen=True)
class WeightsSummary(StageSummary):
    """A weights stage: how many layers it planned, from what calibration, and GPTQ's losses per weight."""

    layers: int = 0
    calibration: str = ""
    losses: dict[str, float] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)  # layer -> why its data gave no signal (RTN used)

    def lines(self) -> list[str]:
        out = []
        if self.calibration:
            loss = f"; loss summed over layers {sum(self.losses.values()):.4g}" if self.losses else ""
            out.append(f"{self.stage}: calibration {self.calibration}{loss}")
        if self.fallback:
            out.append(f"{self.stage}: {len(self.fallback)} layers fell back to RTN (calibration input "
                       f"{', '.join(sorted(set(self.fallback.values())))}): {', '.join(list(self.fallback)[:3])}")
        return out


@dataclass(frozen=True)
class ConvSummary(StageSummary):
    """The Conv layers: INT8 (or FP8) weights per output channel, whatever the linear layers' grid."""

    layers: int = 0
    grid: str = ""  # "INT8 symmetric per output channel", ...
    static_activations: int = 0  # of them with a static per-tensor activation grid (W8A8)

    def lines(self) -> list[str]:
        act = (f", {self.static_activations} with static per-tensor activations" if self.static_activations
               else ", activations float")
        return [f"conv: {self.layers} Conv layers with {self.grid} weights (DequantizeLinear){act}"]


@dataclass(frozen=True)
class BudgetSummary(StageSummary):
    """Mixed precision under `--budget-bits`: the layers raised to 8 bits per channel and the bits reached."""

    budget_bits: float | None = None  # --budget-bits (None: the budget was --max-size-mb)
    max_size_mb: float | None = None
    planned_bytes: int | None = None  # --max-size-mb: the file size the choice was estimated to write
    bits_per_weight: float = 0.0  # reached, codes + scales + zero points as written
    grid_bits: float = 0.0  # with no layer raised
    high: tuple[str, ...] = ()
    errors: dict[str, float] = field(default_factory=dict)  # layer -> its error on the grid (the ranking)
    measured: str = ""

    def lines(self) -> list[str]:
        top = sorted(self.errors, key=self.errors.get, reverse=True)[:3]
        asked = (f"{self.max_size_mb:g} MiB (about {self.planned_bytes / 2**20:.2f} MiB planned)"
                 if self.max_size_mb is not None else f"{self.budget_bits:g} bits per weight")
        return [f"budget {asked}: {len(self.high)} of {len(self.errors)} layers at 8 "
                f"bits per channel, {self.bits_per_weight:.3f} bits per weight ({self.grid_bits:.3f} with none); "
                f"ranked by {self.measured}; largest errors: {', '.join(top)}"]


def _cache_lines(stage: str, outputs: tuple[str, ...], held: str, what: str) -> list[str]:
    """The line saying a KV cache now holds transformed values (R2, the v->o scale through the cache)."""
    if not outputs:
        return []
    return [f"{stage}: the KV cache holds {held} values ({len(outputs)} outputs such as {outputs[0]}): feed it back "
            f"to this model only (--keep-cache-values: no {what} where V is cached)"]


@dataclass(frozen=True)
class ScalesSummary(StageSummary):
    """A scaling stage (AWQ, SmoothQuant): the scale per group, folded or inserted, and the fold check."""

    groups: int = 0
    folded: tuple[str, ...] = ()
    inserted: tuple[str, ...] = ()
    alpha: dict[str, float] = field(default_factory=dict)  # chosen alpha per group (activation name)
    fold_max_rel_err: float | None = None
    not_scaled: tuple[Skip, ...] = ()  # sites whose group could not be scaled, with the reason
    calibration: str = ""
    scaled_cache: tuple[str, ...] = ()  # KV-cache present outputs holding V / s (the v->o scale through the cache)

    def lines(self) -> list[str]:
        alphas = sorted(self.alpha.values())
        median = f"median alpha {alphas[len(alphas) // 2]:.2f}; " if alphas else ""
        unscaled = self.groups - len(self.folded) - len(self.inserted)
        err = f"float outputs unchanged to {self.fold_max_rel_err:.1g}" if self.fold_max_rel_err is not None else \
            "nothing folded"
        out = [f"{self.stage}: {len(self.folded)} scale groups folded, {len(self.inserted)} with an inserted Mul, "
               f"{unscaled} unscaled; {median}{err}"]
        out += _cache_lines(self.stage, self.scaled_cache, "scaled", "v->o scale")
        if self.not_scaled:
            reasons = Counter(s.reason for s in self.not_scaled).most_common(1)[0]
            out.append(f"{self.stage}: {len(self.not_scaled)} layers not scaled, e.g. {reasons[0]} ({reasons[1]}x)")
        return out


@dataclass(frozen=True)
class RotationSummary(StageSummary):
    """The rotate stage: which rotations, how many heads / layers, the untied LM head's bytes, the float check."""

    rotation: str = ""
    residual: bool = False
    heads: int = 0  # v/o pairs rotated (R2)
    online: int = 0  # layers given an online Hadamard (R4)
    untied_bytes: int = 0
    not_rotated: tuple[Skip, ...] = ()
    fold_max_rel_err: float | None = None
    rotated_cache: tuple[str, ...] = ()  # KV-cache outputs holding rotated V (R2 through the cache)

    def lines(self) -> list[str]:
        parts = ["R1 residual stream"] + ([f"R2 {self.heads} value heads"] if self.heads else []) + (
            [f"R4 online Hadamard before {self.online} layers"] if self.online else [])
        untied = f"; LM head untied (+{self.untied_bytes / 2**20:.1f} MiB)" if self.untied_bytes else ""
        out = [f"rotate ({self.rotation}): {', '.join(parts)}{untied}; float outputs unchanged to "
               f"{self.fold_max_rel_err:.1g}"]
        out += _cache_lines("rotate", self.rotated_cache, "rotated", "R2")
        if self.not_rotated:
            out.append(f"rotate: {len(self.not_rotated)} layers not rotated, e.g. {self.not_rotated[0].reason}")
        return out


@dataclass(frozen=True)
class W8A8Summary(StageSummary):
    target: str = ""
    qtype: str = "int8"
    static_layers: int = 0
    dynamic_layers: int = 0
    bmm_nodes: int = 0
    calibration: str = ""
    weight_only: tuple[str, ...] = ()  # layers whose calibration input was all zero: INT8 weights, float input
    token_outliers: dict[str, float] = field(default_factory=dict)  # layer -> median token's levels (float input)

    def lines(self) -> list[str]:
        dyn = f", {self.dynamic_layers} dynamic per row and block" if self.dynamic_layers else ""
        bmm = f", {self.bmm_nodes} attention MatMuls" if self.bmm_nodes else ""
        kind = "FP8 E4M3 " if self.qtype == "fp8" else ""
        out = [f"{kind}W8A8 ({self.target}): activations of {self.static_layers} layers static per tensor{dyn}{bmm}; "
               f"calibration {self.calibration}"]
        if self.target == "tensorrt":  # measured: benchmarks/results/targets.md, smoothquant.md (SmolLM2)
            out.append(f"W8A8: the TensorRT form runs on ONNX Runtime CPU as DequantizeLinear + float MatMul, "
                       f"{'slower than' if self.qtype == 'fp8' else 'about as fast as'} FP32 there (measured "
                       f"{'1.3-1.6x' if self.qtype == 'fp8' else '0.9-1.0x'} FP32 prefill on SmolLM2); "
                       "--target ort-cpu writes what ORT CPU runs in int8 (0.6x)")
        if self.weight_only:
            out.append(f"W8A8: {len(self.weight_only)} layers saw all-zero calibration inputs and keep float "
                       f"activations (INT8 weights only): {', '.join(self.weight_only[:3])}")
        if self.token_outliers:
            worst = sorted(self.token_outliers.items(), key=lambda kv: kv[1])[:3]
            out.append(f"W8A8: {len(self.token_outliers)} layers keep float activations (INT8 weights): a few tokens "
                       f"set their range, the median token would get {', '.join(f'{v:.1f}' for _, v in worst)} "
                       f"levels ({', '.join(k for k, _ in worst)}); --min-levels 0 quantizes them too")
        return out


@dataclass
class CompileReport:
    """One compile, filled in by the pipeline."""

    input_path: Path | None
    output_path: Path | None
    recipe: Any = None  # the Recipe actually run
    quantized: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)  # Conv layers quantized
    embeddings_quantized: int = 0
    stages: list[StageSummary] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # what the output checks found for the user (io.save_model)
    companions: list[str] = field(default_factory=list)  # config/tokenizer files copied beside the output
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds, in run order
    # filled when the compile was asked to measure (`quantize(analyze=True)`, `compile --report DIR`):
    layers: list[Any] = field(default_factory=list)  # ptqonnx.analysis.LayerMeasure per quantized layer
    sizes: dict[str, int] = field(default_factory=dict)  # output initializer bytes: quantized / embeddings / float
    analysis: str = ""  # how the layers were measured, in words
    report_files: list[Path] = field(default_factory=list)
    # `--sensitivity`: ptqonnx.budget.LayerCost per quantized layer, largest error on the grid first
    sensitivity: list[Any] = field(default_factory=list)
    sensitivity_measured: str = ""

    def skip_summary(self) -> list[tuple[str, int]]:
        return Counter(s.reason for s in self.skipped).most_common()

    def summary(self, cls: type[StageSummary], stage: str | None = None) -> StageSummary | None:
        """The first stage summary of type `cls` (and stage name, if given)."""
        return next((s for s in self.stages if isinstance(s, cls) and (stage is None or s.stage == stage)), None)

    def lines(self, *, all_skips: bool = False) -> list[str]:
        conv = f", {len(self.convs)} Conv layers" if self.convs else ""
        emb = f" and {self.embeddings_quantized} embedding tables" if self.embeddings_quantized else ""
        out = [f"quantized {len(self.quantized)} linear layers{conv}{emb}; skipped {len(self.skipped)}"]
        for reason, n in self.skip_summary():
            names = [s.node for s in self.skipped if s.reason == reason]
            shown = names if all_skips else names[:3]
            more = f", ... (+{len(names) - len(shown)}; -v lists all)" if len(names) > len(shown) else ""
            out.append(f"  skipped {n}: {reason}: {', '.join(shown)}{more}")
        for s in self.stages:
            out += s.lines()
        out += [f"note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "input": self.input_path, "output": self.output_path,
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "quantized": self.quantized, "convs": self.convs, "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "embeddings_quantized": self.embeddings_quantized, "stages": [s.to_dict() for s in self.stages],
            "peak_rss_mib": self.peak_rss_mib, "seconds": self.seconds, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "notes": self.notes, "companions": self.companions,
            "timings": self.timings,
            "analysis": self.analysis, "sizes": self.sizes, "layers": [dataclasses.asdict(m) for m in self.layers],
            "sensitivity": {"measured": self.sensitivity_measured,
                            "layers": [dataclasses.asdict(c) for c in self.sensitivity]} if self.sensitivity else None,
        })

    def sensitivity_lines(self) -> list[str]:
        """`--sensitivity`: one line per layer, most sensitive first."""
        if not self.sensitivity:
            return []
        width = max(len(c.name) for c in self.sensitivity)
        out = [f"sensitivity ({self.sensitivity_measured}), largest first:",
               f"  {'rank':>4}  {'layer':<{width}}  {'N x K':>12}  {'error':>9}  {'at 8 bits':>9}  {'bits':>5}"]
        for i, c in enumerate(self.sensitivity, 1):
            out.append(f"  {i:>4}  {c.name:<{width}}  {c.weights:>12}  {c.base_error:>9.3g}  {c.high_error:>9.3g}  "
                       f"{c.base_bits:>5.2f}")
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
