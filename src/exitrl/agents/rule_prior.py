"""Starting an RL agent at the best rule it contains, so training moves away from the rule only where it pays.

Every exit policy an RL agent can represent includes the per-layer max-prob rule, yet trained from scratch on
honest states REINFORCE and the PPOs have ended far below it (every row out at layer 1). With ``agent.start=rule``
the agent's exit logit at layer l is

    logit_l(x) = sharpness · (max-prob_l(x) − τ_l) + residual_l(x),

where τ are the per-layer thresholds that earn the most of the run's own reward on the learn split (exact
coordinate ascent, `exitrl.calibration.per_layer`) and the residual network's last layer starts at zero. So the
untrained agent *is* the rule (its greedy decision, logit > 0, is max-prob ≥ τ_l), and the policy gradient only
moves it where the reward says so. `exitrl.agents.rule_guard` then keeps the agent only if it earns more than the
rule on rows neither saw.

An agent whose network we do not own (SB3's PPO) starts from the rule by behaviour cloning instead: its actor is
fitted to the rule's decisions before PPO begins (`clone_rule`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from exitrl.calibration.per_layer import fit_per_layer_thresholds
from exitrl.core.observation import ObservationLayout
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace

STARTS = ("scratch", "rule")
SHARPNESS = 2.0  # logit per unit of max-prob: gentle, so a start at the rule still explores both actions
NEVER = 1.05  # just out of max-prob's reach (τ = +inf: never exit there), near enough to keep exploring
TIE = 1e-6  # the rule exits at max-prob == τ; the logit must be > 0 there too


def check_start(start: str) -> str:
    if start not in STARTS:
        raise ValueError(f"Unknown agent.start {start!r}; valid: {', '.join(STARTS)}.")
    return start


def max_prob_table(split: SplitTrace) -> torch.Tensor:
    """Each row's max-prob at every layer ``[N, L]``, as the rule reads it (a token trace's top-1)."""
    layout = ObservationLayout(split.hidden_size, split.num_classes)
    return split.observations()[..., layout.max_prob]


def fit_rule(split: SplitTrace, reward: RewardSpec) -> tuple[list[float], float]:
    """The per-layer max-prob thresholds that earn the most mean ``reward`` on ``split`` (+inf: never exit
    there; the last is never read), and that mean reward."""
    thresholds, value = fit_per_layer_thresholds(max_prob_table(split), split.reward_table(reward), 0.0)
    return thresholds.tolist(), float(value)


def thresholds_to_json(thresholds: Sequence[float]) -> list[float | None]:
    return [None if t == float("inf") else float(t) for t in thresholds]


def thresholds_from_json(thresholds: Sequence[float | None]) -> list[float]:
    return [float("inf") if t is None else float(t) for t in thresholds]


class RulePrior(nn.Module):
    """The rule as an exit logit: ``sharpness · (max_prob − τ_l + TIE)``; +inf thresholds become unreachable."""

    def __init__(self, thresholds: Sequence[float | None], sharpness: float = SHARPNESS):
        super().__init__()
        finite = [NEVER if t is None or t == float("inf") else float(t) for t in thresholds]
        self.register_buffer("thresholds", torch.tensor(finite, dtype=torch.float32))
        self.sharpness = float(sharpness)

    def forward(self, max_prob: torch.Tensor, layer: int | torch.Tensor) -> torch.Tensor:
        """Exit logits ``[B]`` at 0-based ``layer`` (one for all rows, or one per row)."""
        return self.sharpness * (max_prob.float() - self.thresholds[layer] + TIE)


def zero_last_linear(module: nn.Module) -> None:
    """Zero the last `nn.Linear` of ``module`` so its output starts at 0 (a residual that starts as nothing)."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def clone_rule(exit_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], parameters, features: torch.Tensor,
               layers: torch.Tensor, max_prob: torch.Tensor, thresholds: Sequence[float], steps: int = 300,
               lr: float = 3e-3) -> float:
    """Behaviour cloning: fit ``exit_logits(features, layers)`` to the rule's exit decisions (max-prob ≥ τ at the
    row's layer) by cross-entropy with full-batch Adam; returns the share of decisions the fitted net agrees on."""
    finite = torch.tensor([NEVER if t == float("inf") else t for t in thresholds], device=max_prob.device)
    target = (max_prob >= finite[layers]).float()
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(int(steps)):
        loss = nn.functional.binary_cross_entropy_with_logits(exit_logits(features, layers), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((exit_logits(features, layers) > 0).float() == target).float().mean())
