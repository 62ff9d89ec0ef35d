"""The method registry: stage config class -> handler, one decorator line per method.

    @register_method(GptqConfig)
    def run_gptq(ctx: MethodContext, cfg: GptqConfig) -> MethodResult: ...

(torchao's `register_quantize_module_handler` is the model.) The CLI's `--method` choices, the recipe
loader's stage keys and the pipeline's dispatch all read this table; a method defined in any module (a test
file, a plugin) is usable from the CLI, recipes and the Python API once its module has run the decorator.

Optional hooks a method registers with its handler:

* `select(ctx, cfg, sites) -> (sites kept, skips)`: narrows the linear sites before any stage runs (W8A8 leaves
  the LM head and GEMV-shaped layers in float);
* `requests(ctx, cfg) -> {value name: statistic kinds}`: one-shot statistics of the float model, collected
  for all stages in one ONNX Runtime run before the first stage (or read from `--stats`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptqonnx.config import ConfigError, FieldRef, Recipe, RotateConfig, RtnConfig, StageConfig, W8A8Config, WeightStage

__all__ = ["MethodSpec", "register_method", "method_spec", "stage_class", "stage_names", "recipe_for",
           "BUILTIN_MODULES"]

BUILTIN_MODULES = (
    "ptqonnx.methods.rotate", "ptqonnx.methods.rtn", "ptqonnx.methods.gptq", "ptqonnx.methods.awq", "ptqonnx.methods.smoothquant",
    "ptqonnx.methods.w8a8",
)


@dataclass(frozen=True)
class MethodSpec:
    config: type[StageConfig]
    run: Callable
    select: Callable | None = None
    requests: Callable | None = None

    @property
    def name(self) -> str:
        return self.config.stage


_SPECS: dict[str, MethodSpec] = {}
_loaded = False


def register_method(config: type[StageConfig], *, select: Callable | None = None,
                    requests: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: `handler(ctx, cfg) -> MethodResult` runs stages configured by `config`."""
    if not (isinstance(config, type) and issubclass(config, StageConfig)) or not config.stage or not config.kind:
        raise TypeError(f"{config!r} is not a StageConfig subclass with `stage` and `kind` set")

    def decorate(handler: Callable) -> Callable:
        _SPECS[config.stage] = MethodSpec(config, handler, select, requests)
        return handler

    return decorate


def _builtins() -> dict[str, MethodSpec]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        rank = {m: i for i, m in enumerate(BUILTIN_MODULES)}  # built-ins in this order, then the rest as registered
        ordered = sorted(_SPECS.values(), key=lambda sp: rank.get(sp.run.__module__, len(rank)))
        _SPECS.clear()
        _SPECS.update((sp.name, sp) for sp in ordered)
    return _SPECS


def stage_names() -> list[str]:
    """Registered stage names in registration order (built-ins first)."""
    return list(_builtins())


def method_spec(stage: str | StageConfig | type[StageConfig]) -> MethodSpec:
    name = stage if isinstance(stage, str) else stage.stage
    specs = _builtins()
    if name not in specs:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(specs)}")
    return specs[name]


def stage_class(name: str) -> type[StageConfig]:
    return method_spec(name).config


FLAG_STAGES = {W8A8Config.stage: "--w8a8", RotateConfig.stage: "--rotate"}  # stages added by a flag, not --method


def recipe_for(method: str = "rtn", *, w8a8: bool = False, rotate: bool = False, **fields: Any) -> Recipe:
    """The recipe `ptqonnx compile --method METHOD [--w8a8]` builds: the stages named in `method` (joined by
    `+`), the w8a8 stage, an implied rtn weights stage when none is named (8-bit per channel under w8a8), and
    each of `fields` set in every stage (or the recipe) that has a field of that name, e.g.
    `recipe_for("awq+gptq", bits=4, group_size=64, damp=0.02, keep_lm_head=True)`. A field none of them has
    is a ConfigError naming the stages that do."""
    names = [n for n in method.split("+") if n]
    known = stage_names()
    bad = next((n for n in names if n not in known or n in FLAG_STAGES), None) if names else method
    if bad is not None:
        hint = f"; {bad} is the {FLAG_STAGES[bad]} flag" if bad in FLAG_STAGES else ""
        raise ConfigError(f"{{0}} {method!r}: unknown method {bad!r}; choose from "
                          f"{', '.join(n for n in known if n not in FLAG_STAGES)} or a combination such as "
                          f"awq+gptq{hint}", FieldRef("", "stages"))
    classes = [stage_class(n) for n in names] + ([W8A8Config] if w8a8 else []) + ([RotateConfig] if rotate else [])
    if not any(issubclass(c, WeightStage) for c in classes):
        classes.append(RtnConfig)
    classes.sort(key=lambda c: c.order)
    values: dict[type, dict[str, Any]] = {c: {} for c in classes + [Recipe]}
    for c in classes:
        if issubclass(c, WeightStage) and w8a8:
            values[c].update(W8A8Config.WEIGHT_DEFAULTS)
    for name, value in fields.items():
        targets = [c for c in values if name in {f.name for f in dataclasses.fields(c)}]
        if not targets:
            owners = [spec.config for spec in _builtins().values()
                      if name in {f.name for f in dataclasses.fields(spec.config)}]
            spelled = method + (" with w8a8" if w8a8 else "") + (" with rotate" if rotate else "")
            if not owners:
                raise ConfigError(f"{{0}} is not a setting of any method (not {spelled})", FieldRef("", name))
            where = " and ".join(f"{{{i + 1}}}" for i in range(len(owners)))
            raise ConfigError(f"{{0}} applies to {where}, not {spelled}; drop it", FieldRef(owners[0].stage, name),
                              *(FieldRef(c.stage, "") for c in owners))
        for c in targets:
            values[c][name] = value
    stages = tuple(c(**values[c]) for c in classes)
    return Recipe(stages=stages, **values[Recipe])
