"""Progress that stays readable: tqdm's live bar on a terminal, and a plain log line every ``every`` seconds (and at
the end) when output goes to a file, a job scheduler or CI, where a bar's carriage-return updates flood the log.

``TQDM_DISABLE=1`` silences both; ``EXITRL_PROGRESS_SECONDS`` sets the interval of the log lines (30 by default).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("exitrl.core.progress")


def interval() -> float:
    value = os.environ.get("EXITRL_PROGRESS_SECONDS", "30")
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ValueError(f"EXITRL_PROGRESS_SECONDS must be a number of seconds, got {value!r}.") from None


class LogProgress:
    """The part of tqdm's interface exitrl uses (iterate, ``update``, ``set_postfix``, ``close``, ``n``), writing a
    log line at most every ``every`` seconds and one when it closes."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 every: float = 30.0):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.closed = 0, "", False
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report()

    def report(self) -> None:
        elapsed = time.monotonic() - self.started
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        log.info("%s: %s %s in %.0f s%s%s", self.desc, done, self.unit, elapsed, rate,
                 f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.report()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, stream=None):
    """A live tqdm bar when ``stream`` (stderr by default) is a terminal, else a `LogProgress`."""
    stream = sys.stderr if stream is None else stream
    quiet = disable or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    if quiet:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, every=interval())
