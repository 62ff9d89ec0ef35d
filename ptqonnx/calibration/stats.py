"""Saved calibration statistics: value name -> TensorStats, stored as one `.npz`.

Keys are `{value_name}::{field}` (`absmax`, `mean_abs`, `min`, `max`, `xtx`, `sample`, `count`,
`channels`, `minmax_stale`); the name is split at the last `::`, so names with `/`, `.` or `:` survive.
Passes that rescale an activation exactly (x' = x / s) replace its entry with `scaled(name, s)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ptqonnx.calibration.observers import TensorStats
from ptqonnx.errors import UserError

__all__ = ["Statistics"]

logger = logging.getLogger(__name__)

_FORMAT_KEY = "__ptqonnx_statistics__"
_FORMAT_VERSION = 1
_ARRAY_FIELDS = ("absmax", "mean_abs", "xtx", "sample", "row_absmax")


class Statistics(Mapping[str, TensorStats]):
    """An immutable mapping value name -> TensorStats; `scaled`/`replace` return new objects."""

    def __init__(self, entries: Mapping[str, TensorStats] | None = None) -> None:
        self._entries: dict[str, TensorStats] = dict(entries or {})

    def __getitem__(self, name: str) -> TensorStats:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no statistics for value {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {sorted(s.value for s in v.kinds)}" for k, v in self._entries.items())
        return f"Statistics({{{inner}}})"

    def replace(self, name: str, stats: TensorStats) -> Statistics:
        """A copy with `name` set to `stats`."""
        entries = dict(self._entries)
        entries[name] = stats
        return Statistics(entries)

    def merged(self, other: Mapping[str, TensorStats]) -> Statistics:
        """A copy with the entries of `other` added (they win on equal names)."""
        return Statistics({**self._entries, **other})

    def scaled(self, name: str, s: np.ndarray) -> Statistics:
        """A copy where `name` holds the statistics of x / s (per channel); see TensorStats.scaled."""
        return self.replace(name, self[name].scaled(s))

    def save(self, path: str | Path) -> Path:
        """Write all entries to one `.npz` (uncompressed; XᵀX is dense float64)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {_FORMAT_KEY: np.array(_FORMAT_VERSION, np.int64)}
        for name, st in self._entries.items():
            arrays[f"{name}::count"] = np.array(st.count, np.int64)
            arrays[f"{name}::channels"] = np.array(st.channels, np.int64)
            arrays[f"{name}::minmax_stale"] = np.array(st.minmax_stale)
            for f in _ARRAY_FIELDS:
                v = getattr(st, f)
                if v is not None:
                    arrays[f"{name}::{f}"] = v
            if st.min is not None:
                arrays[f"{name}::min"] = np.array(st.min, np.float64)
                arrays[f"{name}::max"] = np.array(st.max, np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path)
        logger.info("saved statistics of %d values to %s", len(self), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"statistics file not found: {path}; pass the .npz written by a calibration run")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # zip/format errors
            raise UserError(f"cannot read statistics from {path} ({exc}); pass a .npz written by ptqonnx") from None
        with data:
            if _FORMAT_KEY not in data.files:
                raise UserError(f"{path} is not a ptqonnx statistics file; pass a .npz written by ptqonnx")
            fields: dict[str, dict[str, np.ndarray]] = {}
            for key in data.files:
                if key == _FORMAT_KEY:
                    continue
                name, field = key.rsplit("::", 1)
                fields.setdefault(name, {})[field] = data[key]
        entries = {}
        for name, f in fields.items():
            entries[name] = TensorStats(
                count=int(f["count"]),
                channels=int(f["channels"]),
                absmax=f.get("absmax"),
                mean_abs=f.get("mean_abs"),
                xtx=f.get("xtx"),
                sample=f.get("sample"),
                row_absmax=f.get("row_absmax"),
                min=float(f["min"]) if "min" in f else None,
                max=float(f["max"]) if "max" in f else None,
                minmax_stale=bool(f["minmax_stale"]),
            )
        return cls(entries)
