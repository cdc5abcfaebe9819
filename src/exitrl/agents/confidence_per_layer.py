"""The confidence rule with one threshold per layer, fitted on held-out rows: the strongest fixed rule, and the
baseline a learned policy must beat ("beats every rule" includes it).

The thresholds come from `exitrl.calibration.per_layer`: coordinate ascent on mean gain − cost_weight · exit / L, which
on the rows it is fitted on never does worse than one threshold for all layers. It fits on the split learned
agents learn on (``learn_on``: the held-out split when the run has one, else train), so the comparison is even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.confidence import MEASURES
from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.calibration.per_layer import COST_WEIGHT_GRID, GAINS, exit_gains, fit_per_layer_thresholds
from exitrl.core.observation import confidence_measure
from exitrl.policy import ExitPolicy, LayerBatch, Memory


def surety(value: torch.Tensor, measure: str) -> torch.Tensor:
    """A confidence measure's value with higher = surer (entropy negated)."""
    return -value if measure == "entropy" else value


class PerLayerConfidencePolicy(ExitPolicy):
    """Exit at the first layer l where the measure reaches ``thresholds[l − 1]`` (+inf: never at that layer)."""

    name = "confidence_per_layer"
    graph_safe = True

    def __init__(self, thresholds: list[float], measure: str = "maxprob"):
        if measure not in MEASURES:
            raise ValueError(f"Unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}.")
        self.thresholds = [float(t) for t in thresholds]
        self.measure = measure

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return surety(batch.confidence(self.measure), self.measure) >= self.thresholds[batch.layer - 1]

    def config(self) -> dict:
        return {"thresholds": self.thresholds, "measure": self.measure}


@dataclass
class PerLayerConfidenceConfig:
    cost_weight: float = 0.1  # the knob: what one layer (as a fraction L) costs in units of the gain
    measure: str = "maxprob"  # maxprob | entropy | margin
    gain: str = "correct"  # correct (needs labels) | consistency (agrees with the last layer)

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"Unknown agent.measure {self.measure!r}; valid: {', '.join(MEASURES)}.")
        if self.gain not in GAINS:
            raise ValueError(f"Unknown agent.gain {self.gain!r}; valid: {', '.join(GAINS)}.")
        if self.cost_weight < 0:
            raise ValueError(f"agent.cost_weight must be >= 0, got {self.cost_weight}.")


def fit_per_layer_confidence(cfg: PerLayerConfidenceConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    learn = inputs.learn
    scores = surety(confidence_measure(learn.logits, cfg.measure, learn.token), cfg.measure)
    thresholds, objective = fit_per_layer_thresholds(scores, exit_gains(learn.prediction_table(), learn.labels,
                                                                        cfg.gain),
                                                     cfg.cost_weight)
    policy = PerLayerConfidencePolicy(thresholds.tolist(), cfg.measure)
    never = [None if t == float("inf") else t for t in policy.thresholds]  # JSON has no infinity
    return policy, {"thresholds": never, "objective": objective, "fitted_on": inputs.learn_on}


AGENT = register(AgentSpec(
    "confidence_per_layer", PerLayerConfidenceConfig, RULE, Knob("agent.cost_weight", COST_WEIGHT_GRID),
    fit_per_layer_confidence,
    "confidence with one threshold per layer, fitted on the learn split (held-out when present) for a cost weight"))
