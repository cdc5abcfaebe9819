"""agent=linucb: the per-layer contextual bandit learns a known optimum, persists, and runs from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_trace
from test_cli import run_cli

from exitrl.agents.inputs import FitInputs
from exitrl.agents.linucb import LinUCBConfig, train_linucb
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.rewards import RewardSpec


def test_linucb_learns_which_rows_to_exit_early(tmp_path):
    """Easy rows (state feature 0 high) are right at every layer, hard ones only at the last: with a per-layer
    cost of 0.3 the best policy exits easy rows at layer 1 and keeps hard rows to layer 4."""
    train, _ = synthetic_trace(n=3000, seed=0)
    dev, easy = synthetic_trace(n=1000, seed=1)
    policy, info = train_linucb(LinUCBConfig(rounds=20_000, features="state"), FitInputs.from_splits(
        train, dev, reward=RewardSpec("vanilla", kwargs={"alpha": 0.3})))
    exit_layers, _ = run_policy(policy, dev)
    assert (exit_layers[easy] == 1).float().mean() > 0.9 and (exit_layers[~easy] == 4).float().mean() > 0.9
    assert info["history"][-1]["accuracy"] > 0.95 and info["updates"] == 20_000
    first, last = info["history"][0], info["history"][-1]
    assert last["round"] == 20_000 and first["round"] < last["round"]
    policy.save(tmp_path / "linucb.pt")
    assert torch.equal(run_policy(load_policy(tmp_path / "linucb.pt"), dev)[0], exit_layers)


def test_linucb_cannot_tell_rows_apart_without_the_informative_features():
    """The same trace seen through confidence features only (every head equally sure): no row is
    distinguishable, so the bandit must settle on one action for all and cannot reach the optimum."""
    train, _ = synthetic_trace(n=3000, seed=0)
    dev, easy = synthetic_trace(n=1000, seed=1)
    policy, _ = train_linucb(LinUCBConfig(rounds=10_000, features="confidence"), FitInputs.from_splits(
        train, reward=RewardSpec("vanilla", kwargs={"alpha": 0.3})))
    exit_layers, _ = run_policy(policy, dev)
    assert exit_layers[easy].float().mean().item() == pytest.approx(exit_layers[~easy].float().mean().item(), abs=0.3)


def test_cli_linucb(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=linucb", "agent.rounds=2000", f"backbone.name={tiny_bert}", "backbone.package=null",
                  "env=rte", f"data.dir={glue_dir}", "data.limit.train=64", "data.limit.dev=32",
                  "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"linucb", "confidence"} and metrics["agent_info"]["updates"] == 2000
    assert load_policy(tmp_path / "run" / "policy.pt").name == "linucb"
    bad = run_cli(tmp_path / "bad", "agent=linucb", "+agent.bogus=2", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}")
    assert bad.returncode == 2 and "agent linucb has no option 'bogus'" in bad.stderr
    assert not (tmp_path / "bad" / "cache").exists()  # refused before any fine-tuning
