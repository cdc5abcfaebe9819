"""Progress in a log file: a line every few seconds and one at the end, never a flood of bar updates."""

from __future__ import annotations

import io
import logging
import time

from exitrl.core.progress import LogProgress, progress


def test_a_file_gets_log_lines_and_a_terminal_gets_a_bar(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("EXITRL_PROGRESS_SECONDS", "0.05")
    bar = progress(range(400), desc="fine-tune rte", unit="batch", stream=io.StringIO())
    assert isinstance(bar, LogProgress)
    with caplog.at_level(logging.INFO, logger="exitrl.core.progress"):
        for _ in bar:
            time.sleep(0.001)
    lines = [r.getMessage() for r in caplog.records]
    assert 2 <= len(lines) < 40  # ~0.5 s of work at one line per 0.05 s, not one per batch
    assert lines[-1].startswith("fine-tune rte: 400/400 batch in")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    live = progress(total=3, desc="x", stream=terminal)
    assert not isinstance(live, LogProgress)
    live.update(3)
    live.close()
    assert "\r" in terminal.getvalue()


def test_bad_interval_names_the_variable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("EXITRL_PROGRESS_SECONDS", "often")
    try:
        progress(range(3), stream=io.StringIO())
    except ValueError as err:
        assert "EXITRL_PROGRESS_SECONDS" in str(err)
    else:
        raise AssertionError("a bad interval must be refused")
