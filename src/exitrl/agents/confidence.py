"""Confidence rules: exit as soon as the exit head is sure enough, by one of three measures.

* ``maxprob``: max_c p(c) >= threshold (the usual softmax-response rule);
* ``entropy``: H(p) <= threshold, in nats (DeeBERT);
* ``margin``: p(1st) - p(2nd) >= threshold (CALM's softmax-response measure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.calibration.temperature import with_temperatures
from exitrl.policy import ExitPolicy, LayerBatch, Memory

MEASURES = ("maxprob", "entropy", "margin")


def check_threshold(threshold: float, measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"Unknown confidence measure {measure!r}; valid: {', '.join(MEASURES)}.")
    if measure == "entropy" and threshold < 0:
        raise ValueError(f"an entropy threshold is in nats and must be >= 0, got {threshold}.")
    if measure != "entropy" and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"a {measure} threshold must lie in [0, 1], got {threshold}.")


class ConfidencePolicy(ExitPolicy):
    """Exit where the head's ``measure`` passes ``threshold`` (>= for maxprob and margin, <= for entropy)."""

    name = "confidence"
    graph_safe = True

    def __init__(self, threshold: float = 0.9, measure: str = "maxprob"):
        check_threshold(threshold, measure)
        self.threshold = float(threshold)
        self.measure = measure

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        value = batch.confidence(self.measure)
        return value <= self.threshold if self.measure == "entropy" else value >= self.threshold

    def config(self) -> dict:
        return {"threshold": self.threshold, "measure": self.measure}


@dataclass
class ConfidenceConfig:
    threshold: float = 0.9
    measure: str = "maxprob"  # maxprob (>= threshold) | entropy (<= threshold, nats) | margin (top-1 − top-2, >=)
    temperature: bool = False  # per-exit temperature scaling fitted on the held-out split (data.policy_split > 0)

    def __post_init__(self):
        check_threshold(self.threshold, self.measure)


def fit_confidence(cfg: ConfidenceConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    policy = ConfidencePolicy(cfg.threshold, cfg.measure)
    if not cfg.temperature:
        return policy, {}
    return with_temperatures(policy, inputs.require_held_out("agent.temperature=true"))


AGENT = register(AgentSpec(
    "confidence", ConfidenceConfig, RULE,
    Knob("agent.threshold", (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)), fit_confidence,
    "exit when the exit head is sure enough: maxprob >= t, entropy <= t (DeeBERT) or margin >= t (CALM)",
    needs_held_out=lambda cfg: cfg.temperature))
