"""Threshold bandits find the best threshold of a trace built so that the best arms are known."""

from __future__ import annotations

import pytest
import torch

from exitrl.agents.inputs import FitInputs
from exitrl.agents.threshold_bandit import BanditConfig, exits_per_threshold, train_threshold_bandit
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace


def _two_kinds(n: int = 2000, seed: int = 0) -> SplitTrace:
    """Easy rows: layer 1 right at p = 0.97. Hard rows: layer 1 wrong at p = 0.70, layers 2-3 right at 0.97.
    Under the vanilla reward with alpha = 0.1, any threshold in (0.70, 0.97] is best: easy rows exit at 1,
    hard ones wait for layer 2."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    easy = torch.rand(n, generator=g) < 0.5
    sure, unsure = torch.log(torch.tensor(0.97 / 0.03)), torch.log(torch.tensor(0.70 / 0.30))
    sign = torch.where(labels == 1, 1.0, -1.0)
    logits = torch.zeros(n, 3, 2)
    logits[:, 0, 1] = torch.where(easy, sure * sign, -unsure * sign)
    logits[:, 1:, 1] = (sure * sign)[:, None]
    return SplitTrace.from_logits(torch.zeros(n, 3, 4), logits, labels)


def test_exits_per_threshold_by_hand():
    trace = _two_kinds(4)
    exits = exits_per_threshold(trace, torch.tensor([0.5, 0.8, 0.99]))
    assert exits[:, 0].tolist() == [0, 0, 0, 0]  # every first head passes 0.5
    assert exits[:, 2].tolist() == [2, 2, 2, 2]  # nothing reaches 0.99 before the forced last layer


@pytest.mark.parametrize("rule", ["ucb", "thompson"])
def test_bandit_learns_a_best_threshold(rule):
    train, dev = _two_kinds(2000, 0), _two_kinds(500, 1)
    cfg = BanditConfig(rule=rule, thresholds=[0.5, 0.6, 0.8, 0.9, 0.99], rounds=6000, ucb_c=0.3)
    policy, info = train_threshold_bandit(cfg, FitInputs.from_splits(
        train, dev, reward=RewardSpec("vanilla", kwargs={"alpha": 0.1})))
    assert info["threshold"] in (0.8, 0.9) and info["best_arm_in_hindsight"] in (0.8, 0.9)
    dev_metrics = info["history"][-1]
    assert dev_metrics["accuracy"] == 1.0 and 1.3 < dev_metrics["avg_exit_layer"] < 1.7
    pulls = dict(zip(cfg.thresholds, info["arm_counts"]))
    assert pulls[0.8] + pulls[0.9] > 0.7 * cfg.rounds  # it spent most rounds on the best arms


def test_bandit_runs_on_a_label_free_reward():
    train = _two_kinds(500)
    hidden_labels = SplitTrace(train.states, train.logits, torch.zeros_like(train.labels), train.memorized)
    policy, info = train_threshold_bandit(BanditConfig(rule="thompson", rounds=2000), FitInputs.from_splits(
        hidden_labels, reward=RewardSpec("confidence", kwargs={"alpha": 0.01})))
    assert 0.5 <= policy.threshold <= 0.99 and sum(info["arm_counts"]) == 2000
    with pytest.raises(ValueError, match="ucb, thompson"):
        train_threshold_bandit(BanditConfig(rule="epsilon"), FitInputs.from_splits(train))


def test_cli_bandit_with_label_free_reward(tiny_bert, glue_dir, tmp_path):
    import json

    from test_cli import run_cli

    out = run_cli(tmp_path, "agent=bandit_thompson", "agent.rounds=3000", "reward=confidence",
                  f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                  "data.limit.train=64", "data.limit.dev=32", "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["agent_info"]["threshold"] in metrics["agent_info"]["config"]["thresholds"]
    assert set(metrics["results"]) == {"bandit_thompson", "confidence"} and metrics["reward"]["name"] == "confidence"
