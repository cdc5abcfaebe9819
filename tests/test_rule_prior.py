"""RL agents started at the rule (CPU, small planted traces): before training they decide exactly as the best
per-layer max-prob rule for their reward; trained, they move past it where the reward pays; guarded, none ends
below the very rule it started from on rows neither saw; a started policy saves and loads."""

from __future__ import annotations

import pytest
import torch
from test_stopping import planted

from exitrl.agents.confidence_per_layer import PerLayerConfidencePolicy
from exitrl.agents.inputs import FitInputs
from exitrl.agents.registry import get_agent
from exitrl.agents.rule_guard import guarded_fit, mean_reward
from exitrl.agents.rule_prior import RulePrior, fit_rule, thresholds_to_json
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import Trace

REWARD = RewardSpec("correct", kwargs={"alpha": 0.3, "depth": "fraction"})
TORCHRL = {"total_frames": 8192, "num_envs": 256, "frames_per_batch": 4096, "minibatch_size": 1024}
UNMOVED = {  # lr so small that training leaves the start where it was: the policy *is* its start
    "reinforce": {"epochs": 1, "batch_size": 64, "lr": 1e-9, "start": "rule"},
    "ppo_torchrl": {**TORCHRL, "lr": 1e-9, "start": "rule"},
    "ppo": {"total_timesteps": 512, "n_envs": 2, "n_steps": 128, "batch_size": 128, "lr": 1e-9,
            "features": "confidence", "start": "rule"},
}


def fit(agent: str, options: dict, trace):
    spec = get_agent(agent)
    return spec.fit(spec.make_options(options), FitInputs(Trace({"train": trace}), "train", REWARD))


def same_exits(policy, rule, split) -> float:
    return float((run_policy(policy, split)[0] == run_policy(rule, split)[0]).float().mean())


@pytest.mark.parametrize("agent", ["reinforce", "ppo_torchrl", "ppo"])
def test_before_training_a_started_agent_decides_as_the_rule(agent):
    train, _ = planted(n=600, seed=4)
    test, _ = planted(n=600, seed=7)
    thresholds, _ = fit_rule(train, REWARD)
    rule = PerLayerConfidencePolicy(thresholds)
    assert thresholds[0] < 1.0 and thresholds[1] == float("inf")  # the planted rule exits sure rows at layer 1 only
    policy, info = fit(agent, UNMOVED[agent], train)
    assert info["rule"]["thresholds"] == thresholds_to_json(thresholds)
    if agent == "ppo":  # SB3's actor is cloned, not a residual: near, not exact
        assert info["rule"]["clone_agreement"] > 0.97 and same_exits(policy, rule, test) > 0.97
    else:
        assert same_exits(policy, rule, test) == 1.0


def test_the_prior_is_the_rule_at_its_thresholds_and_unreachable_where_the_rule_never_exits():
    prior = RulePrior([0.8, None, float("inf")])
    max_prob = torch.tensor([0.79, 0.8, 1.0])
    assert (prior(max_prob, 0) > 0).tolist() == [False, True, True]  # the rule exits at max-prob == τ too
    assert (prior(max_prob, 1) > 0).tolist() == [False, False, False]
    assert (prior(max_prob, torch.tensor([0, 0, 2])) > 0).tolist() == [False, True, False]


def test_started_at_the_rule_ppo_moves_past_it_where_the_reward_pays():
    # hopeless rows look as unsure as fixable ones: the rule sends both on; a learner reading the state exits the
    # hopeless ones at layer 1
    train, _ = planted(n=900, seed=4)
    test, _ = planted(n=900, seed=7)
    rule = PerLayerConfidencePolicy(fit_rule(train, REWARD)[0])
    policy, _ = fit("ppo_torchrl", {**TORCHRL, "total_frames": 81920, "lr": 3e-3, "start": "rule"}, train)
    rewards = test.reward_table(REWARD)
    assert mean_reward(policy, test, rewards) > mean_reward(rule, test, rewards) + 0.03


@pytest.mark.parametrize("agent,options", [
    ("reinforce", {"epochs": 3, "batch_size": 64, "lr": 3e-3, "start": "rule"}),
    ("ppo_torchrl", {**TORCHRL, "lr": 3e-3, "start": "rule"}),
    ("ppo", {"total_timesteps": 2048, "n_envs": 2, "n_steps": 256, "batch_size": 256, "start": "rule"}),
])
def test_no_started_and_guarded_agent_ends_below_the_rule_it_started_from(agent, options):
    trace, _ = planted(n=900, seed=4)
    spec = get_agent(agent)
    inputs = FitInputs(Trace({"train": trace}), "train", REWARD)
    policy, info = guarded_fit(spec, spec.make_options(options), inputs, 0.3, seed=1)
    guard = info["rule_guard"]
    assert guard["rule_thresholds"] == info["rule"]["thresholds"]  # the guard's rule is the agent's start
    kept = guard["agent_reward"] if guard["kept"] == "agent" else guard["rule_reward"]
    assert kept >= guard["rule_reward"]


@pytest.mark.parametrize("agent", ["reinforce", "ppo_torchrl"])
def test_a_started_policy_saves_and_loads_with_its_rule(agent, tmp_path):
    train, _ = planted(n=300, seed=4)
    policy, _ = fit(agent, {**UNMOVED[agent], "lr": 3e-3}, train)
    policy.save(tmp_path / "policy.pt")
    loaded = load_policy(tmp_path / "policy.pt")
    assert loaded.config()["rule_thresholds"] == policy.config()["rule_thresholds"]
    assert same_exits(loaded, policy, train) == 1.0


def test_an_unknown_start_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="agent.start"):
        get_agent("reinforce").make_options({"start": "rules"})
