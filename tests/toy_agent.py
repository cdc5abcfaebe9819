"""A toy agent declared in this one file, outside the exitrl package: ``plugins=[toy_agent]`` makes it an
``agent=`` option of ``exitrl.train`` and ``exitrl.sweep`` (test_plugin_agent.py)."""

from __future__ import annotations

from dataclasses import dataclass

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.static import StaticPolicy


@dataclass
class ToyConfig:
    layer: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.layer < 1:
            raise ValueError(f"toy: layer must be >= 1, got {self.layer}.")


def fit_toy(cfg: ToyConfig, inputs: FitInputs) -> tuple[StaticPolicy, dict]:
    """Any ExitPolicy will do; what the test exercises is the declaration path."""
    return StaticPolicy(cfg.layer), {"fitted_on": inputs.learn_on, "rows": len(inputs.learn), "seed": cfg.seed}


AGENT = register(AgentSpec("toy", ToyConfig, RULE, Knob("agent.layer", (1, 2)), fit_toy,
                           "toy rule for the plugin test: exit at a fixed layer"))
