"""Per-feature standardisation that agents fit on their training features: ``(x − mean) / std``, with a floor on
the std so that near-constant features stay bounded. The owner keeps ``mean`` and ``std`` as buffers, so they are
saved and loaded with its state."""

from __future__ import annotations

import torch

STD_FLOOR = 1e-2


@torch.no_grad()
def fit_standardizer(owner: torch.nn.Module, features: torch.Tensor) -> None:
    """Set ``owner.mean`` and ``owner.std`` from ``features`` over its first dimension (examples)."""
    features = features.float()
    owner.mean.copy_(features.mean(0).to(owner.mean.device))
    owner.std.copy_(features.std(0).clamp_min(STD_FLOOR).to(owner.std.device))
