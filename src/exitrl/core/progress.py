"""Progress that stays readable: tqdm's live bar on a terminal, and a plain log line every ``every`` seconds (and at
the end) when output goes to a file, a job scheduler or CI, where a bar's carriage-return updates flood the log.

``TQDM_DISABLE=1`` silences both; ``EXITRL_PROGRESS_SECONDS`` sets the interval of the log lines (30 by default).
The lines go to the ``exitrl.core.progress`` logger when logging is configured (the train and sweep CLIs' logs),
else straight to the stream (stderr), so a CLI without a log still shows them.
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
                 every: float = 30.0, initial: int = 0, stream=None):
        self.iterable, self.desc, self.unit, self.every, self.stream = iterable, desc, unit, every, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.initial, self.postfix, self.closed = initial, initial, "", False
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

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **values}.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report()

    def report(self) -> None:
        elapsed = time.monotonic() - self.started
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = f", {(self.n - self.initial) / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        line = f"{self.desc}: {done} {self.unit} in {elapsed:.0f} s{rate}{f' ({self.postfix})' if self.postfix else ''}"
        if log.hasHandlers():
            log.info("%s", line)
        else:  # no log configured (predict, generate): the line itself, where a bar would have gone
            print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.report()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, stream=None, initial: int = 0):
    """A live tqdm bar when ``stream`` (stderr by default) is a terminal, else a `LogProgress`. ``initial``: the
    work already done (a resumed run's)."""
    stream = sys.stderr if stream is None else stream
    quiet = disable or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    if quiet:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, initial=initial)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, every=interval(), initial=initial, stream=stream)
