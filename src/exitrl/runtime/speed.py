"""Measured wall-clock speedup: the same rows answered by the runtime with the classifier's exit policy and with the
full model (`exitrl.agents.static.StaticPolicy` at the last layer swapped in), same batches, same batch size.

The layer speedup (L / mean exit layer) is what a policy saves on paper; the wall-clock speedup is what the runtime
turns it into on this device (padding, policy decisions, compactions and host reads all cost time). Both sides run
the rows in the same length-sorted batches, one warm-up batch each first (on a CPU a few of the shortest rows; on
CUDA every batch once, since the fast path captures a graph per bucket the first time it meets it), then batch by
batch in alternating order (full first on even batches, the policy first on odd ones), so that neither side always
runs on a warmer machine. On CUDA the device is synchronized around each timing. A time budget stops the timing
early, at a batch boundary; the batches are then timed in a shuffled (seeded) order, so the rows timed are not only
the shortest ones.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from exitrl.agents.static import StaticPolicy

if TYPE_CHECKING:
    from exitrl.runtime.classifier import EarlyExitClassifier

WARM_UP_ROWS = 8  # the CPU's warm-up batch: the shortest rows (first-call costs do not depend on the batch's size)


@dataclass
class WallClock:
    """One measurement: ``wall_clock_speedup`` = full-model seconds / policy seconds on the same rows, beside the
    policy's ``layer_speedup`` on those rows."""

    wall_clock_speedup: float
    layer_speedup: float
    policy_seconds: float
    full_seconds: float
    examples: int
    batch_size: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """``1.31x against the full model on cpu (256 rows, batch 32)``."""
        return (f"{self.wall_clock_speedup:.2f}x against the full model on {self.device} ({self.examples} rows, "
                f"batch {self.batch_size})")


def spread_rows(n: int, sample: int) -> list[int]:
    """At most ``sample`` row indices spread evenly over ``n`` rows (all rows when ``sample >= n``)."""
    if sample >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(sample - 1, 1)) for i in range(sample)})


def split_texts(texts: list) -> tuple[list[str], list[str] | None]:
    """Single texts, or (text, text) pairs as `EarlyExitClassifier.predict` takes them: first texts, second ones."""
    texts = list(texts)
    if texts and isinstance(texts[0], tuple | list):
        return [t[0] for t in texts], [t[1] for t in texts]
    return texts, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_wall_clock(classifier: EarlyExitClassifier, texts: list, batch_size: int = 32, sample: int = 512,
                       budget_seconds: float | None = None) -> WallClock | None:
    """Time ``classifier``'s policy against the full model on at most ``sample`` of ``texts`` (single texts or
    pairs), evenly spread; None when there is nothing to time. ``budget_seconds``: stop before a batch that would
    take the timed work (both sides) past this, after at least one batch (warm-up not counted); None: every batch.
    The classifier's policy is restored afterwards (an online-adaptive policy, such as FREE's, keeps adapting on the
    timed rows as it would deployed)."""
    if sample < 1 or not texts:
        return None
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    first, second = split_texts(texts)
    rows = spread_rows(len(first), sample)
    first = [first[i] for i in rows]
    second = [second[i] for i in rows] if second is not None else None
    lengths = [len(e["input_ids"]) for e in classifier.encode(first, second)]
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    device, policy = classifier.device, classifier.policy
    full = StaticPolicy(classifier.model.num_layers).to(device)
    exit_layers: list[torch.Tensor] = []

    def run(chosen, batch: list[int]) -> float:
        classifier.policy = chosen
        _sync(device)
        started = time.perf_counter()
        found = classifier.exits([first[i] for i in batch], [second[i] for i in batch] if second is not None else None,
                                 batch_size=batch_size)
        _sync(device)
        if chosen is policy:
            exit_layers.append(found.layers)
        return time.perf_counter() - started

    seconds = {"full": 0.0, "policy": 0.0}
    timed = 0
    try:
        for batch in batches if device.type == "cuda" else [batches[0][:WARM_UP_ROWS]]:  # warm-up, untimed
            run(full, batch)
            run(policy, batch)
        exit_layers.clear()
        if budget_seconds is not None:
            random.Random(0).shuffle(batches)
        for number, batch in enumerate(batches):
            spent = seconds["full"] + seconds["policy"]
            if budget_seconds is not None and number and spent + spent / number > budget_seconds:
                break
            sides = (("full", full), ("policy", policy)) if number % 2 == 0 else (("policy", policy), ("full", full))
            for name, chosen in sides:
                seconds[name] += run(chosen, batch)
            timed += len(batch)
    finally:
        classifier.policy = policy
    mean_exit = float(torch.cat(exit_layers).float().mean())
    speedup = seconds["full"] / max(seconds["policy"], 1e-9)
    if not math.isfinite(speedup):
        return None
    return WallClock(speedup, classifier.model.num_layers / mean_exit, seconds["policy"], seconds["full"],
                     timed, batch_size, str(device))
