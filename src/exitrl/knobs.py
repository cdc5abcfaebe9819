"""Each policy family's trade-off knob and its default grid, for sweeps: the one setting that moves a family along
its accuracy / speedup curve (the reward's α for learned agents, the rule's threshold, patience, layer or δ)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    key: str  # "reward.alpha" or "agent.<option>"
    grid: tuple | None  # None: the model's layers (static: 1..L; patience, FREE's shallow layer: 1..L-1)

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def option(self) -> str:
        return self.key.split(".", 1)[1]

    def values(self, num_layers: int, override: list | None = None) -> list:
        if override:
            return list(override)
        if self.grid is not None:
            return list(self.grid)
        top = num_layers if self.option == "layer" else num_layers - 1
        return list(range(1, top + 1))


ALPHA = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # decades apart: the right scale differs by task
KNOBS: dict[str, Knob] = {
    "reinforce": Knob("reward.alpha", ALPHA),
    "ppo": Knob("reward.alpha", ALPHA),
    "ppo_torchrl": Knob("reward.alpha", ALPHA),
    "bandit_ucb": Knob("reward.alpha", ALPHA),
    "bandit_thompson": Knob("reward.alpha", ALPHA),
    "linucb": Knob("reward.alpha", ALPHA),
    "confidence": Knob("agent.threshold", (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)),
    "static": Knob("agent.layer", None),
    "patience": Knob("agent.patience", None),
    "calm": Knob("agent.delta", (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)),
    "free": Knob("agent.shallow_layer", None),  # 1..L-1; zeta barely moves the 10-point threshold grid
    "lte": Knob("agent.threshold", (0.1, 0.2, 0.3, 0.4, 0.5)),
    "oracle": Knob("agent.kind", ("consistency", "correctness")),
}
