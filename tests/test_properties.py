"""Property-based checks (hypothesis): random action sequences through the single env, the vector env and the
TorchRL env keep the episode contract; random policies through the walk never lose or duplicate a row."""

from __future__ import annotations

import numpy as np
import torch
from conftest import synthetic_trace
from hypothesis import given, settings
from hypothesis import strategies as st

from exitrl.envs.early_exit_env import EarlyExitEnv
from exitrl.envs.vector_env import TraceVectorEnv
from exitrl.evaluation.walk import TraceSource, walk
from exitrl.policy import ExitPolicy, LayerBatch

NUM_LAYERS = 4
TRACE, _ = synthetic_trace(n=40, num_layers=NUM_LAYERS, hidden=6, seed=0)
SINGLE = EarlyExitEnv(TRACE, reward="hardness")
actions_of_rows = st.lists(st.lists(st.integers(0, 1), min_size=NUM_LAYERS, max_size=NUM_LAYERS), min_size=1,
                           max_size=12)


def first_exit(actions: list[int]) -> int:
    """The 1-indexed layer where an action sequence exits (the last layer exits by force)."""
    return next((i + 1 for i, a in enumerate(actions[:NUM_LAYERS - 1]) if a), NUM_LAYERS)


@settings(max_examples=40, deadline=None)
@given(actions=actions_of_rows, seed=st.integers(0, 2**16))
def test_single_env_exits_once_with_a_finite_reward(actions, seed):
    rng = np.random.default_rng(seed)
    for row_actions in actions:
        index = int(rng.integers(len(TRACE)))
        SINGLE.reset(options={"index": index})
        exits, total = 0, 0.0
        for layer, action in enumerate(row_actions, start=1):
            _, reward, terminated, truncated, info = SINGLE.step(action)
            assert np.isfinite(reward) and not truncated
            total += reward
            if terminated:
                exits += 1
                assert info["exit_layer"] == layer == first_exit(row_actions)
                assert 1 <= info["exit_layer"] <= NUM_LAYERS
                break
            assert reward == 0.0
        assert exits == 1


@settings(max_examples=40, deadline=None)
@given(actions=actions_of_rows, seed=st.integers(0, 2**16))
def test_vector_env_equals_single_envs(actions, seed):
    rng = np.random.default_rng(seed)
    indices = torch.as_tensor(rng.integers(len(TRACE), size=len(actions)))
    vector = TraceVectorEnv(TRACE, len(actions), reward="hardness", autoreset=False, seed=seed)
    vector_obs, _ = vector.reset(options={"indices": indices})
    table = torch.tensor(actions)
    exit_layer = torch.zeros(len(actions), dtype=torch.long)
    rewards = torch.zeros(len(actions))
    single_obs = []
    for index in indices.tolist():
        obs, _ = SINGLE.reset(options={"index": index})
        single_obs.append(obs)
    assert np.allclose(vector_obs.numpy(), np.stack(single_obs), atol=1e-6, equal_nan=True)
    for layer in range(NUM_LAYERS):
        _, reward, exits, _, info = vector.step(table[:, layer])
        assert torch.isfinite(reward).all()
        assert not (exits & (exit_layer > 0)).any()  # a row never exits twice
        exit_layer = torch.where(exits, info["exit_layer"], exit_layer)
        rewards += reward
    assert (exit_layer >= 1).all() and (exit_layer <= NUM_LAYERS).all()
    for row, index in enumerate(indices.tolist()):  # the same row through the single env
        SINGLE.reset(options={"index": index})
        total = 0.0
        for action in actions[row]:
            _, reward, terminated, _, info = SINGLE.step(action)
            total += reward
            if terminated:
                break
        assert info["exit_layer"] == int(exit_layer[row]) == first_exit(actions[row])
        assert abs(total - float(rewards[row])) < 1e-5


@settings(max_examples=30, deadline=None)
@given(reset_mask=st.lists(st.booleans(), min_size=2, max_size=16), steps=st.integers(0, NUM_LAYERS - 1),
       seed=st.integers(0, 2**16))
def test_partial_resets_leave_other_rows_alone(reset_mask, steps, seed):
    vector = TraceVectorEnv(TRACE, len(reset_mask), reward="hardness", autoreset=False, seed=seed)
    vector.reset()
    for _ in range(steps):
        vector.step(torch.zeros(len(reset_mask), dtype=torch.long))
    before_indices, before_layers = vector.indices.clone(), vector.layers.clone()
    rows = torch.tensor(reset_mask)
    vector.reset_rows(rows)
    assert torch.equal(vector.indices[~rows], before_indices[~rows])
    assert torch.equal(vector.layers[~rows], before_layers[~rows])
    assert (vector.layers[rows] == 0).all() and not vector.finished[rows].any()


def test_torchrl_env_passes_its_checker_after_random_partial_resets():
    from torchrl.envs.utils import check_env_specs

    from exitrl.envs.torchrl_env import TorchRLEarlyExitEnv

    env = TorchRLEarlyExitEnv(TRACE, 8, reward="hardness")
    check_env_specs(env)
    generator = torch.Generator().manual_seed(0)
    state = env.reset()
    for _ in range(20):
        state["action"] = torch.randint(2, (8,), generator=generator)
        state = env.step(state)["next"]
        assert torch.isfinite(state["reward"]).all()
        done = state["done"].squeeze(-1)
        if done.any():
            state["_reset"] = done.unsqueeze(-1)
            kept = env.inner.indices[~done].clone()
            state = env.reset(state)
            assert torch.equal(env.inner.indices[~done], kept)


class TablePolicy(ExitPolicy):
    """Exits row r at layer l where ``table[r, l - 1]``; the row is read off state feature 0 (its index)."""

    name = "table"

    def __init__(self, table: torch.Tensor):
        self.table = table

    def decide(self, batch: LayerBatch, memory) -> torch.Tensor:
        rows = batch.states[:, 0].round().long()
        return self.table[rows, batch.layer - 1]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 40), seed=st.integers(0, 2**16), rate=st.floats(0.0, 1.0))
def test_walk_compaction_never_loses_or_duplicates_a_row(size, seed, rate):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(size, NUM_LAYERS, 3, generator=generator)
    states[:, :, 0] = torch.arange(size, dtype=torch.float32)[:, None]  # each row carries its own index
    logits = torch.randn(size, NUM_LAYERS, 3, generator=generator)
    from exitrl.traces.trace import SplitTrace

    trace = SplitTrace.from_logits(states, logits, torch.zeros(size, dtype=torch.long))
    table = torch.rand(size, NUM_LAYERS, generator=generator) < rate
    exits = walk(TablePolicy(table), TraceSource(trace, torch.arange(size)), size, torch.device("cpu"))
    expected = torch.tensor([first_exit(row.tolist()) for row in table.long()])
    assert torch.equal(exits.layers, expected)
    assert torch.equal(exits.predictions, logits[torch.arange(size), expected - 1].argmax(-1))
