"""Confidence rules: exit as soon as the exit head is sure enough, by one of three measures.

* ``maxprob``: max_c p(c) >= threshold (the usual softmax-response rule);
* ``entropy``: H(p) <= threshold, in nats (DeeBERT);
* ``margin``: p(1st) - p(2nd) >= threshold (CALM's softmax-response measure).
"""

from __future__ import annotations

import torch

from exitrl.policy import ExitPolicy, LayerBatch, Memory

MEASURES = ("maxprob", "entropy", "margin")


def confidence_measure(probs: torch.Tensor, measure: str) -> torch.Tensor:
    """The measure of each row of ``probs [B, C]``: higher is surer, except entropy (lower is surer)."""
    if measure == "maxprob":
        return probs.max(-1).values
    if measure == "margin":
        top2 = probs.topk(2, -1).values
        return top2[:, 0] - top2[:, 1]
    if measure == "entropy":
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    raise ValueError(f"Unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}.")


class ConfidencePolicy(ExitPolicy):
    """Exit where the head's ``measure`` passes ``threshold`` (>= for maxprob and margin, <= for entropy)."""

    name = "confidence"

    def __init__(self, threshold: float = 0.9, measure: str = "maxprob"):
        if measure not in MEASURES:
            raise ValueError(f"Unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}.")
        if measure == "entropy" and threshold < 0:
            raise ValueError(f"an entropy threshold is in nats and must be >= 0, got {threshold}.")
        if measure != "entropy" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a {measure} threshold must lie in [0, 1], got {threshold}.")
        self.threshold = float(threshold)
        self.measure = measure

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        value = confidence_measure(batch.probs, self.measure)
        return value <= self.threshold if self.measure == "entropy" else value >= self.threshold

    def config(self) -> dict:
        return {"threshold": self.threshold, "measure": self.measure}
