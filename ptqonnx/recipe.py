"""Recipes as YAML: a compile described as stages, checked strictly before any work starts.

    # ptqonnx recipe
    version: 3
    stages:
      - smoothquant: {alpha: 0.5}
      - gptq: {bits: 8, group_size: 0}
      - w8a8: {act_scales: static}
    target: tensorrt
    exclude: ['*down_proj*']
    calibration: {text: /data/valid.txt, samples: 128}

A stage is `- name: {field: value, ...}` or just `- name`; names and fields are the registered stage
configs' (`ptqonnx.registry`, `ptqonnx.config`), the top-level keys are `Recipe`'s. An unknown key, a
wrong type, a bad value or a stage order that cannot work is one `UserError` naming the file and line
(llm-compressor's strict recipes are the model). `save_recipe` writes the recipe a compile actually ran
(every field, defaults resolved), so `ptqonnx compile MODEL --recipe out.recipe.yaml` reproduces it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ptqonnx import __version__
from ptqonnx.config import CalibConfig, ConfigError, FieldRef, Recipe, W8A8Config
from ptqonnx.errors import UserError

__all__ = ["RECIPE_VERSION", "load_recipe", "recipe_from_dict", "save_recipe", "dump_recipe"]

RECIPE_VERSION = 3
# What an older recipe without a key meant, so that it compiles the same bytes again:
# version 1 (before keep_cache_values): R2 and the v -> o scale were never applied where a KV cache stores V;
# versions 1 and 2 (before keep_conv): Conv layers were never quantized.
_OLD_DEFAULTS = {1: {"keep_cache_values": True, "keep_conv": True}, 2: {"keep_conv": True}}
_TOP_KEYS = ("version", "stages", "calibration") + tuple(
    f.name for f in dataclasses.fields(Recipe) if f.name not in ("stages", "calibration"))


class _Lines:
    """Line numbers (1-based) of keys and items, by path: ("stages", 0), ("stages", 0, "bits"), ("format",)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.lines: dict[tuple, int] = {}

    def at(self, *path: Any) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.origin}:{self.lines[path[:n]]}"
        return self.origin

    def fail(self, message: str, *path: Any) -> UserError:
        return UserError(f"{self.at(*path)}: {message}")


def _compose(text: str, lines: _Lines) -> Any:
    """YAML text -> Python values (safe types only), recording the line of every key and list item."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{lines.origin}:{mark.line + 1}" if mark is not None else lines.origin
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the syntax") from None
    constructor = yaml.SafeLoader("")

    def build(node: Any, path: tuple) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise UserError(f"{lines.origin}:{key_node.start_mark.line + 1}: keys must be names, got {key!r}")
                if key in out:
                    raise UserError(f"{lines.origin}:{key_node.start_mark.line + 1}: key {key!r} appears twice")
                lines.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                lines.lines[path + (i,)] = item.start_mark.line + 1
                items.append(build(item, path + (i,)))
            return items
        return constructor.construct_object(node, deep=True)

    return None if root is None else build(root, ())


def _stage(entry: Any, i: int, lines: _Lines, w8a8: bool):
    from ptqonnx.registry import stage_class, stage_names

    if isinstance(entry, str):
        name, fields, path = entry, {}, ("stages", i)
    elif isinstance(entry, dict) and len(entry) == 1:
        ((name, fields),) = entry.items()
        path = ("stages", i, name)
        fields = {} if fields is None else fields
        if not isinstance(fields, dict):
            raise lines.fail(f"stage {name}'s settings must be a mapping (e.g. `- {name}: {{...}}`), got "
                             f"{fields!r}", *path)
    else:
        raise lines.fail(f"each stage is `- name` or `- name: {{settings}}`, got {entry!r}", "stages", i)
    names = stage_names()
    if name not in names:
        raise lines.fail(f"unknown stage {name!r}; stages: {', '.join(names)}", *path)
    cls = stage_class(name)
    if w8a8 and cls.kind == "weights":  # unset grid fields: W8A8's (8 bits per channel), as the CLI does
        fields = {**W8A8Config.WEIGHT_DEFAULTS, **fields}
    known = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in known:
            top = f"; {key} is a recipe-level key: write it at the top level" if key in _TOP_KEYS else ""
            raise lines.fail(f"unknown key {key!r} in stage {name}{top}; its keys: {', '.join(known)}", *path, key)
    return cls(**fields)


def recipe_from_dict(data: Any, origin: str = "recipe", lines: _Lines | None = None) -> Recipe:
    """A Recipe from plain data (what a YAML file holds); UserError naming `origin` and the line."""
    lines = lines or _Lines(origin)
    if not isinstance(data, dict):
        raise lines.fail("a recipe is a mapping with a `stages` list")
    for key in data:
        if key not in _TOP_KEYS:
            raise lines.fail(f"unknown key {key!r}; recipe keys: {', '.join(_TOP_KEYS)}", key)
    version = data.get("version", RECIPE_VERSION)
    if version not in (*_OLD_DEFAULTS, RECIPE_VERSION):
        raise lines.fail(f"recipe version {version!r} is not supported (this ptqonnx reads versions 1 to "
                         f"{RECIPE_VERSION})", "version")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise lines.fail("`stages` must be a non-empty list, e.g. `stages: [gptq]`", "stages")
    data = {**_OLD_DEFAULTS.get(version, {}), **data}
    try:
        w8a8 = any(e == W8A8Config.stage or isinstance(e, dict) and W8A8Config.stage in e for e in stages)
        built = [_stage(entry, i, lines, w8a8) for i, entry in enumerate(stages)]
        calib = data.get("calibration")
        if calib is not None:
            if not isinstance(calib, dict):
                raise lines.fail("`calibration` must be a mapping (text, npz, samples, seq_len, seed, "
                                 "tokenizer_dir)", "calibration")
            known = [f.name for f in dataclasses.fields(CalibConfig)]
            for key in calib:
                if key not in known:
                    raise lines.fail(f"unknown key {key!r} in calibration; its keys: {', '.join(known)}",
                                     "calibration", key)
            calib = CalibConfig(**calib)
        options = {k: v for k, v in data.items() if k not in ("version", "stages", "calibration")}
        return Recipe(stages=tuple(built), calibration=calib, **options)
    except ConfigError as exc:
        raise lines.fail(exc.render(FieldRef.key), *_path_of(exc, data, lines)) from None


def _path_of(exc: ConfigError, data: dict, lines: _Lines) -> tuple:
    """The YAML path of the first field the ConfigError names that the file spells out (for its line)."""
    candidates = []
    for ref in exc.refs:
        if not ref.stage:
            candidates.append((ref.name,))
        elif ref.stage == "calibration":
            candidates.append(("calibration", ref.name))
        for i, entry in enumerate(data.get("stages") or []):
            name = entry if isinstance(entry, str) else next(iter(entry), None) if isinstance(entry, dict) else None
            if name == ref.stage:
                candidates.append(("stages", i, name, ref.name) if ref.name else ("stages", i))
    return next((c for c in candidates if c in lines.lines), candidates[0] if candidates else ("stages",))


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file not found: {p}; pass the path of a .yaml recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {p} ({exc}); pass a UTF-8 YAML file") from None
    lines = _Lines(str(p))
    return recipe_from_dict(_compose(text, lines), str(p), lines)


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    data = {"version": RECIPE_VERSION, **recipe.to_dict()}
    header = (f"# ptqonnx {__version__} recipe: `ptqonnx compile MODEL --recipe THIS_FILE` runs it again\n")
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write `recipe` as YAML, atomically (a temporary file beside it, then a rename)."""
    from ptqonnx.io import write_atomic

    return write_atomic(Path(path), dump_recipe(recipe))
