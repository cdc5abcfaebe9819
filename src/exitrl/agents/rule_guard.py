"""A learned agent that cannot end below the rule it contains, on rows neither saw.

Every exit policy an RL agent can learn includes the per-layer max-prob rule (one threshold per layer), yet on
honest states REINFORCE, the PPOs and the bandits have ended far below it (every row out at layer 1). The guard
makes "at least the rule" a property of the fitting, for any agent and any reward:

1. the learn split is cut by a seeded permutation into a part to fit on and a guard part (``share`` of the rows);
2. the agent trains on the first part; the best per-layer max-prob rule *for the same reward* (thresholds by exact
   coordinate ascent on the reward table, `exitrl.agents.rule_prior.fit_rule`) is fitted on the same rows: the
   very rule an agent with ``agent.start=rule`` starts from;
3. on the guard rows, the mean reward of the agent's exits is compared with the rule's; the one that earns more is
   deployed, and the record says by how much and which.

So on held-out rows the guarded agent never ends below the rule it started from; what it costs is the guard's rows,
which the agent does not train on.
"""

from __future__ import annotations

import dataclasses

import torch

from exitrl.agents.confidence_per_layer import PerLayerConfidencePolicy
from exitrl.agents.declaration import AgentSpec
from exitrl.agents.inputs import FitInputs
from exitrl.agents.rule_prior import fit_rule
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import ExitPolicy
from exitrl.traces.trace import SplitTrace, Trace


def check_share(share: float) -> float:
    if not 0.0 < float(share) < 1.0:
        raise ValueError(f"rule_guard must be a share of the learn rows in (0, 1) (0 turns the guard off), got "
                         f"{share}.")
    return float(share)


def mean_reward(policy: ExitPolicy, split: SplitTrace, rewards: torch.Tensor) -> float:
    """Mean of ``rewards [N, L]`` at the layers ``policy`` exits ``split``'s rows."""
    layers, _ = run_policy(policy, split)
    return float(rewards[torch.arange(len(split)), layers.to(rewards.device) - 1].mean())


def guarded_fit(spec: AgentSpec, options, inputs: FitInputs, share: float,
                seed: int = 0) -> tuple[ExitPolicy, dict]:
    """``spec.fit`` on all but ``share`` of the learn rows, then the agent or the best per-layer max-prob rule
    (whichever earns more of ``inputs.reward`` on the held-back rows). Returns the policy and the agent's record
    with a ``rule_guard`` entry."""
    share = check_share(share)
    learn = inputs.learn
    n = len(learn)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(share * n)))
    if n - held < 2:
        raise ValueError(f"rule_guard={share} leaves {n - held} of {n} learn rows to fit on; lower it or give the "
                         "agent more rows.")
    fit_rows, guard_rows = order[held:].sort().values, order[:held].sort().values
    fit_split, guard_split = learn.select(fit_rows), learn.select(guard_rows)
    splits = dict(inputs.trace.splits)
    splits[inputs.learn_on] = fit_split
    fit_inputs = dataclasses.replace(inputs, trace=Trace(splits, inputs.trace.meta))
    policy, info = spec.fit(options, fit_inputs)
    rule = PerLayerConfidencePolicy(fit_rule(fit_split, inputs.reward)[0])
    guard_rewards = guard_split.reward_table(inputs.reward)
    agent_reward = mean_reward(policy, guard_split, guard_rewards)
    rule_reward = mean_reward(rule, guard_split, guard_rewards)
    kept = "agent" if agent_reward >= rule_reward else "rule"
    info = dict(info or {})
    info["rule_guard"] = {"share": share, "fit_rows": n - held, "guard_rows": held, "agent_reward": agent_reward,
                          "rule_reward": rule_reward, "agent_minus_rule": agent_reward - rule_reward, "kept": kept,
                          "rule_thresholds": [None if t == float("inf") else t for t in rule.thresholds]}
    return (policy if kept == "agent" else rule), info

