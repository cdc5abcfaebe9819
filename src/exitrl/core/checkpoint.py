"""Files that survive a kill: atomic, checksummed writes, and periodic training checkpoints with every RNG state.

A checked file is ``MAGIC``, the SHA-256 of the payload in hex, a newline, then the payload (``torch.save`` bytes).
It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the target, so a
reader sees the old file or the new one, never half of one; two processes writing the same file at once each
rename a whole file. `load_checked` verifies the checksum and raises `CorruptFile` (naming the file) on a
truncated or altered one. `write_manifest` / `verify_manifest` do the same for a folder of files (a saved
backbone).

`Checkpoints` decides when a training loop saves (every ``every_seconds`` of wall time, 0: after every step) and
holds the file; `rng_state` / `set_rng_state` carry Python's, NumPy's and torch's (CPU and CUDA) generators.

`save_on_interrupt` makes Ctrl-C lose no training: while a loop is checkpointing, the first Ctrl-C makes its next
`Checkpoints.due` true, so the loop saves at the end of the step it is in and then stops with KeyboardInterrupt.
A second Ctrl-C, a Ctrl-C while no loop checkpoints (tracing, evaluation), or a loop that does not reach its next
save within ``GRACE_SECONDS``, stops at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("exitrl.core.checkpoint")
MAGIC = b"exitrl-checked-v1\n"
GRACE_SECONDS = 10.0  # how long a Ctrl-C waits for the running loop's checkpoint before stopping anyway
POLLING_SECONDS = 2.0  # a loop that asked `due` this recently is checkpointing: a Ctrl-C waits for its save
_interrupt = {"requested": False, "polled": float("-inf")}


class CorruptFile(ValueError):
    """A checked file (or a folder with a manifest) that is truncated, altered or not a checked file at all."""


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(handle, 0o666 & ~umask)  # as an ordinary open() would create it (mkstemp makes it private)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_checked(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` into a checked file (see the module docstring)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return write_atomic(path, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checked(path: str | Path, weights_only: bool = False) -> Any:
    """The object in a checked file; `CorruptFile` when it is truncated, altered or not a checked file."""
    path = Path(path)
    data = path.read_bytes()
    header = len(MAGIC) + 65
    if not data.startswith(MAGIC) or len(data) < header or data[header - 1:header] != b"\n":
        raise CorruptFile(f"{path} is not a checked exitrl file (written by another program, or cut short).")
    expected, payload = data[len(MAGIC):header - 1].decode(), data[header:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CorruptFile(f"{path} is corrupt: its checksum does not match its content (truncated or altered).")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=weights_only)


MANIFEST = "checksums.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """``checksums.json`` in ``folder``: the SHA-256 of every other file in it (a saved backbone), so a cache hit
    can tell a whole folder from a truncated or altered one."""
    import json

    folder = Path(folder)
    sums = {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}
    return write_atomic(folder / MANIFEST, json.dumps(sums, indent=1).encode())


def verify_manifest(folder: str | Path) -> None:
    """`CorruptFile` naming the first missing or altered file of ``folder``; folders without a manifest (written
    before it existed) pass."""
    import json

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        sums = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{folder} is corrupt: its {MANIFEST} cannot be read ({err}).") from err
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CorruptFile(f"{folder} is incomplete: {name} is missing.")
        if file_digest(path) != expected:
            raise CorruptFile(f"{folder} is corrupt: {name} does not match its checksum (truncated or altered).")


def _on_ctrl_c(signum, frame) -> None:
    checkpointing = time.monotonic() - _interrupt["polled"] <= POLLING_SECONDS
    if _interrupt["requested"] or not checkpointing:
        raise KeyboardInterrupt
    _interrupt["requested"] = True
    signal.setitimer(signal.ITIMER_REAL, GRACE_SECONDS)
    print("exitrl: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops now)",
          file=sys.stderr, flush=True)


def _on_grace_over(signum, frame) -> None:
    if _interrupt["requested"]:  # the loop did not reach its save in time
        raise KeyboardInterrupt


@contextmanager
def save_on_interrupt() -> Iterator[None]:
    """Within the block, Ctrl-C lets the running training loop save its checkpoint before the KeyboardInterrupt
    (one process only: under torchrun every process gets the signal and they must stop together)."""
    previous = signal.signal(signal.SIGINT, _on_ctrl_c), signal.signal(signal.SIGALRM, _on_grace_over)
    _interrupt.update(requested=False, polled=float("-inf"))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
        _interrupt["requested"] = False


def rng_state() -> dict:
    """Every generator a training loop may draw from: Python's, NumPy's, torch's CPU and (when present) CUDA's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """One training loop's checkpoint file: `due` says when to save, `save` writes it atomically, `load` returns
    the last good one of the same ``work`` (a fingerprint of what is being trained: a corrupt file, or one of other
    work, is reported and ignored, so the work restarts rather than resumes from garbage), `clear` removes it once
    the result is safely saved."""

    def __init__(self, path: str | Path, every_seconds: float = 300.0, work: str | None = None):
        if not every_seconds >= 0:
            raise ValueError(f"checkpoint.every_seconds must be >= 0 (0: after every step), got {every_seconds}.")
        self.path, self.every_seconds, self.work = Path(path), float(every_seconds), work
        self.last = time.monotonic()
        self.seconds_writing = 0.0
        self.saves = 0

    def due(self) -> bool:
        _interrupt["polled"] = time.monotonic()
        return _interrupt["requested"] or time.monotonic() - self.last >= self.every_seconds

    def save(self, state: dict) -> None:
        started = time.monotonic()
        save_checked({**state, "rng": rng_state(), "work": self.work}, self.path)
        self.last = time.monotonic()
        self.seconds_writing += self.last - started
        self.saves += 1
        if _interrupt["requested"]:  # the Ctrl-C this save was for: stop now, with the step kept
            _interrupt["requested"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = load_checked(self.path)
        except CorruptFile as err:
            log.warning("%s; starting this work from the beginning.", err)
            return None
        if state.get("work") != self.work:  # another config's checkpoint (a reused folder): never resumed into this
            log.warning("%s belongs to other work (another config or trace); starting from the beginning.",
                        self.path)
            return None
        log.warning("Resuming from the checkpoint %s", self.path)
        return state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def summary(self) -> dict:
        return {"saves": self.saves, "seconds_writing": round(self.seconds_writing, 3),
                "every_seconds": self.every_seconds}
