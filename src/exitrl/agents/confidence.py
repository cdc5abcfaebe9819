"""Confidence baseline: exit as soon as the exit head is sure enough (max-prob >= threshold)."""

from __future__ import annotations

import torch

from exitrl.policy import ExitPolicy, LayerBatch, Memory


class ConfidencePolicy(ExitPolicy):
    """Exit where the head's max softmax probability reaches ``threshold``."""

    name = "confidence"

    def __init__(self, threshold: float = 0.9):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must lie in [0, 1], got {threshold}.")
        self.threshold = float(threshold)

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return batch.probs.max(-1).values >= self.threshold

    def config(self) -> dict:
        return {"threshold": self.threshold}
