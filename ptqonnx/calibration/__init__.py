"""Calibration: data sources, streaming observers and saved statistics.

The ORT collection run lives in `ptqonnx.runtime.collect.collect_statistics` (runtime/ is the only
package importing onnxruntime); this package is numpy only.
"""

from __future__ import annotations

from ptqonnx.calibration.observers import DEFAULT_SAMPLE_ROWS, Stat, TensorObserver, TensorStats, parse_stats
from ptqonnx.calibration.sources import CALIB_TEXT_ENV, CalibConfig, calibration_batches, text_feeds
from ptqonnx.calibration.stats import Statistics

__all__ = [
    "CALIB_TEXT_ENV",
    "DEFAULT_SAMPLE_ROWS",
    "CalibConfig",
    "Stat",
    "Statistics",
    "TensorObserver",
    "TensorStats",
    "calibration_batches",
    "parse_stats",
    "text_feeds",
]
