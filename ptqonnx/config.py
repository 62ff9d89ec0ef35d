"""Frozen configuration dataclasses: the public description of one compile.

Every field is checked in `__post_init__` (ValueError with the field, the value and what is allowed);
the CLI turns those into one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "METHODS", "FORMATS", "TARGETS", "CALIB_RANGES", "ACT_SCALES", "WeightQuantConfig", "GptqConfig", "AwqConfig",
    "SmoothQuantConfig", "W8A8Config", "CompileConfig", "matches_any",
]

METHODS = ("rtn", "gptq", "smoothquant", "awq", "awq+gptq")
TARGETS = ("tensorrt", "ort-cpu")
CALIB_RANGES = ("minmax", "percentile")
ACT_SCALES = ("static", "dynamic")
FORMATS = ("matmulnbits", "qdq")


def _power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def matches_any(patterns: tuple[str, ...], *names: str) -> bool:
    """Whether any of `names` matches any shell-style pattern (`*`, `?`, `[...]`; case-sensitive)."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(n, p) for p in patterns for n in names if n)


@dataclass(frozen=True)
class WeightQuantConfig:
    """How linear weights are quantized and emitted.

    bits: 4 (blockwise along K) or 8; group_size: block length along K, None = per output channel
    (the default for 8 bits); symmetric: grid around zero with the implicit zero point 2^(bits-1).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    format: str = "matmulnbits"
    accuracy_level: int | None = None
    keep_lm_head: bool = False
    quantize_embeddings: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ValueError(f"bits must be 3, 4 or 8, got {self.bits}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.group_size is not None:
            if self.group_size < 16:
                raise ValueError(f"group size must be at least 16, got {self.group_size}")
            if self.format == "matmulnbits" and not _power_of_two(self.group_size):
                raise ValueError(
                    f"group size {self.group_size} is not a power of two, which MatMulNBits requires; "
                    "use 32, 64, 128 or 256"
                )
        elif self.bits < 8:
            raise ValueError(f"{self.bits}-bit weights need a group size (e.g. 128); per-channel is for 8 bits")
        if self.accuracy_level is not None:
            if self.format != "matmulnbits":
                raise ValueError("accuracy level applies to --format matmulnbits only")
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ValueError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if self.quantize_embeddings and self.group_size is None:
            raise ValueError("quantizing embeddings needs a group size (GatherBlockQuantized is blockwise)")


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ (Frantar et al. 2022): `damp` x mean diag(H) dampening; `act_order` visits columns by descending
    diag(H), with static groups so the output keeps contiguous groups; `sequential` calibrates block by block
    on the partly quantized model (else one-shot Hessians from the float model); `device` for the algebra."""

    damp: float = 0.01
    act_order: bool = True
    sequential: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al. 2023): `alpha` in [0, 1] migrates activation range into the weights
    (s_j = max|X_j|^alpha / max|W_j|^(1-alpha)), or "auto": grid search per scaling group."""

    alpha: float | str = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class W8A8Config:
    """INT8 weights (symmetric, per output channel) and INT8 activations (per tensor, static scales).

    target: `tensorrt` = symmetric int8 activations, zero point 0 (TensorRT takes no other);
    `ort-cpu` = asymmetric uint8 activations (ORT's CPU EP fuses shared uint8 Q/DQ into MatMulIntegerToFloat,
    shared int8 ones not).
    calib_range: `minmax` (full range) or `percentile` (clip |x| at `percentile` of the sampled rows).
    quantize_bmm: also quantize attention's activation x activation MatMuls; quantize_lm_head: the LM head too.
    act_scales: `static` (per tensor, from calibration: QDQ) or `dynamic` (per row and block of K, computed at
    run time by ORT's MatMulNBits int8 kernel, accuracy_level 4; `ort-cpu` only: TensorRT INT8 takes static
    scales only). dynamic_layers: with static scales, the layers given dynamic ones instead (shell-style
    patterns matched against the node name or the weight initializer's name, e.g. `*down_proj*`).
    """

    target: str = "tensorrt"
    calib_range: str = "minmax"
    percentile: float = 99.99
    quantize_bmm: bool = False
    quantize_lm_head: bool = False
    act_scales: str = "static"
    dynamic_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.calib_range not in CALIB_RANGES:
            raise ValueError(f"calibration range must be one of {', '.join(CALIB_RANGES)}, got {self.calib_range!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.act_scales not in ACT_SCALES:
            raise ValueError(f"activation scales must be one of {', '.join(ACT_SCALES)}, got {self.act_scales!r}")
        if (self.act_scales == "dynamic" or self.dynamic_layers) and self.target != "ort-cpu":
            raise ValueError("dynamic activation scales run in ONNX Runtime's CPU int8 MatMulNBits kernel only "
                             "(TensorRT INT8 takes static per-tensor scales): pass --target ort-cpu, or drop "
                             "--act-scales dynamic / --dynamic-layers")
        if self.act_scales == "dynamic":
            if self.dynamic_layers:
                raise ValueError("--dynamic-layers picks layers within --act-scales static; with --act-scales "
                                 "dynamic every layer is dynamic already: drop one of them")
            if self.quantize_bmm:
                raise ValueError("--quantize-bmm quantizes attention with static scales; drop it with "
                                 "--act-scales dynamic")
            if self.calib_range != "minmax":
                raise ValueError("--calib-range sets static activation ranges; drop it with --act-scales dynamic")

    def dynamic(self, *names: str) -> bool:
        """Whether the layer known by `names` (node name, weight name) gets dynamic activation scales."""
        return self.act_scales == "dynamic" or matches_any(self.dynamic_layers, *names)

    @property
    def symmetric(self) -> bool:
        return self.target == "tensorrt"


@dataclass(frozen=True)
class AwqConfig:
    """AWQ (Lin et al. 2024): per scaling group s = mean|x|^alpha with alpha on a `grid` in [0, 1); `clip`:
    per-block range shrinking search; `no_insert`: refuse groups whose 1/s needs an explicit Mul;
    `scale_lm_head`: also scale the LM head's group (llm-awq does not); `device` for the search math (torch)."""

    grid: int = 20
    clip: bool = True
    no_insert: bool = False
    scale_lm_head: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 1 <= self.grid <= 1000:
            raise ValueError(f"AWQ grid must be in [1, 1000], got {self.grid}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class CompileConfig:
    """One compile: a method, its weight config and method options."""

    method: str = "rtn"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    awq: AwqConfig = field(default_factory=AwqConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    w8a8: W8A8Config | None = None  # None: weight-only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "smoothquant" and self.w8a8 is None:
            raise ValueError("smoothquant emits W8A8; pass --w8a8")
        if self.w8a8 is not None:
            w = self.weights
            if self.method not in ("rtn", "smoothquant"):
                raise ValueError(f"--w8a8 goes with --method smoothquant or rtn, not {self.method}")
            if (w.bits, w.group_size, w.symmetric, w.format) != (8, None, True, "qdq") or w.quantize_embeddings:
                raise ValueError("W8A8 weights are INT8 symmetric per output channel in QDQ form; drop --wbits, "
                                 "--group-size, --asym, --format and --quantize-embeddings")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.w8a8 is not None
