"""Frozen configuration dataclasses: the public description of one compile.

Every field is checked in `__post_init__` (ValueError with the field, the value and what is allowed);
the CLI turns those into one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["METHODS", "FORMATS", "WeightQuantConfig", "GptqConfig", "AwqConfig", "CompileConfig"]

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
FORMATS = ("matmulnbits", "qdq")


def _power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


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
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
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
        elif self.bits == 4:
            raise ValueError("4-bit weights need a group size (e.g. 128); per-channel is for 8 bits")
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
class AwqConfig:
    """AWQ (Lin et al. 2024): per scaling group s = mean|x|^alpha with alpha on a `grid` in [0, 1); `clip`:
    per-block range shrinking search; `no_insert`: refuse groups whose 1/s needs an explicit Mul;
    `scale_lm_head`: also scale the LM head's group (llm-awq does not); `sample_rows`: activation rows kept
    per value for the searches; `device` for the search math (torch)."""

    grid: int = 20
    clip: bool = True
    no_insert: bool = False
    scale_lm_head: bool = False
    sample_rows: int = 4096
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 1 <= self.grid <= 1000:
            raise ValueError(f"AWQ grid must be in [1, 1000], got {self.grid}")
        if self.sample_rows < 16:
            raise ValueError(f"AWQ sample rows must be at least 16, got {self.sample_rows}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class CompileConfig:
    """One compile: a method, its weight config and method options."""

    method: str = "rtn"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    awq: AwqConfig = field(default_factory=AwqConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"
