"""Cost-conditioned learning: one fitted policy for the whole accuracy / speed trade-off.

A reward of the form gain − α·cost (every built-in: ``correct``, ``consistency``, ``confidence``, ``vanilla``,
``hardness``) is linear in α, so its table splits into a gain table and a cost table once: R_α = G − α·C. An agent
conditioned on α draws it per example from ``agent.train_costs``, reads it as one more input, and is paid
G − α·C; deployed, it decides at one α (its ``cost_weight``, which can be moved without refitting, so a sweep of
α is one fit). Why: one policy per α trains the same network many times and its curve is not monotone in α.
"""

from __future__ import annotations

import dataclasses

import torch

from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace

LINEARITY_TOLERANCE = 1e-4


def check_costs(costs: list[float], key: str = "agent.train_costs") -> list[float]:
    values = sorted({float(c) for c in costs})
    if any(not c >= 0 or c != c for c in values):
        raise ValueError(f"{key} must be numbers >= 0, got {costs}.")
    return values


def gain_and_cost(split: SplitTrace, reward: RewardSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, C)``, each ``[N, L]``, with ``reward`` at α equal to G − α·C for every α; fails, naming the reward,
    when it has no ``alpha`` or is not linear in it (checked at α = 0.5)."""

    def at(alpha: float) -> torch.Tensor:
        return split.reward_table(dataclasses.replace(reward, kwargs={**reward.kwargs, "alpha": alpha})).double()

    try:
        gain, at_one, half = at(0.0), at(1.0), at(0.5)
    except Exception as err:  # noqa: BLE001 - any failure here means the reward takes no usable alpha
        raise ValueError(f"agent.train_costs needs a reward with an `alpha` keyword; reward {reward.label!r} "
                         f"failed with alpha set: {err}") from err
    cost = gain - at_one
    worst = float((half - (gain - 0.5 * cost)).abs().max())
    if worst > LINEARITY_TOLERANCE:
        raise ValueError(f"agent.train_costs needs a reward linear in alpha (gain − alpha·cost); reward "
                         f"{reward.label!r} is off by {worst:.3g} at alpha=0.5. Use one of the built-ins, or train one "
                         "policy per alpha (agent.train_costs=[]).")
    return gain.float(), cost.float()
