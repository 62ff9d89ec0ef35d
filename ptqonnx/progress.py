"""Progress of the long steps (export, calibration feeds, sequential blocks, perplexity windows, latency
rounds, the output checks): a `rich` bar with ETA on a terminal, one log line per step elsewhere (CI logs),
nothing when the `ptqonnx` logger is above INFO (`--quiet`, or a library user who configured no logging).

    with progress_task("calibration", len(feeds)) as advance:
        for feed in feeds:
            ...
            advance()                     # or advance(info="loss 0.012"): shown beside the bar / in the line

Not a terminal: each step is one INFO record of `ptqonnx.progress`, e.g. "calibration 3/16 (12.4 s, ETA 50 s)";
a task of more than `2 * LOG_LINES` steps logs its first step, then about every `1 / LOG_LINES` of its total
(or after `LOG_EVERY_S` without a line), and always its last step. On a terminal the bars share one
`rich.progress.Progress`: a task opened while another is running is a second bar below it (removed when it is
done), and log records written through `StderrHandler` (the CLI's handler) are printed above the bars, never
into them. Messages stay logging's: a bar is never the only place something is said.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Advance", "LOG_LINES", "LOG_EVERY_S", "StderrHandler", "progress_task"]

logger = logging.getLogger(__name__)

Advance = Callable[..., None]  # advance(n: int = 1, info: str = "")

LOG_LINES = 20  # a long task logs about this many lines (plus its last step)
LOG_EVERY_S = 30.0  # ... or one after this long without a line
_INFO_WIDTH = 60  # characters of `info` shown beside a bar

_bars: Any = None  # the rich Progress on screen, shared by nested tasks
_open = 0  # tasks open on it


class StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever `sys.stderr` is at the time: while a bar is drawn, rich swaps in a
    proxy that prints each line above the bars, so log lines and bars never share a line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it; always the current stderr
        pass


@contextmanager
def progress_task(description: str, total: int | None = None, *, console: Any = None) -> Iterator[Advance]:
    """Context manager yielding `advance(n=1, info="")` for a task of `total` steps (None: unknown).

    `console`: a `rich.console.Console` to draw on (default: stderr when it is a terminal); a bar is drawn
    when it is interactive, else the steps are logged. Nothing at all when INFO is off for `ptqonnx`."""
    if not logger.isEnabledFor(logging.INFO):
        yield _nothing
        return
    if _bars is not None or _interactive(console):
        with _bar_task(description, total, console) as advance:
            yield advance
        return
    task = _LogTask(description, total)
    yield task.advance
    task.finish()  # not on an exception: the error is the last word


def _nothing(n: int = 1, info: str = "") -> None:
    pass


def _interactive(console: Any) -> bool:
    if console is not None:
        return bool(console.is_interactive)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") not in ("dumb", "unknown")


@contextmanager
def _bar_task(description: str, total: int | None, console: Any) -> Iterator[Advance]:
    global _bars, _open
    if _bars is None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        _bars = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(bar_width=30), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=console if console is not None else Console(stderr=True), refresh_per_second=4,
        )
        _bars.start()
    bars = _bars
    _open += 1
    task = bars.add_task(description, total=total, info="")

    def advance(n: int = 1, info: str = "") -> None:
        shown = info if len(info) <= _INFO_WIDTH else info[: _INFO_WIDTH - 1] + "…"
        bars.update(task, advance=n, **({"info": shown} if info else {}))

    try:
        yield advance
    finally:
        _open -= 1
        if _open == 0:
            _bars = None
            bars.stop()  # the finished bars stay on screen: what ran, and how long it took
        else:
            bars.remove_task(task)  # a step of the task still running: its bar goes when it is done


class _LogTask:
    """One INFO line per step (throttled for long tasks), always the last one."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total = description, total
        self.every = 1 if total is None or total <= 2 * LOG_LINES else math.ceil(total / LOG_LINES)
        self.t0 = self.t_line = time.perf_counter()
        self.done = self.shown = 0
        self.info = ""

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        now = time.perf_counter()
        last = self.total is not None and self.done >= self.total
        if last or self.shown == 0 or self.done - self.shown >= self.every or now - self.t_line >= LOG_EVERY_S:
            self._line(now)

    def finish(self) -> None:
        if self.done != self.shown:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        if self.total is None:
            count, timing = f"{self.done}", _duration(elapsed)
        elif self.done >= self.total or self.done == 0:
            count, timing = f"{self.done}/{self.total}", _duration(elapsed)
        else:
            eta = elapsed / self.done * (self.total - self.done)
            count, timing = f"{self.done}/{self.total}", f"{_duration(elapsed)}, ETA {_duration(eta)}"
        logger.info("%s %s (%s)%s", self.description, count, timing, f": {self.info}" if self.info else "")
        self.shown, self.t_line, self.info = self.done, now, ""


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
