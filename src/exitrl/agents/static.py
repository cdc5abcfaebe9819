"""Static exit: every example leaves at the same layer k (a truncated model; the floor any policy must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.policy import ExitPolicy, LayerBatch, Memory


def check_layer(layer: int) -> None:
    if int(layer) < 1:
        raise ValueError(f"static exit layer must be >= 1 (1-indexed), got {layer}.")


class StaticPolicy(ExitPolicy):
    """Exit every row at 1-indexed ``layer`` (or at the last layer when the model is shallower)."""

    name = "static"
    graph_safe = True

    def __init__(self, layer: int = 3):
        check_layer(layer)
        self.layer = int(layer)
        self.first_exit_layer = self.layer

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return torch.full((batch.logits.shape[0],), batch.layer >= self.layer, device=batch.logits.device)

    def config(self) -> dict:
        return {"layer": self.layer}


@dataclass
class StaticConfig:
    layer: int = 3  # 1-indexed

    def __post_init__(self):
        check_layer(self.layer)


def fit_static(cfg: StaticConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    return StaticPolicy(cfg.layer), {}


AGENT = register(AgentSpec("static", StaticConfig, RULE, Knob("agent.layer"), fit_static,
                           "every example exits at the same layer"))
