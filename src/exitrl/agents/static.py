"""Static exit: every example leaves at the same layer k (a truncated model; the floor any policy must beat)."""

from __future__ import annotations

import torch

from exitrl.policy import ExitPolicy, LayerBatch, Memory


class StaticPolicy(ExitPolicy):
    """Exit every row at 1-indexed ``layer`` (or at the last layer when the model is shallower)."""

    name = "static"

    def __init__(self, layer: int = 3):
        if int(layer) < 1:
            raise ValueError(f"static exit layer must be >= 1 (1-indexed), got {layer}.")
        self.layer = int(layer)

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return torch.full((batch.logits.shape[0],), batch.layer >= self.layer, device=batch.logits.device)

    def config(self) -> dict:
        return {"layer": self.layer}
