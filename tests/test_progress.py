"""ptqonnx.progress: one log line per step off a terminal (throttled for long tasks, always the last), nothing
when quiet, a rich bar on a terminal; and on the command line, GPTQ's block lines once each, silenced by -q."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from ptqonnx import progress
from ptqonnx.progress import LOG_LINES, StderrHandler, progress_task


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ptqonnx.progress"]


def test_one_line_per_step_with_counts_off_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="ptqonnx"), progress_task("calibration", 3) as advance:
        for i in range(3):
            advance(info=f"feed {i}")
    lines = _lines(caplog)
    assert len(lines) == 3
    assert re.fullmatch(r"calibration 1/3 \(\d+\.\d s, ETA \d+\.\d s\): feed 0", lines[0]), lines[0]
    assert lines[1].startswith("calibration 2/3 (") and "ETA" in lines[1]
    assert re.fullmatch(r"calibration 3/3 \(\d+\.\d s\): feed 2", lines[2]), lines[2]  # done: no ETA
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_quiet_gives_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="ptqonnx"), progress_task("calibration", 3) as advance:
        for _ in range(3):
            advance()
    assert _lines(caplog) == []


def test_long_tasks_are_throttled_but_log_their_last_step(caplog):
    with caplog.at_level(logging.INFO, logger="ptqonnx"), progress_task("perplexity", 500) as advance:
        for _ in range(500):
            advance()
    lines = _lines(caplog)
    assert len(lines) <= LOG_LINES + 1 and lines[-1].startswith("perplexity 500/500 (")
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_a_throttled_or_unknown_total_still_ends_on_its_last_step(caplog):
    with caplog.at_level(logging.INFO, logger="ptqonnx"):
        with progress_task("feeds", 100) as advance:  # stops early at 57: the 57th step is still said
            for _ in range(57):
                advance()
        with progress_task("rounds") as advance:  # total unknown: counts without a total
            advance()
            advance()
    lines = _lines(caplog)
    assert any(line.startswith("feeds 57/100 (") for line in lines)
    assert [line.split(" (")[0] for line in lines if line.startswith("rounds")] == ["rounds 1", "rounds 2"]


def test_no_closing_line_after_an_error(caplog):
    with caplog.at_level(logging.INFO, logger="ptqonnx"), pytest.raises(ValueError):
        with progress_task("feeds", 100) as advance:
            advance()
            advance()
            raise ValueError("boom")
    lines = _lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("feeds 1/100 (")  # the first step, and no closing line


def _terminal():
    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, force_interactive=True, width=120), buf


def test_a_terminal_gets_a_bar_not_log_lines(caplog):
    console, buf = _terminal()
    with caplog.at_level(logging.INFO, logger="ptqonnx"):
        with progress_task("GPTQ block", 4, console=console) as advance:
            for i in range(4):
                advance(info=f"loss {i}.5")
                with progress_task("inner", 2) as inner:  # nested: a second bar on the same display
                    inner()
                    inner()
    out = buf.getvalue()
    assert "GPTQ block" in out and "4/4" in out and "ETA" in out and "loss 3.5" in out
    assert _lines(caplog) == [] and progress._bars is None  # closed with the outer task


def test_a_terminal_bar_is_silent_when_quiet(caplog):
    console, buf = _terminal()
    with caplog.at_level(logging.WARNING, logger="ptqonnx"), progress_task("x", 2, console=console) as advance:
        advance()
    assert buf.getvalue() == ""


def test_stderr_handler_writes_to_the_current_stderr(monkeypatch):
    handler = StderrHandler()
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # as rich's live display swaps in its proxy
    handler.emit(logging.LogRecord("ptqonnx", logging.INFO, __file__, 1, "hello", None, None))
    assert buf.getvalue() == "hello\n"


def test_cli_compile_says_each_gptq_block_once_and_q_silences_it(tmp_path, tiny_export, calib_text, caplog, capsys):
    from ptqonnx.cli import main

    args = ["compile", str(tiny_export / "model.onnx"), "--method", "gptq", "--calib-text", str(calib_text),
            "--calib-samples", "4", "--calib-seq-len", "32", "-o", str(tmp_path / "g.onnx"), "--force"]
    with caplog.at_level(logging.INFO, logger="ptqonnx"):  # restores the level main sets
        assert main(args) == 0
    lines = _lines(caplog)
    blocks = [line for line in lines if line.startswith("GPTQ block")]
    assert [b.split(" (")[0] for b in blocks] == [f"GPTQ block {i}/7" for i in range(1, 8)]
    assert all(": loss " in b for b in blocks)
    assert [line.split(" (")[0] for line in lines if line.startswith("output checks")] == [
        f"output checks {i}/3" for i in (1, 2, 3)]
    out, err = capsys.readouterr()
    assert "GPTQ block" not in out + err  # logging is the one channel: no print beside it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptqonnx"):
        assert main(["-q", *args]) == 0
    assert _lines(caplog) == [] and "wrote" in capsys.readouterr().out
