"""CLI flags generated from the config classes, and the recipe a command line stands for.

Every flag, its help and its default come from `option(...)` fields (`ptqonnx.config`) of the registered
stage configs, `Recipe` and `CalibConfig`; a flag several stages share (`--wbits`, `--device`) sets that
field in whichever of them the command runs. Flags are parsed with `default=None`, so "given" is known: a
flag none of the command's stages reads is an error naming the stages that do (`--damp applies to gptq,
not rtn`), never silently ignored.

`compile FLAGS` is shorthand for a one-stage recipe: `--method a+b` lists the stages, `--w8a8` adds the
activation stage, the weights stage is implied (rtn) when the method has none.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from ptqonnx.config import CalibConfig, ConfigError, FieldRef, Recipe, StageConfig
from ptqonnx.errors import UserError

__all__ = ["add_config_flags", "add_calibration_flags", "calib_from_args", "recipe_from_args", "flag_name",
           "render_error", "given_flags"]

_DEST = "cfg__"


def _dest(flag: str) -> str:
    return _DEST + flag.lstrip("-").replace("-", "_")


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _arg_type(cls: type, f: dataclasses.Field):
    if f.metadata.get("cli_type") is not None:
        return f.metadata["cli_type"]
    tp = typing.get_type_hints(cls)[f.name]
    options = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
    if typing.get_origin(tp) is tuple:
        return str
    for t in (int, float, Path):
        if t in options:
            return t
    return str


def _is_flag(cls: type, f: dataclasses.Field) -> bool:
    return typing.get_type_hints(cls)[f.name] is bool


def _help(cls: type, f: dataclasses.Field) -> str:
    meta = f.metadata
    text = meta["help"]
    if _is_flag(cls, f) or meta["repeat"]:
        return text
    shown = meta["default_help"] or (None if f.default is None else f.default)
    return text if shown is None else f"{text} (default: {shown})"


def _add(group: argparse._ArgumentGroup, cls: type, f: dataclasses.Field, seen: dict[str, list]) -> None:
    flag = f.metadata["flag"]
    seen.setdefault(flag, []).append((cls, f.name))
    if len(seen[flag]) > 1:
        return  # shared flag (e.g. --device): added with its first stage
    kw: dict[str, Any] = {"dest": _dest(flag), "default": None, "help": _help(cls, f)}
    if _is_flag(cls, f):
        kw["action"] = "store_true"
    else:
        if f.metadata["repeat"]:
            kw["action"] = "append"
        kw["type"] = _arg_type(cls, f)
        if f.metadata["choices"]:
            kw["choices"] = list(f.metadata["choices"])
        kw["metavar"] = f.metadata["metavar"] or flag.lstrip("-").upper().replace("-", "_")
    names = [flag] + (["--block-size"] if flag == "--group-size" else [])  # ONNX Runtime's name for it
    group.add_argument(*names, **kw)


def add_config_flags(p: argparse.ArgumentParser, stage_classes: list[type[StageConfig]]) -> dict[str, list]:
    """Add the Recipe's and every stage's flags to `p`; returns flag -> [(config class, field name)]."""
    seen: dict[str, list] = {}
    g = p.add_argument_group("output")
    for f in _fields(Recipe):
        _add(g, Recipe, f, seen)
    for cls in stage_classes:
        fs = _fields(cls)
        if fs:
            g = p.add_argument_group(cls.stage, (cls.__doc__ or "").strip().splitlines()[0])
            for f in fs:
                _add(g, cls, f, seen)
    return seen


def add_calibration_flags(p: argparse.ArgumentParser) -> dict[str, list]:
    seen: dict[str, list] = {}
    g = p.add_argument_group("calibration data")
    for f in _fields(CalibConfig):
        _add(g, CalibConfig, f, seen)
    return seen


def given_flags(args: argparse.Namespace, table: dict[str, list]) -> dict[str, Any]:
    return {flag: getattr(args, _dest(flag)) for flag in table if getattr(args, _dest(flag), None) is not None}


def _value(cls: type, name: str, flag: str, value: Any) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.metadata.get("invert"):
        return not value
    if f.metadata.get("repeat"):
        return tuple(value)
    return value


def flag_name(ref: FieldRef, stage_classes: list[type[StageConfig]]) -> str:
    """How the CLI spells a config field: its flag, `--w8a8` / `--method X` for a stage itself."""
    if not ref.name:
        from ptqonnx.registry import FLAG_STAGES

        return FLAG_STAGES.get(ref.stage, f"--method {ref.stage}")
    if ref.stage == "" and ref.name == "stages":
        return "--method"
    classes = {"": Recipe, "calibration": CalibConfig} | {c.stage: c for c in stage_classes}
    cls = classes.get(ref.stage)
    if cls is not None:
        f = next((f for f in dataclasses.fields(cls) if f.name == ref.name), None)
        if f is not None and f.metadata.get("flag"):
            return f.metadata["flag"]
    return f"{ref.key()} (recipe only)"


def render_error(exc: ConfigError, stage_classes: list[type[StageConfig]]) -> UserError:
    return UserError(exc.render(lambda r: flag_name(r, stage_classes)))


def calib_from_args(args: argparse.Namespace, table: dict[str, list], base: CalibConfig | None = None,
                    stage_classes: list | None = None) -> CalibConfig | None:
    """The CalibConfig the calibration flags give (over `base`), or None when none is given and no base."""
    given = given_flags(args, table)
    if not given:
        return base
    values = {name: _value(CalibConfig, name, flag, v) for flag, v in given.items() for _, name in table[flag]}
    try:
        return dataclasses.replace(base, **values) if base is not None else CalibConfig(**values)
    except ConfigError as exc:
        raise render_error(exc, stage_classes or []) from None


def recipe_from_args(method: str, w8a8: bool, args: argparse.Namespace, table: dict[str, list],
                     stage_classes: list[type[StageConfig]], rotate: bool = False) -> Recipe:
    """The recipe `compile --method METHOD [--w8a8] FLAGS` stands for (`ptqonnx.registry.recipe_for`)."""
    from ptqonnx.registry import recipe_for

    fields: dict[str, Any] = {}
    for flag, value in given_flags(args, table).items():
        cls, name = table[flag][0]
        fields[name] = _value(cls, name, flag, value)
    try:
        return recipe_for(method, w8a8=w8a8, rotate=rotate, **fields)
    except ConfigError as exc:
        raise render_error(exc, stage_classes) from None
