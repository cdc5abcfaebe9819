"""Training objectives for the exit heads, as swappable functions of per-layer logits and labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PABEE / ConsistentEE stage 1: sum_l l * CE_l / sum_l l, so deeper heads weigh more."""
    num_layers = logits.shape[1]
    weights = torch.arange(1, num_layers + 1, device=logits.device, dtype=torch.float32)
    per_layer = torch.stack([F.cross_entropy(logits[:, i].float(), labels) for i in range(num_layers)])
    return (weights * per_layer).sum() / weights.sum()


def exit_layer_ce(logits: torch.Tensor, labels: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """ConsistentEE's task loss for co-training: CE of each example only at its (0-based) exit layer."""
    at_exit = logits[torch.arange(logits.shape[0], device=logits.device), exit_layers]
    return F.cross_entropy(at_exit.float(), labels)


OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"weighted_ce": weighted_ce}


def get_objective(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown backbone objective {name!r}; valid: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]
