"""PABEE's patience rule: exit once the prediction has stayed the same for ``patience`` consecutive layers.

The counter starts at 0 on layer 1; at each later layer it grows by one when the argmax equals the previous
layer's argmax and drops back to 0 otherwise; the row exits when the counter reaches ``patience``. With
patience t the earliest exit is layer t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.policy import ExitPolicy, LayerBatch, Memory


def check_patience(patience: int) -> None:
    if int(patience) < 1:
        raise ValueError(f"patience must be >= 1, got {patience}.")


class PatiencePolicy(ExitPolicy):
    name = "patience"
    graph_safe = True

    def __init__(self, patience: int = 2):
        check_patience(patience)
        self.patience = int(patience)

    def init_memory(self, batch_size: int, device: torch.device) -> Memory:
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device),
                "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device)}

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        prediction = batch.prediction
        same = prediction == memory["previous"]
        memory["count"] = torch.where(same, memory["count"] + 1, torch.zeros_like(memory["count"]))
        memory["previous"] = prediction
        return memory["count"] >= self.patience

    def config(self) -> dict:
        return {"patience": self.patience}


@dataclass
class PatienceConfig:
    patience: int = 2

    def __post_init__(self):
        check_patience(self.patience)


def fit_patience(cfg: PatienceConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    return PatiencePolicy(cfg.patience), {}


AGENT = register(AgentSpec("patience", PatienceConfig, RULE, Knob("agent.patience"), fit_patience,
                           "PABEE: exit once the prediction is unchanged for `patience` consecutive layers"))
