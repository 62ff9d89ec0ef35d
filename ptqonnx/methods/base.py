"""The contract between the pipeline and a method: what a handler gets (`MethodContext`) and returns
(`MethodResult`).

A handler `run(ctx, cfg) -> MethodResult`:

* a transform (rotate, smoothquant) rewrites `ctx.model` exactly (the float model's outputs unchanged,
  checked), carries `ctx.stats` over exactly and returns the `folds` it made;
* a weights stage (rtn, gptq) returns `plan`: the quantized weight of every site, keyed by node name, applied
  later by the lowering passes;
* awq (a scaling stage) drives the recipe's weights stage (`ctx.recipe.weights`) and returns both;
* w8a8 returns `activations`: the activation grids and which layers get dynamic scales.

Handlers never run the lowering passes, never write files and never touch the report: the `summary` says
what they did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ptqonnx.calibration.stats import Statistics
from ptqonnx.config import CalibConfig, Recipe
from ptqonnx.graph import LinearSite, Skip, find_linear_sites
from ptqonnx.plan import WeightPlan
from ptqonnx.report import StageSummary

__all__ = ["Calibration", "ScaleFold", "ActivationResult", "MethodContext", "MethodResult", "Progress"]

Progress = Callable[[str], None]
Feeds = list[dict[str, np.ndarray]]


class Calibration:
    """Calibration inputs, drawn on first use: a `CalibConfig` (text or npz; tokenizer beside the model) or
    feeds given directly (a list of {input name: array})."""

    def __init__(self, source: CalibConfig | Sequence[Mapping[str, np.ndarray]] | None, model_dir: Path | None,
                 inputs: Sequence[str | ir.Value]) -> None:
        self.supplied = source is not None
        self._config = source if isinstance(source, CalibConfig) or source is None else None
        self._feeds: Feeds | None = None if self._config is not None or source is None else [dict(f) for f in source]
        self.model_dir = model_dir
        self.inputs = list(inputs)  # graph inputs: values (their shapes build a KV graph's empty cache)

    @property
    def config(self) -> CalibConfig:
        return self._config or CalibConfig()

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider of the calibration runs (`CalibConfig.provider`)."""
        return self.config.provider

    @property
    def draws_text(self) -> bool:
        """The feeds are windows drawn from text (so more can be drawn with another seed)."""
        return self._config is not None and self._config.npz is None

    def feeds(self) -> Feeds:
        if self._feeds is None:
            from ptqonnx.calibration.sources import calibration_batches

            self._feeds = calibration_batches(self.config, self.model_dir, self.inputs)
        return self._feeds


@dataclass(frozen=True)
class ScaleFold:
    """A per-channel scale folded into the graph: the sites reading `activation` had their weight rows
    multiplied by `s` and the producer absorbed 1/s (or an inserted Mul did: `inserted`). `through`: the
    attention P·V MatMul the scale passed through into V (AWQ's "o after v")."""

    activation: str
    weights: tuple[str, ...]  # the sites' weight names: the key that finds the group in another graph
    s: np.ndarray
    inserted: bool = False
    through: str | None = None


@dataclass(frozen=True)
class ActivationResult:
    """W8A8's activation plan: node name -> {input index: grid} (static QDQ) and the dynamic layers."""

    grids: Mapping[str, Mapping[int, object]]
    dynamic: frozenset[str] = frozenset()
    dynamic_accuracy_level: int = 4  # MatMulNBits: int8 activations quantized per row and block in the kernel


@dataclass(frozen=True)
class MethodResult:
    summary: StageSummary | tuple[StageSummary, ...]  # a tuple when a stage also ran the one it drives
    plan: WeightPlan | None = None
    folds: tuple[ScaleFold, ...] = ()
    activations: ActivationResult | None = None
    skipped: tuple[Skip, ...] = ()


@dataclass
class MethodContext:
    """What a handler reads. `model` is rewritten in place by transforms; `sites` are the selected linear
    layers of the current graph (re-read with `refresh_sites` after a fold); `stats` are the one-shot
    statistics the stages requested, kept exact across transforms; `plan` is the weights stage's plan once
    it ran."""

    model: ir.Model
    recipe: Recipe
    sites: list[LinearSite]
    calibration: Calibration
    stats: Statistics = field(default_factory=Statistics)
    stats_origin: str = ""  # where `stats` came from, in words ("32 samples", "stats.npz")
    folds: list[ScaleFold] = field(default_factory=list)
    plan: WeightPlan | None = None
    activations: ActivationResult | None = None
    progress: Progress | None = None
    convs: list[LinearSite] = field(default_factory=list)  # the selected Conv layers (their weights: the pipeline's)
    _checked: bool = False

    def feeds(self) -> Feeds:
        """The calibration feeds, checked against the model's inputs on first use (`calibration.validate`)."""
        feeds = self.calibration.feeds()
        if not self._checked:
            from ptqonnx.calibration.validate import check_feeds

            check_feeds(self.model, feeds)
            self._checked = True
        return feeds

    def check_feeds(self, n: int = 2) -> Feeds:
        """Inputs for checking that a float rewrite left the outputs unchanged: calibration feeds when data was
        given, else synthetic probe feeds (a compile from `--stats` alone needs no data)."""
        if self.calibration.supplied:
            return self.feeds()[:n]
        from ptqonnx.calibration.sources import probe_feeds

        return probe_feeds(self.model, n)

    def refresh_sites(self) -> list[LinearSite]:
        """Re-read the selected sites from the graph (a fold may give a weight a private copy, or a site a new
        activation behind an inserted Mul); same names, graph order."""
        names = {s.name for s in self.sites}
        current = [s for s in find_linear_sites(self.model).sites if s.name in names]
        assert len(current) == len(names), "a transform changed the set of linear sites"
        self.sites = current
        return current

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)
