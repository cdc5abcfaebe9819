"""Env checkers of Gymnasium and Stable-Baselines3; the vector env equals N single envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import synthetic_trace
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from exitrl.core.observation import HISTORY
from exitrl.envs import ENV_ID, EXIT, EarlyExitEnv, TraceVectorEnv
from exitrl.rewards import RewardError, RewardSpec


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(n=64, num_layers=4, hidden=8)[0]


def test_registered_env_passes_gymnasium_and_sb3_checkers(trace):
    env = gym.make(ENV_ID, trace=trace, reward=RewardSpec("hardness", kwargs={"alpha": 0.1}))
    gym_check_env(env.unwrapped)
    sb3_check_env(EarlyExitEnv(trace), warn=True)
    assert env.observation_space.shape == (8 + 2 + 3 + len(HISTORY),)


def test_episode_rules(trace):
    env = EarlyExitEnv(trace, reward=RewardSpec("vanilla", kwargs={"alpha": 0.1}))
    obs, info = env.reset(seed=0, options={"index": 5})
    assert info == {"index": 5, "layer": 1} and obs.dtype == np.float32
    for layer in range(1, 4):
        obs, reward, terminated, truncated, info = env.step(0)
        assert reward == 0.0 and not terminated and info["layer"] == layer + 1
    obs, reward, terminated, _, info = env.step(0)  # the last layer always exits
    assert terminated and info["exit_layer"] == 4
    log_p = torch.log_softmax(trace.logits[5, 3], -1)[trace.labels[5]].item()
    assert reward == pytest.approx(log_p - 0.1 * 4, abs=1e-5)
    env.reset(options={"index": 7})
    _, reward, terminated, _, info = env.step(EXIT)
    assert terminated and info["exit_layer"] == 1 and info["correct"] == bool(trace.logits[7, 0].argmax()
                                                                               == trace.labels[7])


def test_vector_env_equals_single_envs(trace):
    num = 16
    vec = TraceVectorEnv(trace, num, reward=RewardSpec("hardness", kwargs={"alpha": 0.2}), seed=3)
    singles = [EarlyExitEnv(trace, reward=RewardSpec("hardness", kwargs={"alpha": 0.2})) for _ in range(num)]
    obs, _ = vec.reset(options={"indices": torch.arange(num) * 3})
    single_obs = [s.reset(options={"index": i * 3})[0] for i, s in enumerate(singles)]
    np.testing.assert_allclose(obs.numpy(), np.stack(single_obs), rtol=1e-6)
    rng = np.random.default_rng(0)
    exits_seen = 0
    for _ in range(30):
        actions = rng.integers(0, 2, num)
        obs, rewards, terms, truncs, infos = vec.step(torch.as_tensor(actions))
        next_indices = vec.indices
        for i, env in enumerate(singles):
            s_obs, s_rew, s_term, _, s_info = env.step(int(actions[i]))
            assert rewards[i].item() == pytest.approx(s_rew, abs=1e-6)
            assert bool(terms[i]) == s_term and not truncs[i]
            if s_term:
                exits_seen += 1
                assert infos["exit_layer"][i].item() == s_info["exit_layer"]
                assert infos["prediction"][i].item() == s_info["prediction"]
                s_obs, _ = env.reset(options={"index": int(next_indices[i])})  # SAME_STEP autoreset
            np.testing.assert_allclose(obs[i].numpy(), s_obs, rtol=1e-6)
    assert exits_seen > num


def test_vector_env_without_autoreset_runs_one_episode_per_row(trace):
    vec = TraceVectorEnv(trace, 8, autoreset=False, seed=0)
    vec.reset(options={"indices": torch.arange(8)})
    total_exits = torch.zeros(8, dtype=torch.long)
    for _ in range(6):  # more steps than layers
        _, _, terms, _, _ = vec.step(torch.zeros(8, dtype=torch.long))
        total_exits += terms.long()
    assert total_exits.tolist() == [1] * 8 and bool(vec.finished.all())


def test_env_with_nan_reward_fails_at_construction(trace):
    with pytest.raises(RewardError, match="non-finite"):
        TraceVectorEnv(trace, 4, reward=RewardSpec(fn="example_rewards:broken_nan"))
    with pytest.raises(RewardError, match="non-finite"):
        EarlyExitEnv(trace, reward="example_rewards:broken_nan")


def test_bad_reset_arguments_fail_clearly(trace):
    vec = TraceVectorEnv(trace, 4, seed=0)
    with pytest.raises(ValueError, match="must lie in"):
        vec.reset(options={"indices": torch.tensor([0, 1, 2, 64])})
    obs_a, _ = vec.reset(seed=[7, 8, 9, 10])
    obs_b, _ = vec.reset(seed=7)
    assert torch.equal(obs_a, obs_b)
    with pytest.raises(ValueError, match="must lie in"):
        EarlyExitEnv(trace).reset(options={"index": -1})
