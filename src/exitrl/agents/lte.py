"""BERxiT's learn-to-exit unit (Xin et al., EACL 2021): one linear unit shared by every layer estimates how likely
that layer's exit head is wrong, u_l = sigmoid(w·h_l + b), regressed (MSE) onto 1 − 1[head l correct]; inference
exits at the first layer with u_l < τ. Unlike confidence rules it reads the hidden state, so it can tell a confident
but wrong head from a confident right one when the state shows it.

Here it is fitted on a frozen trace (the held-out split when there is one: on training examples the early heads are
right more often than on new ones, which would teach the unit to exit too early).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.standardize import fit_standardizer
from exitrl.core.progress import progress
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy


class ExitUnit(nn.Module):
    """u = sigmoid(w·standardise(h) + b), one for all layers."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear((states.float() - self.mean) / self.std)).squeeze(-1)


class LearnToExitPolicy(ModuleExitPolicy):
    name = "lte"
    graph_safe = True

    def __init__(self, hidden_size: int, threshold: float = 0.3):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the learn-to-exit threshold must lie in [0, 1], got {threshold}.")
        self.hidden_size, self.threshold = hidden_size, float(threshold)
        self.unit = ExitUnit(hidden_size)
        self.module = self.unit

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return self.unit(batch.states) < self.threshold

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "threshold": self.threshold}


@dataclass
class LteConfig:
    threshold: float = 0.3  # exit when the predicted error u_l is below this
    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 2048
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the learn-to-exit threshold must lie in [0, 1], got {self.threshold}.")


def fit_lte(cfg: LteConfig, inputs: FitInputs) -> tuple[LearnToExitPolicy, dict]:
    """MSE of u_l onto 1 − 1[head l correct], over every (example, layer) of the learning split."""
    split, device = inputs.learn, inputs.device
    policy = LearnToExitPolicy(split.hidden_size, cfg.threshold).to(device)
    unit = policy.unit
    states = split.states.reshape(-1, split.hidden_size)
    wrong = (split.prediction_table() != split.labels[:, None]).reshape(-1).float()
    fit_standardizer(unit, states)
    optimizer = torch.optim.Adam(unit.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(0.0)
    bar = progress(total=cfg.epochs * -(-wrong.numel() // cfg.batch_size), desc="lte", unit="batch")
    for _ in range(cfg.epochs):
        for index in torch.randperm(wrong.numel(), generator=generator).split(cfg.batch_size):
            index = index.to(states.device)
            loss = F.mse_loss(unit(states[index].to(device)), wrong[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
    bar.close()
    unit.eval()
    return policy.to(torch.device("cpu")), {"final_mse": float(loss.detach()), "error_rate": float(wrong.mean())}


AGENT = register(AgentSpec(
    "lte", LteConfig, RULE, Knob("agent.threshold", (0.1, 0.2, 0.3, 0.4, 0.5)), fit_lte,
    "BERxiT learn-to-exit: one linear unit for all layers regresses 'head l is wrong'; exit below the threshold"))
