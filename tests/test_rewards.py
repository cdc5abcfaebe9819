"""Rewards against hand-computed values, user rewards by import path, and bad rewards stopped early."""

from __future__ import annotations

import math

import pytest
import torch

from exitrl.rewards import (
    RewardContext,
    RewardError,
    call_reward,
    hardness,
    resolve_reward,
    reward_table,
    vanilla,
)


def _ctx():
    log_probs = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]]))
    return RewardContext(exit_layer=torch.tensor([1, 3, 6]), num_layers=6, log_probs=log_probs,
                         label=torch.tensor([0, 0, 1]), memorized_layer=torch.tensor([2, 6, 3]))


def test_vanilla_and_hardness_by_hand():
    ctx = _ctx()
    alpha = 0.05
    expected_vanilla = [math.log(0.8) - 0.05 * 1, math.log(0.3) - 0.05 * 3, math.log(0.5) - 0.05 * 6]
    torch.testing.assert_close(vanilla(ctx, alpha=alpha), torch.tensor(expected_vanilla))
    expected_hard = [math.log(0.8) - 0.05 * 1 * (1 - 2 / 6), math.log(0.3) - 0.05 * 3 * 0.0,
                     math.log(0.5) - 0.05 * 6 * (1 - 3 / 6)]
    torch.testing.assert_close(hardness(ctx, alpha=alpha), torch.tensor(expected_hard))
    expected_fraction = [math.log(0.8) - 0.05 * (1 / 6) * (2 / 3), math.log(0.3), math.log(0.5) - 0.05 * 1 * 0.5]
    torch.testing.assert_close(hardness(ctx, alpha=alpha, depth="fraction"), torch.tensor(expected_fraction))
    with pytest.raises(ValueError, match="depth"):
        vanilla(ctx, depth="meters")


def test_the_correct_reward_pays_one_for_a_right_exit_minus_the_cost():
    from exitrl.rewards import correct

    ctx = _ctx()  # predictions 0, 1, 0 (a tie) against labels 0, 0, 1
    torch.testing.assert_close(correct(ctx, alpha=0.05), torch.tensor([1 - 0.05, 0 - 0.15, 0 - 0.3]))
    torch.testing.assert_close(correct(ctx, alpha=0.6, depth="fraction"), torch.tensor([1 - 0.1, -0.3, -0.6]))


def test_user_reward_by_import_path():
    fn = resolve_reward(fn="example_rewards:correct_and_shallow")
    out = call_reward(fn, _ctx(), {"bonus": 2.0, "cost": 0.5})
    torch.testing.assert_close(out, torch.tensor([2.0 - 0.5, -1.5, 0.0 - 3.0]))  # row 3: 0.5/0.5 argmax=0 != 1


def test_reward_table_covers_every_exit_layer():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    table = reward_table(vanilla, logits, torch.tensor([1]), torch.tensor([2]), {"alpha": 0.1})
    expected = torch.log_softmax(logits[0], -1)[:, 1] - 0.1 * torch.tensor([1.0, 2.0])
    torch.testing.assert_close(table[0], expected)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("example_rewards:broken_nan", "non-finite"),
        ("example_rewards:raises", "raised KeyError"),
        ("example_rewards:nope", "no callable"),
        ("no_such_module:fn", "cannot import"),
        ("missing_colon", "import path"),
    ],
)
def test_bad_rewards_fail_clearly(path, match):
    with pytest.raises(RewardError, match=match):
        call_reward(resolve_reward(fn=path), _ctx())


def test_wrong_shape_and_unknown_name():
    with pytest.raises(RewardError, match="shape"):
        call_reward(lambda ctx: torch.zeros(2, 2), _ctx())
    with pytest.raises(RewardError, match="returned NoneType"):
        call_reward(lambda ctx: None, _ctx())
    with pytest.raises(RewardError, match="valid: vanilla, hardness, confidence"):
        resolve_reward("fancy")
