"""agent=ppo (Stable-Baselines3): learns known optima on synthetic traces and logs SB3's keys to the run."""

from __future__ import annotations

import json

import torch
from conftest import synthetic_trace
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import run_cli

from exitrl.agents.inputs import FitInputs
from exitrl.agents.ppo import PPOConfig, train_ppo
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.rewards import RewardSpec


def test_ppo_learns_the_known_best_policy(tmp_path):
    train, _ = synthetic_trace(n=3000, seed=0)
    dev, easy = synthetic_trace(n=1000, seed=1)
    policy, info = train_ppo(PPOConfig(total_timesteps=40_000, eval_every=10_000), FitInputs.from_splits(
        train, dev, reward=RewardSpec("vanilla", kwargs={"alpha": 0.3})))
    exit_layers, _ = run_policy(policy, dev)
    assert (exit_layers[easy] == 1).float().mean() > 0.85 and (exit_layers[~easy] == 4).float().mean() > 0.9
    assert info["timesteps"] >= 40_000 and len(info["history"]) >= 4
    policy.save(tmp_path / "ppo.pt")
    assert torch.equal(run_policy(load_policy(tmp_path / "ppo.pt"), dev)[0], exit_layers)


def test_ppo_optimises_a_user_reward():
    train, _ = synthetic_trace(n=500, num_layers=3, seed=0)
    dev, _ = synthetic_trace(n=200, num_layers=3, seed=1)
    policy, _ = train_ppo(PPOConfig(total_timesteps=20_000, features="confidence"), FitInputs.from_splits(
        train, reward=RewardSpec(fn="example_rewards:only_layer_two")))
    exit_layers, _ = run_policy(policy, dev)
    assert (exit_layers == 2).float().mean() > 0.95


def test_cli_ppo_writes_sb3_and_exitrl_keys(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=ppo", "agent.total_timesteps=4096", "agent.eval_every=2048", "agent.n_envs=4",
                  f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                  "data.limit.train=64", "data.limit.dev=32", "backbone.finetune.epochs=1", "data.policy_split=0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["results"]) == {"ppo", "confidence"} and metrics["agent_info"]["timesteps"] >= 4096
    assert metrics["validation_results"]["ppo"]["num_examples"] == 16  # the held-out walk ran on a copy
    from stable_baselines3 import PPO

    sb3 = PPO.load(run / "ppo_sb3.zip", device="cpu")  # SB3's own format: load, predict, train on
    assert sb3.num_timesteps == metrics["agent_info"]["timesteps"]
    saved = load_policy(run / "policy.pt").actor.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in sb3.policy.state_dict().items())
    tags = set()
    for events_file in (run / "tensorboard").glob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert {"rollout/ep_rew_mean", "train/approx_kl", "eval/accuracy", "eval/speedup"} <= tags
    assert load_policy(run / "policy.pt").name == "ppo"
