"""One user reward, every learned agent: ``reward.fn=example_rewards:only_layer_two`` pays only for exiting at
layer 2, so an agent that optimises the reward it was given exits (almost) everything at layer 2. The agents are
built through the pipeline, the same path as ``python -m exitrl.train agent=<name> reward=custom reward.fn=...``."""

from __future__ import annotations

import pytest
import torch

from exitrl.evaluation.evaluate import run_policy
from exitrl.experiments.pipeline import AgentRun
from exitrl.traces.trace import SplitTrace, Trace

# Small budgets: enough for each agent to find the one paying layer.
BUDGETS = {
    "reinforce": {"epochs": 3, "features": "confidence"},
    "ppo": {"total_timesteps": 12_000, "features": "confidence", "eval_every": 100_000},
    "ppo_torchrl": {"total_frames": 49_152, "num_envs": 256, "frames_per_batch": 4096, "minibatch_size": 1024,
                    "features": "confidence"},
    "bandit_ucb": {"rounds": 3000, "ucb_c": 0.3},
    "bandit_thompson": {"rounds": 3000},
    "linucb": {"rounds": 4000},
}


def rising_confidence_trace(n: int, seed: int) -> SplitTrace:
    """Three layers whose heads grow surer (max-prob 0.70, 0.97, 0.995), so even a threshold rule can reach
    "exit everything at layer 2" (any threshold in (0.70, 0.97])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    sign = torch.where(labels == 1, 1.0, -1.0)
    margins = torch.log(torch.tensor([0.70 / 0.30, 0.97 / 0.03, 0.995 / 0.005]))
    logits = torch.zeros(n, 3, 2)
    logits[:, :, 1] = sign[:, None] * margins[None, :]
    return SplitTrace.from_logits(torch.randn(n, 3, 8, generator=g), logits, labels)


@pytest.mark.parametrize("agent", sorted(BUDGETS))
def test_every_agent_optimises_the_user_reward(agent):
    trace = Trace({"train": rising_confidence_trace(1024, 0), "dev": rising_confidence_trace(256, 1)})
    run = AgentRun.create(agent, dict(BUDGETS[agent]), reward="example_rewards:only_layer_two")
    policy = run.fit(trace, torch.device("cpu")).policy
    exit_layers, _ = run_policy(policy, trace["dev"])
    assert (exit_layers == 2).float().mean() > 0.95, f"{agent}: exit layers {exit_layers.bincount().tolist()}"
