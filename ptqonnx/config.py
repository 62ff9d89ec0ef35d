"""Frozen configuration dataclasses: one per method (a recipe stage), the recipe's own options, calibration.

Every field is declared once with `option(default, help, flag=...)`: its default, its help text and its CLI
flag live here, and the CLI (`ptqonnx.cli`), the recipe loader (`ptqonnx.recipe`) and `--help` are generated
from them. Every value is type-checked (a YAML `true` for an int field is an error, not 1) and range-checked in
`__post_init__`; errors are `ConfigError`s whose message names the fields through `FieldRef`s, so the CLI can
say `--damp` and a recipe can say `gptq.damp` (line 3).

Stage kinds, in the order a recipe runs them (`order`):

    transform (rotate, smoothquant)  ->  scaling (awq: drives the weights stage)  ->  weights (rtn, gptq)
    ->  activations (w8a8)

A new method is one `StageConfig` subclass (here or anywhere), one handler module and one
`@register_method(Config)` line (`ptqonnx.registry`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "WEIGHT_BITS", "FORMATS", "TARGETS", "CALIB_RANGES", "ACT_SCALES", "AUTO", "ConfigError", "FieldRef", "option",
    "StageConfig", "WeightStage", "RtnConfig", "GptqConfig", "AwqConfig", "SmoothQuantConfig", "W8A8Config",
    "RotateConfig", "ROTATIONS",
    "CalibConfig", "Recipe", "as_recipe", "matches_any",
]

WEIGHT_BITS = (3, 4, 8)
FORMATS = ("matmulnbits", "qdq")
TARGETS = ("tensorrt", "ort-cpu", "ort-cuda")  # W8A8: tensorrt, ort-cpu; weight-only: all three
TRT_INT4_BLOCKS = (64, 128)  # TensorRT's blocked INT4 weights (TensorRT docs, Working with Quantized Types)
CALIB_RANGES = ("minmax", "percentile")
ACT_SCALES = ("static", "dynamic")
W8A8_QTYPES = ("int8", "fp8")
AUTO = "auto"  # group_size: 128 for 3/4 bits, per output channel for 8
ROTATIONS = ("random_hadamard", "hadamard", "random_orthogonal")  # ptqonnx.numerics.rotation.ROTATION_KINDS


def matches_any(patterns: tuple[str, ...], *names: str) -> bool:
    """Whether any of `names` matches any shell-style pattern (`*`, `?`, `[...]`; case-sensitive)."""
    return any(fnmatchcase(n, p) for p in patterns for n in names if n)


# -- errors that name fields ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRef:
    """A config field: `stage` is the recipe key of its stage ("" for a recipe-level option); `name` is the
    field ("" for the stage itself, e.g. "add {0}" with FieldRef("w8a8", ""))."""

    stage: str
    name: str

    def key(self) -> str:
        """The recipe spelling: `gptq.damp`, `format` (recipe level), `a w8a8 stage` (the stage itself)."""
        if not self.name:
            return f"a {self.stage} stage"
        return f"{self.stage}.{self.name}" if self.stage else self.name


class ConfigError(ValueError):
    """A bad configuration. `template` holds `{0}`, `{1}`, ... for the fields in `refs`, rendered by whoever
    shows the message: CLI flags (`--damp`), recipe keys (`gptq.damp`), ..."""

    def __init__(self, template: str, *refs: FieldRef) -> None:
        self.template, self.refs = template, refs
        super().__init__(self.render(FieldRef.key))

    def render(self, name: Callable[[FieldRef], str]) -> str:
        return self.template.format(*(name(r) for r in self.refs))


def option(default: Any, help: str, *, flag: str | None = None, invert: bool = False,
           choices: tuple | None = None, metavar: str | None = None, default_help: str | None = None,
           repeat: bool = False, cli_type: type | None = None) -> Any:
    """A config field. `flag`: its CLI flag (None: recipe and API only); `invert`: a store-true flag that sets
    the field to False (`--asym` -> symmetric=False); `repeat`: a list option given once per value; `cli_type`:
    how argparse parses the flag (default: from the annotation)."""
    meta = dict(help=help, flag=flag, invert=invert, choices=choices, metavar=metavar, default_help=default_help,
                repeat=repeat, cli_type=cli_type)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata=meta)


def _type_error(ref: FieldRef, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{{0}} must be {expected}, got {value!r} ({type(value).__name__})", ref)


def _coerce(ref: FieldRef, tp: Any, value: Any) -> Any:
    """`value` checked against the annotation `tp` (bool, int, float, str, Path, tuple[str, ...], unions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise _type_error(ref, " or ".join(_type_name(o) for o in options), value)
        errors = []
        for o in options:
            if o is type(None):
                continue
            try:
                return _coerce(ref, o, value)
            except ConfigError as exc:
                errors.append(exc)
        raise _type_error(ref, " or ".join(_type_name(o) for o in options if o is not type(None)), value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _type_error(ref, "a list of strings", value)
        (item, _) = typing.get_args(tp)
        return tuple(_coerce(ref, item, v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(ref, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(ref, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(ref, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(ref, "a string", value)
        return value
    if tp is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise _type_error(ref, "a path", value)
        return Path(value)
    raise TypeError(f"config field {ref.key()}: unsupported annotation {tp!r}")  # a bug in a config class


def _type_name(tp: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        tp, "a list of strings" if typing.get_origin(tp) is tuple else str(tp))


def _check_fields(obj: Any, stage: str, skip: tuple[str, ...] = ()) -> None:
    """Type-check (and normalize: lists to tuples, ints to floats, str to Path) every field of a frozen dataclass,
    and check values against the field's `choices`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        ref = FieldRef(stage, f.name)
        value = _coerce(ref, hints[f.name], getattr(obj, f.name))
        if value is not None and f.metadata.get("choices"):
            _choice(ref, value, f.metadata["choices"])
        object.__setattr__(obj, f.name, value)


def _choice(ref: FieldRef, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{{0}} must be one of {', '.join(map(str, allowed))}, got {value!r}", ref)


def _device(ref: FieldRef, value: str) -> None:
    if value != "cpu" and not value.startswith("cuda"):
        raise ConfigError(f"{{0}} must be cpu or cuda[:N], got {value!r}", ref)


# -- stages ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """Base of every recipe stage. Class attributes: `stage` (recipe key and `--method` name), `kind`, `order`
    (stages run in increasing order), `needs_calibration`, `requires` (modules the handler imports)."""

    stage: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    order: ClassVar[int] = 0
    needs_calibration: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    before_statistics: ClassVar[bool] = False  # runs before sites are selected and statistics collected

    def __post_init__(self) -> None:
        _check_fields(self, self.stage)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks of this stage alone (override; raise ConfigError)."""

    def ref(self, name: str) -> FieldRef:
        return FieldRef(self.stage, name)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class WeightStage(StageConfig):
    """A weights stage: the integer grid every weight is rounded to. `group_size` is the block length along K
    (None = one block per output channel); `symmetric` grids have the implicit zero point 2^(bits-1)."""

    kind: ClassVar[str] = "weights"
    order: ClassVar[int] = 30

    bits: int = option(4, "weight bits (3 = a 3-bit grid stored in 4-bit containers)", flag="--wbits",
                       choices=WEIGHT_BITS)
    group_size: int | str | None = option(
        AUTO, "block length along K; 0 or null = per output channel", flag="--group-size",
        metavar="N", default_help="128 for 3/4 bits, per channel for 8 bits")
    symmetric: bool = option(True, "asymmetric grid with zero points (default: symmetric)", flag="--asym",
                             invert=True)
    scales: str = option(
        AUTO, "symmetric grid's scales: signed (ONNX Runtime's grid, its quantizer's bytes: the block's signed "
        "extreme on code -2^(b-1), so some scales are negative) or positive (what TensorRT accepts: "
        "max(-min/2^(b-1), max/(2^(b-1)-1))); auto: positive for --target tensorrt, else signed",
        flag="--scales", choices=(AUTO, "signed", "positive"))

    fp8: bool = option(False, "FLOAT8 E4M3 codes per output channel instead of an integer grid (set by the w8a8 "
                       "stage's qtype fp8)")
    budget_bits: float | None = option(
        None, "mixed precision: average bits per quantized weight, scales included (e.g. 4.5); the layers whose "
        "measured error drops most per added bit get 8 bits per channel until the budget is used (the choice is "
        "written to the recipe as high_bits)", flag="--budget-bits", metavar="B")
    max_size_mb: float | None = option(
        None, "mixed precision: the output file's size in MiB (2^20 bytes, as `ls -lh` counts; external data "
        "included); like --budget-bits, the layers whose measured error drops most per added byte get 8 bits per "
        "channel while the whole file stays within N", flag="--max-size-mb", metavar="N")
    high_bits: tuple[str, ...] = option(
        (), "layers (node-name patterns) quantized to 8 bits per output channel instead of this stage's grid "
        "(what --budget-bits or --max-size-mb chose)")

    @property
    def positive_scales(self) -> bool:
        return self.scales == "positive"

    @property
    def budgeted(self) -> bool:
        """A size budget (--budget-bits or --max-size-mb) is still to be spent."""
        return self.budget_bits is not None or self.max_size_mb is not None

    def high_grid(self) -> WeightStage:
        """The grid a layer raised by the budget gets: 8 bits per output channel, otherwise this stage's."""
        return dataclasses.replace(self, bits=8, group_size=None, budget_bits=None, max_size_mb=None, high_bits=())

    def for_site(self, name: str) -> WeightStage:
        """The grid of one layer: `high_grid()` for a layer `high_bits` names, else this stage's."""
        if self.high_bits and self.bits < 8 and matches_any(self.high_bits, name):
            return self.high_grid()
        return self

    def validate(self) -> None:
        if self.scales == "positive" and not self.symmetric:
            raise ConfigError("{0} positive is for the symmetric grid (asymmetric scales are positive already): "
                              "drop {0} or {1}", self.ref("scales"), self.ref("symmetric"))
        g = self.group_size
        if isinstance(g, str):
            if g != AUTO:
                raise ConfigError(f"{{0}} must be an integer, null or {AUTO!r}, got {g!r}", self.ref("group_size"))
            g = 128 if self.bits < 8 else None
        elif g == 0:
            g = None
        if g is not None and g < 16:
            raise ConfigError(f"{{0}} must be at least 16 (or 0 for per channel), got {g}", self.ref("group_size"))
        if g is None and self.bits < 8:
            raise ConfigError(f"{self.bits}-bit weights need a group size (e.g. 128) in {{0}}; per channel is for "
                              "8 bits", self.ref("group_size"))
        object.__setattr__(self, "group_size", g)
        budget = "budget_bits" if self.budget_bits is not None else "max_size_mb"
        if self.budgeted and (self.bits >= 8 or self.fp8):
            raise ConfigError("{0} spends bits above a 3- or 4-bit grid; drop it for 8-bit weights", self.ref(budget))
        if self.budget_bits is not None and not self.bits < self.budget_bits < 8.5:
            raise ConfigError(f"{{0}} must be between the grid's {self.bits} bits and 8.5, got {self.budget_bits}",
                              self.ref("budget_bits"))
        if self.max_size_mb is not None:
            if not self.max_size_mb > 0:
                raise ConfigError(f"{{0}} must be a positive size in MiB, got {self.max_size_mb}",
                                  self.ref("max_size_mb"))
            if self.budget_bits is not None:
                raise ConfigError("{0} and {1} are two budgets for one choice; give one of them",
                                  self.ref("max_size_mb"), self.ref("budget_bits"))
        if self.budgeted and self.high_bits:
            raise ConfigError("{0} chooses the 8-bit layers that {1} lists; give one of them",
                              self.ref(budget), self.ref("high_bits"))


@dataclass(frozen=True)
class RtnConfig(WeightStage):
    """Round to nearest on ONNX Runtime's own grid (MLAS convention): needs no data."""

    stage: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class GptqConfig(WeightStage):
    """GPTQ (Frantar et al. 2022): `damp` x mean diag(H) dampening; `act_order` visits columns by descending
    diag(H), with static groups so the output keeps contiguous groups; `sequential` calibrates block by block
    on the partly quantized model (else one-shot Hessians from the float model); `device` for the algebra."""

    stage: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("torch",)

    damp: float = option(0.01, "dampening, a fraction of mean diag(H)", flag="--damp")
    act_order: bool = option(True, "quantize columns in order, not by descending diag(H)", flag="--no-act-order",
                             invert=True)
    sequential: bool = option(True, "Hessians from the float model in one run (default: block by block on the "
                              "partly quantized model)", flag="--one-shot", invert=True)
    device: str = option("cpu", "torch device for the GPTQ / AWQ algebra (cpu, cuda, cuda:1)", flag="--device")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ConfigError(f"{{0}} must be in (0, 1), got {self.damp}", self.ref("damp"))
        _device(self.ref("device"), self.device)


@dataclass(frozen=True)
class AwqConfig(StageConfig):
    """AWQ (Lin et al. 2024): per scaling group s = mean|x|^alpha with alpha on a `grid` in [0, 1); `clip`:
    per-block range shrinking search; `no_insert`: refuse groups whose 1/s needs an explicit Mul;
    `scale_lm_head`: also scale the LM head's group (llm-awq does not); `device` for the search math (torch).
    Drives the weights stage after it (rtn: clipped RTN; gptq: GPTQ on the scaled, clipped weights)."""

    stage: ClassVar[str] = "awq"
    kind: ClassVar[str] = "scaling"
    order: ClassVar[int] = 20
    needs_calibration: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("torch",)

    grid: int = option(20, "alpha grid points (and clip ratios per unit range) searched", flag="--awq-grid")
    clip: bool = option(True, "skip the weight clipping search", flag="--no-clip", invert=True)
    no_insert: bool = option(False, "refuse scaling groups whose 1/s no producer can absorb (no inserted Mul "
                             "nodes)", flag="--no-insert")
    scale_lm_head: bool = option(False, "also scale the LM head's group (llm-awq leaves it unscaled)")
    device: str = option("cpu", "torch device for the GPTQ / AWQ algebra (cpu, cuda, cuda:1)", flag="--device")

    def validate(self) -> None:
        if not 1 <= self.grid <= 1000:
            raise ConfigError(f"{{0}} must be in [1, 1000], got {self.grid}", self.ref("grid"))
        _device(self.ref("device"), self.device)


@dataclass(frozen=True)
class RotateConfig(StageConfig):
    """Rotations (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024): norms' γ folded into their readers,
    then R1 the residual stream (E Q, readers Qᵀ W, writers W Q), R2 the value heads (V and o_proj per head) and
    R4 an online Hadamard before each down_proj, all exact (the float model's outputs are checked unchanged):
    activations lose their outlier channels before anything is measured or quantized. The first stage of a
    recipe (`--rotate`)."""

    stage: ClassVar[str] = "rotate"
    kind: ClassVar[str] = "transform"
    order: ClassVar[int] = 5
    before_statistics: ClassVar[bool] = True

    rotation: str = option("random_hadamard", "the orthogonal matrices: random_hadamard (QuaRot), hadamard, or "
                           "random_orthogonal (SpinQuant's random start)", flag="--rotation", choices=ROTATIONS)
    seed: int = option(0, "seed of the random rotations", flag="--rotation-seed")
    heads: bool = option(True, "skip R2, the per-head rotation of V and o_proj", flag="--no-r2", invert=True)
    online: bool = option(True, "skip R4, the online Hadamard before down_proj", flag="--no-r4", invert=True)

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"{{0}} must be non-negative, got {self.seed}", self.ref("seed"))


@dataclass(frozen=True)
class SmoothQuantConfig(StageConfig):
    """SmoothQuant (Xiao et al. 2023): `alpha` in [0, 1] migrates activation range into the weights
    (s_j = max|X_j|^alpha / max|W_j|^(1-alpha)), or "auto": grid search per scaling group. Needs a w8a8 stage."""

    stage: ClassVar[str] = "smoothquant"
    kind: ClassVar[str] = "transform"
    order: ClassVar[int] = 10
    needs_calibration: ClassVar[bool] = True

    alpha: float | str = option(0.5, "migration strength in [0, 1], or `auto` (grid search per group)",
                                flag="--alpha", cli_type=str)

    def validate(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                try:
                    object.__setattr__(self, "alpha", float(self.alpha))  # a CLI string such as "0.9"
                except ValueError:
                    raise ConfigError(f"{{0}} must be a number in [0, 1] or auto, got {self.alpha!r}",
                                      self.ref("alpha")) from None
        if not isinstance(self.alpha, str) and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{{0}} must be in [0, 1], got {self.alpha}", self.ref("alpha"))


@dataclass(frozen=True)
class W8A8Config(StageConfig):
    """INT8 activations for INT8 weights (the weights stage: 8 bits, per output channel, symmetric).

    calib_range: `minmax` (full range) or `percentile` (clip |x| at `percentile` of the sampled rows).
    quantize_bmm: also quantize attention's activation x activation MatMuls; quantize_lm_head: the LM head too.
    act_scales: `static` (per tensor, from calibration: QDQ) or `dynamic` (per row and block of K, computed at
    run time by ORT's MatMulNBits int8 kernel, accuracy_level 4; target `ort-cpu` only: TensorRT INT8 takes
    static scales only). dynamic_layers: with static scales, the layers given dynamic ones instead (shell-style
    patterns matched against the node name or the weight initializer's name, e.g. `*down_proj*`).
    The recipe's `target` picks the activation type: tensorrt = symmetric int8 (zero point 0), ort-cpu =
    asymmetric uint8 (ORT's CPU EP fuses shared uint8 Q/DQ into MatMulIntegerToFloat, shared int8 ones not).
    """

    stage: ClassVar[str] = "w8a8"
    kind: ClassVar[str] = "activations"
    order: ClassVar[int] = 40
    needs_calibration: ClassVar[bool] = True
    WEIGHT_DEFAULTS: ClassVar[dict[str, Any]] = {"bits": 8, "group_size": None}  # of an implied weights stage
    DEFAULT_TARGET: ClassVar[str] = "tensorrt"
    DEFAULT_PERCENTILE: ClassVar[float] = 99.99

    calib_range: str = option("minmax", "activation range from calibration: full min/max or a percentile of |x|",
                              flag="--calib-range", choices=CALIB_RANGES)
    percentile: float | None = option(None, "percentile for calib_range percentile", flag="--percentile",
                                      default_help="99.99 with --calib-range percentile")
    quantize_bmm: bool = option(False, "also quantize attention's activation MatMuls", flag="--quantize-bmm")
    quantize_lm_head: bool = option(False, "also quantize the LM head in W8A8", flag="--quantize-lm-head")
    act_scales: str = option("static", "static: per-tensor activation scales from calibration, QDQ; dynamic: "
                             "int8 scales per row and block of K computed at run time by ORT's MatMulNBits "
                             "(--target ort-cpu)", flag="--act-scales", choices=ACT_SCALES)
    min_levels: int = option(
        0, "a layer whose median token would get fewer INT8 levels than this under its per-tensor static scale "
        "(a few tokens, e.g. an attention sink, set the range) keeps float activations and INT8 weights; 0: "
        "quantize every layer's activations (the default)", flag="--min-levels", metavar="N")
    qtype: str = option("int8", "int8, or fp8: FLOAT8 E4M3 weights (per output channel) and activations (per tensor, "
                        "static) for TensorRT on Hopper/Ada GPUs", flag="--w8a8-type", choices=W8A8_QTYPES)
    dynamic_layers: tuple[str, ...] = option(
        (), "with static scales, give this layer dynamic ones instead (a node or weight name, '*' allowed, e.g. "
        "'*down_proj*'; --target ort-cpu; repeat the flag for more)", flag="--dynamic-layers", metavar="PATTERN",
        repeat=True)

    def validate(self) -> None:
        if not 0 <= self.min_levels <= 127:
            raise ConfigError(f"{{0}} must be in [0, 127], got {self.min_levels}", self.ref("min_levels"))
        if self.percentile is not None:
            if self.calib_range != "percentile":
                raise ConfigError("{0} applies to {1} percentile; drop {0} or set {1} percentile",
                                  self.ref("percentile"), self.ref("calib_range"))
            if not 50.0 < self.percentile <= 100.0:
                raise ConfigError(f"{{0}} must be in (50, 100], got {self.percentile}", self.ref("percentile"))
        elif self.calib_range == "percentile":
            object.__setattr__(self, "percentile", self.DEFAULT_PERCENTILE)
        if self.qtype == "fp8":
            if self.act_scales == "dynamic" or self.dynamic_layers:
                raise ConfigError("{0} fp8 takes static per-tensor activation scales: drop {1} dynamic / {2}",
                                  self.ref("qtype"), self.ref("act_scales"), self.ref("dynamic_layers"))
            if self.min_levels:
                raise ConfigError("{0} counts INT8 levels; FP8's relative step does not depend on the range: drop it "
                                  "with {1} fp8", self.ref("min_levels"), self.ref("qtype"))
        if self.act_scales == "dynamic":
            if self.dynamic_layers:
                raise ConfigError("{0} picks layers within {1} static; with {1} dynamic every layer is dynamic "
                                  "already: drop one of them", self.ref("dynamic_layers"), self.ref("act_scales"))
            if self.quantize_bmm:
                raise ConfigError("{0} quantizes attention with static scales; drop it with {1} dynamic",
                                  self.ref("quantize_bmm"), self.ref("act_scales"))
            if self.calib_range != "minmax":
                raise ConfigError("{0} sets static activation ranges; drop it with {1} dynamic",
                                  self.ref("calib_range"), self.ref("act_scales"))
            if self.min_levels:
                raise ConfigError("{0} picks layers out of static activation scales; drop it with {1} dynamic",
                                  self.ref("min_levels"), self.ref("act_scales"))

    def dynamic(self, *names: str) -> bool:
        """Whether the layer known by `names` (node name, weight name) gets dynamic activation scales."""
        return self.act_scales == "dynamic" or matches_any(self.dynamic_layers, *names)


# -- calibration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration data comes from and how much of it.

    `text`/`npz` are mutually exclusive; with neither, `PTQONNX_CALIB_TEXT` then WikiText-2 train are used.
    `tokenizer_dir` defaults to the model's folder. `samples` windows of `seq_len` tokens, drawn with `seed`.
    """

    text: Path | None = option(None, "text file to draw calibration windows from (default: $PTQONNX_CALIB_TEXT, "
                               "else WikiText-2 train via `datasets`)", flag="--calib-text", metavar="FILE")
    npz: Path | None = option(None, "model inputs by input name, first axis = samples", flag="--calib-npz",
                              metavar="FILE")
    tokenizer_dir: Path | None = option(None, "folder with tokenizer.json (default: beside the model)",
                                        flag="--tokenizer", metavar="DIR")
    samples: int = option(128, "number of calibration windows", flag="--calib-samples", metavar="N")
    seq_len: int = option(512, "tokens per calibration window", flag="--calib-seq-len", metavar="L")
    seed: int = option(0, "seed for window offsets", flag="--seed")
    provider: str = option("cpu", "ONNX Runtime execution provider of the calibration runs (statistics, the "
                           "sequential methods' block runs); cuda/tensorrt need onnxruntime-gpu and never fall back "
                           "to the CPU. The float checks and the output checks run on the CPU", flag="--provider",
                           choices=("cpu", "cuda", "tensorrt"))

    def __post_init__(self) -> None:
        _check_fields(self, "calibration")
        ref = lambda n: FieldRef("calibration", n)  # noqa: E731
        if self.text is not None and self.npz is not None:
            raise ConfigError("pass either {0} or {1} calibration data, not both", ref("text"), ref("npz"))
        for name, lo in (("samples", 1), ("seq_len", 2)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{{0}} must be at least {lo}, got {getattr(self, name)}", ref(name))
        if self.seed < 0:
            raise ConfigError(f"{{0}} must be non-negative, got {self.seed}", ref("seed"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# -- the recipe -------------------------------------------------------------------------------------------


def _power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class Recipe:
    """A whole compile: stages in run order plus the options that are not one stage's.

    Normalized on construction: a missing weights stage is implied (rtn; 8-bit per channel under w8a8),
    `format` and `target` get the defaults of the stages present, and every combination that cannot work is
    a ConfigError naming the fields involved.
    """

    stages: tuple[StageConfig, ...]
    target: str | None = option(None, "the runtime the output is for; it sets the form and refuses what that "
                                "runtime cannot run. W8A8: tensorrt (symmetric int8 activations, positive scales) or "
                                "ort-cpu (asymmetric uint8 activations); weight-only: tensorrt (INT4/INT8 "
                                "DequantizeLinear+MatMul, positive scales, blocks of 64/128), ort-cpu or ort-cuda "
                                "(MatMulNBits)", flag="--target", choices=TARGETS,
                                default_help="tensorrt with --w8a8, none for weight-only (the form --format says)")
    format: str | None = option(None, "com.microsoft MatMulNBits (ONNX Runtime) or DequantizeLinear+MatMul "
                                "(TensorRT, opset 21)", flag="--format", choices=FORMATS,
                                default_help="matmulnbits; qdq with --w8a8")
    accuracy_level: int | None = option(None, "MatMulNBits accuracy_level (4 = int8 activations inside the "
                                        "kernel; an ONNX Runtime CPU knob)", flag="--accuracy-level",
                                        choices=(0, 1, 2, 3, 4))
    keep_lm_head: bool = option(False, "leave the LM head in float", flag="--keep-lm-head")
    quantize_embeddings: bool = option(False, "also quantize embedding Gathers to 4-bit GatherBlockQuantized",
                                       flag="--quantize-embeddings")
    exclude: tuple[str, ...] = option((), "a layer to leave in float: a node or weight name, '*' patterns "
                                      "allowed (e.g. '*down_proj*'); repeat the flag for more",
                                      flag="--exclude", metavar="NAME", repeat=True)
    nonfinite_weights: str = option("error", "a weight holding NaN/Inf: refuse the model (error), or leave that "
                                    "layer in float with a warning (keep-float)", flag="--nonfinite-weights",
                                    choices=("error", "keep-float"))
    only_float_layers: bool = option(False, "the model is already partly quantized: quantize its float layers "
                                     "and leave the quantized ones as they are", flag="--only-float-layers")
    keep_cache_values: bool = option(
        False, "KV-cache graphs: leave the values the cache stores (present.*.value) as the float model's, so R2 and "
        "the v_proj -> o_proj scale are not applied where V is cached (by default they are, and the cache holds "
        "V R or V / s: exact for a cache this model wrote, as every decode loop's is)", flag="--keep-cache-values")
    keep_conv: bool = option(
        False, "leave Conv layers in float (by default each gets INT8 weights per output channel as a "
        "DequantizeLinear, whatever the linear layers' grid, and under --w8a8 static per-tensor INT8 activations)",
        flag="--keep-conv")
    calibration: CalibConfig | None = None

    def __post_init__(self) -> None:
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else (self.stages,)
        for s in stages:
            if not isinstance(s, StageConfig):
                raise ConfigError(f"{{0}} must hold stage configs, got {type(s).__name__}", FieldRef("", "stages"))
        object.__setattr__(self, "stages", stages)
        if self.calibration is not None and not isinstance(self.calibration, CalibConfig):
            raise ConfigError("{0} must be a CalibConfig", FieldRef("", "calibration"))
        _check_fields(self, "", skip=("stages", "calibration"))
        self._normalize()

    # -- views --

    def stage_of(self, cls: type) -> StageConfig | None:
        return next((s for s in self.stages if isinstance(s, cls)), None)

    @property
    def weights(self) -> WeightStage:
        return next(s for s in self.stages if s.kind == "weights")  # type: ignore[return-value]

    @property
    def w8a8(self) -> W8A8Config | None:
        return self.stage_of(W8A8Config)  # type: ignore[return-value]

    @property
    def method(self) -> str:
        """The `--method` spelling: the stages before the activations joined by `+`, RTN left out after
        another stage (smoothquant + rtn weights reads `smoothquant`, awq + rtn `awq`)."""
        names = [s.stage for s in self.stages if s.kind != "activations"]
        if len(names) > 1 and isinstance(self.weights, RtnConfig):
            names.remove(RtnConfig.stage)
        return "+".join(names)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.stages)

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "stages":
                out["stages"] = [{s.stage: s.to_dict()} for s in self.stages]
            elif f.name == "calibration":
                if self.calibration is not None:
                    out["calibration"] = self.calibration.to_dict()
            else:
                out[f.name] = _plain(getattr(self, f.name))
        return out

    # -- normalization and cross-stage checks --

    def _normalize(self) -> None:
        stages = list(self.stages)
        seen: dict[str, StageConfig] = {}
        for s in stages:
            if s.stage in seen:
                raise ConfigError(f"stage {s.stage} appears twice in {{0}}", FieldRef("", "stages"))
            seen[s.stage] = s
        for a, b in zip(stages, stages[1:]):
            if a.order >= b.order:
                raise ConfigError(f"stage {b.stage} cannot follow {a.stage} in {{0}}: the order is rotate, "
                                  "smoothquant, then awq, then the weights (rtn or gptq), then w8a8",
                                  FieldRef("", "stages"))
        weights = [s for s in stages if s.kind == "weights"]
        if len(weights) > 1:
            raise ConfigError(f"{{0}} has two weights stages ({weights[0].stage}, {weights[1].stage}); keep one",
                              FieldRef("", "stages"))
        w8a8 = next((s for s in stages if isinstance(s, W8A8Config)), None)
        if not weights:
            implied = RtnConfig(**(W8A8Config.WEIGHT_DEFAULTS if w8a8 is not None else {}))
            stages.insert(next((i for i, s in enumerate(stages) if s.order > implied.order), len(stages)), implied)
        object.__setattr__(self, "stages", tuple(stages))
        w = self.weights
        sq = self.stage_of(SmoothQuantConfig)
        awq = self.stage_of(AwqConfig)
        ref = lambda name: FieldRef("", name)  # noqa: E731
        if sq is not None and w8a8 is None:
            raise ConfigError("smoothquant emits W8A8; add {0}", FieldRef(W8A8Config.stage, ""))
        if awq is not None and isinstance(w, GptqConfig) and not w.sequential:
            raise ConfigError("awq+gptq always calibrates block by block: drop {0}", w.ref("sequential"))
        if w8a8 is not None:
            if awq is not None:
                raise ConfigError("awq is weight-only; W8A8 goes with smoothquant, rtn or gptq weights")
            if (w.bits, w.group_size, w.symmetric) != (8, None, True):
                raise ConfigError("W8A8 weights are INT8 symmetric per output channel: drop {0}, {1} and {2}",
                                  w.ref("bits"), w.ref("group_size"), w.ref("symmetric"))
            if self.format not in (None, "qdq"):
                raise ConfigError("W8A8 is written as QDQ: drop {0}", ref("format"))
            if self.accuracy_level is not None:
                raise ConfigError("{0} is for weight-only MatMulNBits; W8A8's dynamic layers use level 4: drop it",
                                  ref("accuracy_level"))
            if self.quantize_embeddings:
                raise ConfigError("{0} is weight-only; drop it with W8A8", ref("quantize_embeddings"))
            if self.keep_lm_head:
                raise ConfigError("W8A8 leaves the LM head in float unless {1}: drop {0}", ref("keep_lm_head"),
                                  w8a8.ref("quantize_lm_head"))
            target = self.target or W8A8Config.DEFAULT_TARGET
            if (w8a8.act_scales == "dynamic" or w8a8.dynamic_layers) and target != "ort-cpu":
                raise ConfigError("dynamic activation scales run in ONNX Runtime's CPU int8 MatMulNBits kernel "
                                  "only (TensorRT INT8 takes static per-tensor scales): set {0} ort-cpu, or drop "
                                  "{1} dynamic / {2}", ref("target"), w8a8.ref("act_scales"),
                                  w8a8.ref("dynamic_layers"))
            if target == "ort-cuda":
                raise ConfigError("W8A8 targets tensorrt or ort-cpu ({0} ort-cuda is for weight-only MatMulNBits)",
                                  ref("target"))
            if w8a8.qtype == "fp8":
                if target != "tensorrt":
                    raise ConfigError("FP8 W8A8 is for TensorRT (ONNX Runtime's CPU EP has no FP8 GEMM: it would "
                                      "dequantize to float): set {0} tensorrt, or drop {1} fp8", ref("target"),
                                      w8a8.ref("qtype"))
                if not isinstance(w, RtnConfig):
                    raise ConfigError(f"{{0}} fp8 rounds weights to nearest (GPTQ's error feedback runs on the "
                                      f"integer grid): use rtn or smoothquant weights, not {w.stage}",
                                      w8a8.ref("qtype"))
                if w.scales == "signed":
                    raise ConfigError("FP8 scales are positive (max|w| / 448): drop {0}", w.ref("scales"))
                w = dataclasses.replace(w, fp8=True, scales="positive")
                object.__setattr__(self, "stages", tuple(w if s.kind == "weights" else s for s in self.stages))
            elif w.fp8:
                raise ConfigError("{0} is set by {1} fp8; drop it", w.ref("fp8"), w8a8.ref("qtype"))
            object.__setattr__(self, "target", target)
            object.__setattr__(self, "format", "qdq")
        else:
            if w.fp8:
                raise ConfigError("{0} goes with FP8 activations: add {1} with qtype fp8 (--w8a8 --w8a8-type fp8)",
                                  w.ref("fp8"), FieldRef(W8A8Config.stage, ""))
            if self.target == "tensorrt":
                self._tensorrt_weight_only(w)
            elif self.target == "ort-cuda" and self.accuracy_level is not None:
                raise ConfigError("{0} is an ONNX Runtime CPU knob (the CUDA MatMulNBits kernel ignores it): drop it "
                                  "with {1} ort-cuda", ref("accuracy_level"), ref("target"))
            elif self.target is not None and self.format == "qdq":
                raise ConfigError(f"{{0}} {self.target} runs MatMulNBits; drop {{1}} qdq (or set {{0}} tensorrt)",
                                  ref("target"), ref("format"))
            fmt = self.format or ("qdq" if self.target == "tensorrt" else "matmulnbits")
            object.__setattr__(self, "format", fmt)
            if self.accuracy_level is not None and fmt != "matmulnbits":
                raise ConfigError("{0} applies to {1} matmulnbits only", ref("accuracy_level"), ref("format"))
            if fmt == "matmulnbits" and w.group_size is not None and not _power_of_two(w.group_size):
                raise ConfigError(f"{{0}} {w.group_size} is not a power of two, which MatMulNBits requires; use "
                                  "32, 64, 128 or 256 (or {1} qdq)", w.ref("group_size"), ref("format"))
            if self.quantize_embeddings and w.group_size is None:
                raise ConfigError("{0} quantizes embeddings blockwise (GatherBlockQuantized), and 8-bit weights "
                                  "default to per channel: set {1} (e.g. 128)", ref("quantize_embeddings"),
                                  w.ref("group_size"))
        if w.scales == "signed" and self.target == "tensorrt":
            raise ConfigError("TensorRT refuses negative scales (\"Scale coefficients must all be positive\"): drop "
                              "{0} signed with {1} tensorrt", w.ref("scales"), ref("target"))
        if w.scales == AUTO and self.target == "tensorrt" and w.symmetric:
            if awq is not None:
                raise ConfigError("awq searches its scales and clipping on ONNX Runtime's signed grid, which "
                                  "TensorRT refuses: use gptq or rtn with {0} tensorrt", ref("target"))
            resolved = dataclasses.replace(w, scales="positive")  # auto elsewhere reads as signed
            object.__setattr__(self, "stages", tuple(resolved if s is w else s for s in self.stages))
        if awq is not None and self.weights.scales == "positive":
            raise ConfigError("awq searches its scales and clipping on ONNX Runtime's signed grid: drop {0}",
                              w.ref("scales"))

    def _tensorrt_weight_only(self, w: WeightStage) -> None:
        """Weight-only for TensorRT: symmetric INT4 blocked by 64/128 or INT8 per channel, as DequantizeLinear on
        constant weights (TensorRT has no MatMulNBits, no zero points, no other block sizes)."""
        ref = lambda name: FieldRef("", name)  # noqa: E731
        if self.format == "matmulnbits":
            raise ConfigError("TensorRT has no MatMulNBits (a com.microsoft op): drop {0} matmulnbits with {1} "
                              "tensorrt, or set {1} ort-cpu / ort-cuda", ref("format"), ref("target"))
        if not w.symmetric:
            raise ConfigError("TensorRT's INT4/INT8 weights are symmetric (no zero point): drop {0} with {1} "
                              "tensorrt", w.ref("symmetric"), ref("target"))
        if w.bits == 8 and w.group_size is not None:
            raise ConfigError("TensorRT takes INT8 weights per output channel, not blocked: set {0} 0 with {1} "
                              "tensorrt", w.ref("group_size"), ref("target"))
        if w.bits < 8 and w.group_size not in TRT_INT4_BLOCKS:
            raise ConfigError(f"TensorRT blocks INT4 weights by {' or '.join(map(str, TRT_INT4_BLOCKS))}: set {{0}} "
                              f"64 or 128 with {{1}} tensorrt (got {w.group_size})", w.ref("group_size"),
                              ref("target"))
        if self.accuracy_level is not None:
            raise ConfigError("{0} is a MatMulNBits knob: drop it with {1} tensorrt", ref("accuracy_level"),
                              ref("target"))
        if self.quantize_embeddings:
            raise ConfigError("{0} writes GatherBlockQuantized (a com.microsoft op TensorRT lacks): drop it with {1} "
                              "tensorrt", ref("quantize_embeddings"), ref("target"))


def as_recipe(config: Recipe | StageConfig | list | tuple, **options: Any) -> Recipe:
    """A Recipe from a Recipe, one stage config or a list of them; `options` set recipe-level fields."""
    if isinstance(config, Recipe):
        return dataclasses.replace(config, **options) if options else config
    stages = tuple(config) if isinstance(config, (list, tuple)) else (config,)
    return Recipe(stages=stages, **options)
