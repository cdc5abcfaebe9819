"""CPU threads chosen for the work, not for the machine's load.

torch splits each matrix product over its intra-op threads. That pays for a backbone's large batches (fine-tuning,
tracing, batched inference), but a policy MLP, a bandit, an env step or one decoded token is too small to split:
the threads mostly wait for each other, and on a CPU that another job also uses they wait for that job too
(measured: docs/guides/cpu-threads.md). So ``threads: auto`` (the default) gives each phase its own fixed count:

* ``backbone`` (fine-tuning, tracing, co-training's backbone, batched inference): every core torch found at
  start (``OMP_NUM_THREADS`` when set, else the machine's cores);
* ``policy`` (policy learning, evaluation, token-by-token decoding): one thread.

The counts depend on the machine only, never on its load: the same seed gives identical numbers only on the same
thread count. ``threads: N`` means N in every phase; ``null`` leaves torch's count alone. `busy_warning` says
once per process when the machine is busier than its cores.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch

AUTO = "auto"
PHASES = ("backbone", "policy")
STARTUP_THREADS = torch.get_num_threads()  # torch's own choice at start, before exitrl sets any count
_warned: list[bool] = []  # one busy-machine warning per process


def check_threads(value, key: str = "threads") -> int | str | None:
    """``auto``, a whole number >= 1 or None (torch's default); anything else is a ValueError naming ``key``.
    A number given as text (``--threads 2``) is that number."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    valid = value is None or value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not valid:
        raise ValueError(f"{key} must be a whole number >= 1, auto (a count per phase: all cores to fine-tune and "
                         f"trace, 1 for policies and decoding) or null (torch's default); got {value!r}.")
    return value


def phase_threads(setting, phase: str) -> int | None:
    """The thread count of ``phase`` under ``setting`` (None: leave torch's count as it is)."""
    if phase not in PHASES:
        raise ValueError(f"Unknown thread phase {phase!r}; valid: {', '.join(PHASES)}.")
    setting = check_threads(setting)
    if setting == AUTO:
        return STARTUP_THREADS if phase == "backbone" else 1
    return setting


@contextlib.contextmanager
def threads_for(phase: str, setting) -> Iterator[int]:
    """Run the block on ``phase``'s thread count under ``setting``; the previous count is restored after it."""
    count = phase_threads(setting, phase)
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def threads_record(setting) -> int | dict:
    """What a run record says about threads: the one count every phase used, or ``{phase: count}`` when they
    differ (``auto``)."""
    counts = {phase: phase_threads(setting, phase) or torch.get_num_threads() for phase in PHASES}
    return counts["backbone"] if len(set(counts.values())) == 1 else counts


def busy_warning(setting, load: Callable[[], float] | None = None, cores: int | None = None,
                 stream=None) -> str | None:
    """Once per process: when the 1-minute load average is at least the number of cores and ``setting`` would run
    some phase on more than one thread, one line on ``stream`` (stderr) suggesting ``threads=1``; returns it.
    ``load`` (a function returning the load average) and ``cores`` stand in for the machine's."""
    if _warned or max(phase_threads(setting, phase) or torch.get_num_threads() for phase in PHASES) <= 1:
        return None
    try:
        current = (load or (lambda: os.getloadavg()[0]))()
    except OSError:  # no load average on this system
        return None
    cores = cores or os.cpu_count() or 1
    if current < cores:
        return None
    _warned.append(True)
    line = (f"exitrl: warning: this machine is busy (load {current:.1f} on {cores} cores); torch's threads will "
            "wait for the other work: threads=1 (--threads 1) is often many times faster.")
    print(line, file=stream or sys.stderr, flush=True)
    return line


def on_threads(phase: str, setting, function: Callable) -> Callable:
    """``function`` run on ``phase``'s thread count at each call (a decoding step function, say)."""
    def call(*args, **kwargs):
        with threads_for(phase, setting):
            return function(*args, **kwargs)

    return call
