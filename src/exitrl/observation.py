"""The observation every env emits and every policy rebuilds at inference: one layout, built by one function.
It sits below both envs and policies, so that neither has to import the other to agree on it.

Layout of the flat float32 vector (D = H + C + 3):
``[pooled state (H) | layer position l/L (1) | exit-head probabilities (C) | max-prob (1) | entropy (1)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURES = ("state", "confidence", "observation")


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ValueError(f"Unknown agent.features {features!r}; valid: {', '.join(FEATURES)}.")
    return features


@dataclass(frozen=True)
class ObservationLayout:
    hidden_size: int
    num_classes: int

    @property
    def size(self) -> int:
        return self.hidden_size + self.num_classes + 3

    @property
    def state(self) -> slice:
        return slice(0, self.hidden_size)

    @property
    def position(self) -> int:
        return self.hidden_size

    @property
    def probs(self) -> slice:
        return slice(self.hidden_size + 1, self.hidden_size + 1 + self.num_classes)

    @property
    def max_prob(self) -> int:
        return self.hidden_size + 1 + self.num_classes

    @property
    def entropy(self) -> int:
        return self.hidden_size + 2 + self.num_classes

    def feature_size(self, features: str) -> int:
        """Width of a feature view: ``observation`` (all), ``state`` (pooled state) or ``confidence`` (the rest)."""
        return {"observation": self.size, "state": self.hidden_size, "confidence": self.size - self.hidden_size}[
            check_features(features)]

    def select(self, obs, features: str):
        """The feature view of observations (torch tensors or numpy arrays, last axis = features)."""
        features = check_features(features)
        if features == "observation":
            return obs
        return obs[..., self.state] if features == "state" else obs[..., self.position:]


def build_observation(states: torch.Tensor, logits: torch.Tensor, layer, num_layers: int) -> torch.Tensor:
    """Observations for states ``[..., H]`` and logits ``[..., C]`` at 1-indexed ``layer`` (int or tensor)."""
    probs = torch.softmax(logits.float(), -1)
    log_probs = torch.log_softmax(logits.float(), -1)
    entropy = -(probs * log_probs).sum(-1, keepdim=True)
    if isinstance(layer, torch.Tensor):
        position = layer.to(device=states.device, dtype=torch.float32) / num_layers
        position = position.expand(states.shape[:-1]).unsqueeze(-1) if position.dim() == 0 else position.unsqueeze(-1)
    else:  # a Python number: no host-to-device copy (which a captured CUDA graph cannot hold)
        position = torch.full((*states.shape[:-1], 1), layer, dtype=torch.float32, device=states.device) / num_layers
    return torch.cat([states.float(), position, probs, probs.max(-1, keepdim=True).values, entropy], -1)


def observation_table(states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Observations for every (example, layer) of a trace split: ``[N, L, D]``."""
    num_layers = logits.shape[1]
    layers = torch.arange(1, num_layers + 1, device=states.device).expand(states.shape[0], num_layers)
    return build_observation(states, logits, layers, num_layers)
