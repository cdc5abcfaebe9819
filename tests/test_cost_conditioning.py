"""Cost-conditioned learning (CPU, planted traces): the reward splits into gain and cost exactly; the batched env
and the single env draw each episode's α, show it as the observation's last column and pay G − α·C; one REINFORCE
or PPO (TorchRL, SB3) fit, moved along α after fitting, exits earlier as α grows (REINFORCE also matches what a
policy trained at that α earns); a reward that is not linear in α, or takes none, is refused before training,
naming it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_stopping import planted

from exitrl.agents.inputs import FitInputs
from exitrl.agents.registry import get_agent
from exitrl.agents.rule_guard import mean_reward
from exitrl.envs import EarlyExitEnv, TraceVectorEnv
from exitrl.envs.cost_conditioning import gain_and_cost
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import Trace

COSTS = [0.0, 0.6, 3.0]


def reward(alpha: float, name: str = "correct") -> RewardSpec:
    return RewardSpec(name, kwargs={"alpha": alpha, "depth": "fraction"})


@pytest.mark.parametrize("name", ["correct", "vanilla", "hardness", "consistency", "confidence"])
def test_every_builtin_reward_splits_into_gain_minus_alpha_times_cost(name):
    trace, _ = planted(n=200, seed=3)
    gain, cost = gain_and_cost(trace, reward(0.1, name))
    for alpha in (0.0, 0.07, 1.5):
        assert torch.allclose(gain - alpha * cost, trace.reward_table(reward(alpha, name)), atol=1e-5)


def test_the_env_draws_each_episodes_alpha_shows_it_last_and_pays_gain_minus_alpha_times_cost():
    trace, _ = planted(n=200, seed=3)
    env = TraceVectorEnv(trace, 64, reward(0.1), seed=0, costs=COSTS)
    gain, cost = gain_and_cost(trace, reward(0.1))
    obs, _ = env.reset()
    assert obs.shape == (64, env.layout.size + 1) and env.single_observation_space.shape == (env.layout.size + 1,)
    assert torch.equal(torch.unique(obs[:, -1]), torch.tensor(COSTS))  # 64 draws from 3 values
    generator = torch.Generator().manual_seed(0)
    for _ in range(2 * trace.num_layers):
        index, layer, alpha = env.indices.clone(), env.layers.clone(), env.cost_weights.clone()
        obs, rewards, exits, _, _ = env.step(torch.randint(2, (64,), generator=generator))
        paid = gain[index, layer] - alpha * cost[index, layer]
        assert exits.any() and torch.allclose(rewards[exits], paid[exits]) and not rewards[~exits].any()
        assert torch.equal(obs[:, -1], env.cost_weights)  # a new episode shows its own, newly drawn α
    saved = env.state()
    again = TraceVectorEnv(trace, 64, reward(0.1), seed=5, costs=COSTS)
    again.set_state(saved)
    assert torch.equal(again.observations(), env.observations())


PPO_OPTIONS = {
    "ppo_torchrl": {"total_frames": 81920, "num_envs": 256, "frames_per_batch": 4096, "minibatch_size": 1024,
                    "lr": 3e-3},
    "ppo": {"total_timesteps": 20480, "n_envs": 8, "n_steps": 256, "batch_size": 512, "lr": 3e-3},
}


def test_the_single_env_draws_each_episodes_alpha_and_pays_gain_minus_alpha_times_cost():
    trace, _ = planted(n=200, seed=3)
    env = EarlyExitEnv(trace, reward(0.1), costs=COSTS)
    gain, cost = gain_and_cost(trace, reward(0.1))
    seen = set()
    for episode in range(40):
        obs, info = env.reset(seed=episode)
        assert obs.shape == env.observation_space.shape == (env.layout.size + 1,) and obs[-1] == env.cost_weight
        seen.add(env.cost_weight)
        done, layer = False, 0
        while not done:
            obs, paid, done, _, info = env.step(int(layer == 1))
            layer += 1
        expected = float(gain[info["index"], layer - 1] - env.cost_weight * cost[info["index"], layer - 1])
        assert abs(paid - expected) < 1e-5 and obs[-1] == env.cost_weight
    assert seen == set(COSTS)


@pytest.mark.parametrize("agent", ["ppo_torchrl", "ppo"])
def test_one_conditioned_ppo_fit_exits_earlier_as_alpha_grows(agent, tmp_path):
    train, _ = planted(n=900, seed=4)
    test, _ = planted(n=900, seed=7)
    spec = get_agent(agent)
    options = {**PPO_OPTIONS[agent], "train_costs": COSTS}
    policy, _ = spec.fit(spec.make_options(options), FitInputs(Trace({"train": train}), "train", reward(0.6)))
    assert policy.cost_weight == 0.6  # deployed at the run's own α
    exits = []
    for alpha in COSTS:
        moved = copy.deepcopy(policy)
        moved.cost_weight = alpha
        exits.append(float(run_policy(moved, test)[0].float().mean()))
    assert exits[0] > exits[1] > exits[2] and exits[2] < 1.1, exits
    policy.save(tmp_path / "policy.pt")
    loaded = load_policy(tmp_path / "policy.pt")
    assert loaded.cost_weight == 0.6 and torch.equal(run_policy(loaded, test)[0], run_policy(policy, test)[0])


def test_one_conditioned_fit_moves_along_the_trade_off_with_alpha(tmp_path):
    train, _ = planted(n=900, seed=4)
    test, _ = planted(n=900, seed=7)
    spec = get_agent("reinforce")
    options = {"epochs": 30, "batch_size": 64, "lr": 3e-3}
    policy, _ = spec.fit(spec.make_options({**options, "train_costs": COSTS}),
                         FitInputs(Trace({"train": train}), "train", reward(0.6)))
    assert policy.cost_weight == 0.6  # deployed at the run's own α
    exits, earned = [], []
    for alpha in COSTS:
        moved = copy.deepcopy(policy)
        moved.cost_weight = alpha
        exits.append(float(run_policy(moved, test)[0].float().mean()))
        earned.append(mean_reward(moved, test, test.reward_table(reward(alpha))))
    assert exits[0] > exits[1] > exits[2] == 1.0  # dearer layers, earlier exits; at α = 3 nothing is worth a layer
    assert exits[0] > 2.5
    single, _ = spec.fit(spec.make_options(options), FitInputs(Trace({"train": train}), "train", reward(0.6)))
    assert earned[1] >= mean_reward(single, test, test.reward_table(reward(0.6))) - 0.03
    policy.save(tmp_path / "policy.pt")
    loaded = load_policy(tmp_path / "policy.pt")
    assert loaded.cost_weight == 0.6 and torch.equal(run_policy(loaded, test)[0], run_policy(policy, test)[0])


@pytest.mark.parametrize("fn,match", [("example_rewards:squared_cost", "linear in alpha"),
                                      ("example_rewards:only_layer_two", "`alpha` keyword")])
def test_a_reward_not_linear_in_alpha_is_refused_naming_it(fn, match):
    trace, _ = planted(n=100, seed=3)
    spec = get_agent("reinforce")
    inputs = FitInputs(Trace({"train": trace}), "train", RewardSpec(None, fn, {}))
    with pytest.raises(ValueError, match=match) as error:
        spec.fit(spec.make_options({"epochs": 1, "batch_size": 32, "train_costs": [0.0, 0.5]}), inputs)
    assert fn in str(error.value)


@pytest.mark.parametrize("agent", ["reinforce", "ppo_torchrl", "ppo"])
def test_bad_train_costs_are_refused_naming_the_key(agent):
    with pytest.raises(ValueError, match="agent.train_costs"):
        get_agent(agent).make_options({"train_costs": [0.1, -1.0]})
