"""The rule guard (CPU, small planted traces): a learned agent fitted with it ends, on the rows held back from it,
at least where the best per-layer max-prob rule for the same reward ends; a bad agent is replaced by the rule, a
good one is kept; the pipeline wires it from the config."""

from __future__ import annotations

import pytest
import torch
from test_stopping import planted

from exitrl.agents.inputs import FitInputs
from exitrl.agents.registry import get_agent
from exitrl.agents.rule_guard import guarded_fit
from exitrl.experiments.pipeline import AgentRun
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import Trace

REWARD = RewardSpec("correct", kwargs={"alpha": 0.3, "depth": "fraction"})


def fit(agent: str, options: dict, share: float = 0.3):
    trace, _ = planted(n=900, seed=4)
    spec = get_agent(agent)
    inputs = FitInputs(Trace({"train": trace}), "train", REWARD)
    return guarded_fit(spec, spec.make_options(options), inputs, share, seed=1)


@pytest.mark.parametrize("agent,options", [
    ("reinforce", {"epochs": 2, "batch_size": 64, "features": "confidence"}),
    ("bandit_ucb", {"rounds": 400}),
    ("linucb", {"rounds": 600}),
])
def test_no_guarded_agent_ends_below_the_rule_on_the_rows_held_back(agent, options):
    policy, info = fit(agent, options)
    guard = info["rule_guard"]
    assert guard["guard_rows"] == 270 and guard["fit_rows"] == 630
    kept_reward = guard["agent_reward"] if guard["kept"] == "agent" else guard["rule_reward"]
    assert kept_reward >= guard["rule_reward"]
    assert (policy.name == "confidence_per_layer") == (guard["kept"] == "rule")


def test_a_worse_agent_is_replaced_by_the_rule_and_a_better_one_kept():
    # the static rule at layer 1 loses every fixable row: the guard deploys the per-layer rule instead
    worse, info = fit("static", {"layer": 1})
    assert info["rule_guard"]["kept"] == "rule" and worse.name == "confidence_per_layer"
    assert info["rule_guard"]["agent_minus_rule"] < 0
    # the stopping agent tells the hopeless rows from the fixable ones, which no max-prob threshold can
    better, info = fit("stopping", {"cost_weight": 0.3, "features": "state", "steps": 150})
    assert info["rule_guard"]["kept"] == "agent" and better.name == "stopping"
    assert info["rule_guard"]["agent_minus_rule"] > 0.02


def test_the_pipeline_guards_learned_agents_only_and_refuses_a_bad_share():
    assert AgentRun.create("reinforce", rule_guard=0.25).rule_guard == 0.25
    assert AgentRun.create("confidence", rule_guard=0.25).rule_guard == 0.0  # a rule is not trained
    assert AgentRun.create("reinforce").rule_guard == 0.0
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rule_guard"):
            AgentRun.create("reinforce", rule_guard=bad)
    trace, _ = planted(n=300, seed=5)
    run = AgentRun.create("bandit_ucb", {"rounds": 200}, REWARD, "train", rule_guard=0.3)
    fitted = run.fit(Trace({"train": trace, "dev": planted(n=100, seed=6)[0]}), torch.device("cpu"))
    assert fitted.info["rule_guard"]["guard_rows"] == 90
