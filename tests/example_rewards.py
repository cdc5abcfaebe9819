"""Worked examples of user rewards, loaded by import path in the tests (reward.fn=example_rewards:...)."""

import torch

from exitrl.rewards import RewardContext


def correct_and_shallow(ctx: RewardContext, bonus: float = 1.0, cost: float = 0.1) -> torch.Tensor:
    """+bonus for a correct exit, minus cost per layer used: a label-aware user reward."""
    return bonus * ctx.correct.float() - cost * ctx.exit_layer.float()


def only_layer_two(ctx: RewardContext) -> torch.Tensor:
    """Pays only for exiting at layer 2, whatever the prediction."""
    return (ctx.exit_layer == 2).float()


def broken_nan(ctx: RewardContext) -> torch.Tensor:
    out = torch.zeros(ctx.exit_layer.shape[0])
    out[::3] = float("nan")
    return out


def raises(ctx: RewardContext) -> torch.Tensor:
    raise KeyError("no such feature")


def squared_cost(ctx: RewardContext, alpha: float = 0.1) -> torch.Tensor:
    """Not linear in α (a cost-conditioned agent must refuse it)."""
    return ctx.correct.float() - alpha ** 2 * ctx.depth("fraction")
