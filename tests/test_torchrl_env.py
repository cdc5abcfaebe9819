"""The TorchRL env over the batched trace: specs check, rewards match the table, partial resets touch only the
rows that asked."""

from __future__ import annotations

import torch
from conftest import synthetic_trace
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from exitrl.envs.torchrl_env import TorchRLEarlyExitEnv
from exitrl.rewards import RewardSpec, resolve_reward, reward_table


def test_specs_pass_torchrl_checker():
    env = TorchRLEarlyExitEnv(synthetic_trace(n=64)[0], 8, reward=RewardSpec("vanilla", kwargs={"alpha": 0.1}))
    check_env_specs(env)
    rollout = env.rollout(12, break_when_any_done=False)
    assert rollout["next", "reward"].shape == (8, 12, 1) and rollout["next", "done"].any()


def test_rewards_and_partial_resets():
    trace = synthetic_trace(n=64, num_layers=4)[0]
    env = TorchRLEarlyExitEnv(trace, 6, reward=RewardSpec("vanilla", kwargs={"alpha": 0.1}), seed=0)
    table = reward_table(resolve_reward("vanilla"), trace.logits, trace.labels, trace.memorized, {"alpha": 0.1})
    td = env.reset()
    assert td["layer"].flatten().tolist() == [1] * 6
    continue_all = TensorDict({"action": torch.zeros(6, dtype=torch.long)}, batch_size=[6])
    for _ in range(3):
        out = env.step(continue_all.clone())["next"]
        assert not out["done"].any() and (out["reward"] == 0).all()
    indices = env.inner.indices.clone()
    out = env.step(continue_all.clone())["next"]  # layer 4 = L: forced exit
    assert out["done"].all()
    torch.testing.assert_close(out["reward"].flatten(), table[indices, 3])
    rows = torch.tensor([True, False, True, False, False, False])
    after = env.reset(TensorDict({"_reset": rows.unsqueeze(-1)}, batch_size=[6]))
    assert after["layer"][rows].flatten().tolist() == [1, 1]  # TorchRL's output speaks for the reset rows only
    assert env.inner.layers.tolist() == [0, 3, 0, 3, 3, 3]  # the others kept their state
    assert env.inner.finished.tolist() == [False, True, False, True, True, True]


def test_torchrl_ppo_learns_the_known_best_policy(tmp_path):
    from exitrl.agents.inputs import FitInputs
    from exitrl.agents.ppo_torchrl import TorchRLPPOConfig, train_ppo_torchrl
    from exitrl.evaluation.evaluate import run_policy
    from exitrl.policy import load_policy

    train, _ = synthetic_trace(n=3000, seed=0)
    dev, easy = synthetic_trace(n=1000, seed=1)
    cfg = TorchRLPPOConfig(total_frames=98_304, num_envs=512, frames_per_batch=8192, minibatch_size=2048)
    policy, info = train_ppo_torchrl(cfg, FitInputs.from_splits(
        train, dev, reward=RewardSpec("vanilla", kwargs={"alpha": 0.3})))
    exit_layers, _ = run_policy(policy, dev)
    assert (exit_layers[easy] == 1).float().mean() > 0.8 and (exit_layers[~easy] == 4).float().mean() > 0.9
    assert info["frames"] == 98_304 and len(info["history"]) == 12
    policy.save(tmp_path / "p.pt")
    assert torch.equal(run_policy(load_policy(tmp_path / "p.pt"), dev)[0], exit_layers)


def test_cli_ppo_torchrl(tiny_bert, glue_dir, tmp_path):
    import json

    from test_cli import run_cli

    out = run_cli(tmp_path, "agent=ppo_torchrl", "agent.total_frames=8192", "agent.num_envs=64",
                  "agent.frames_per_batch=4096", "agent.minibatch_size=1024", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=64",
                  "data.limit.dev=32", "backbone.finetune.epochs=1", "data.policy_split=0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"ppo_torchrl", "confidence"} and metrics["agent_info"]["frames"] == 8192
    assert metrics["validation_results"]["ppo_torchrl"]["num_examples"] == 16
