"""A rule that records the CPU thread count it was fitted on (``plugins=[threads_agent]``; test_threads.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.static import StaticPolicy


@dataclass
class ProbeConfig:
    layer: int = 1
    seed: int = 0


def fit_probe(cfg: ProbeConfig, inputs: FitInputs) -> tuple[StaticPolicy, dict]:
    return StaticPolicy(cfg.layer), {"threads": torch.get_num_threads()}


AGENT = register(AgentSpec("threads_probe", ProbeConfig, RULE, Knob("agent.layer", (1, 2)), fit_probe,
                           "records the thread count it was fitted on"))
