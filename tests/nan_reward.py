"""A custom reward that takes the swept alpha but returns NaN for every third episode (test_interrupt.py)."""

from __future__ import annotations

import torch

from exitrl.rewards import RewardContext


def nan_with_alpha(ctx: RewardContext, alpha: float = 0.1) -> torch.Tensor:
    out = torch.full((ctx.exit_layer.shape[0],), -alpha)
    out[::3] = float("nan")
    return out
