"""REINFORCE learns the known best policy of a synthetic trace; the evaluator and oracles by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_trace

from exitrl.agents import ConfidencePolicy, ReinforceConfig, train_reinforce
from exitrl.agents.inputs import FitInputs
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds, run_policy, task_metric
from exitrl.policy import ExitPolicy, load_policy
from exitrl.rewards import RewardSpec, resolve_reward, reward_table


class FixedLayer(ExitPolicy):
    def __init__(self, layer: int):
        self.layer = layer

    def decide(self, batch, memory):
        return torch.full((batch.states.shape[0],), batch.layer >= self.layer, dtype=torch.bool)


def mean_reward(policy, trace, reward="vanilla", kwargs=None):
    table = reward_table(resolve_reward(reward), trace.logits, trace.labels, trace.memorized, kwargs)
    exit_layers, _ = run_policy(policy, trace)
    return table[torch.arange(len(trace)), exit_layers - 1].mean().item()


def test_reinforce_beats_always_continue_and_always_exit_first(tmp_path):
    train, _ = synthetic_trace(n=3000, seed=0)
    dev, easy = synthetic_trace(n=1000, seed=1)
    kwargs = {"alpha": 0.3}
    cfg = ReinforceConfig(epochs=8, features="state", lr=1e-3, seed=0)
    policy, info = train_reinforce(cfg, FitInputs.from_splits(train, dev, reward=RewardSpec("vanilla", kwargs=kwargs)))
    learned = mean_reward(policy, dev, "vanilla", kwargs)
    always_continue = mean_reward(FixedLayer(4), dev, "vanilla", kwargs)
    always_first = mean_reward(FixedLayer(1), dev, "vanilla", kwargs)
    best = mean_reward(_KnownBest(easy), dev, "vanilla", kwargs)
    assert learned > always_continue + 0.05 and learned > always_first + 0.5
    assert learned > best - 0.1  # close to the known optimum: easy exit at 1, hard at L
    exit_layers, _ = run_policy(policy, dev)
    assert (exit_layers[easy] == 1).float().mean() > 0.9 and (exit_layers[~easy] == 4).float().mean() > 0.9
    assert len(info["history"]) == 8
    policy.save(tmp_path / "p.pt")
    reloaded = load_policy(tmp_path / "p.pt")
    assert torch.equal(run_policy(reloaded, dev)[0], exit_layers)


class _KnownBest(ExitPolicy):
    def __init__(self, easy):
        self.easy = easy

    def init_memory(self, batch_size, device):
        return {"easy": self.easy.clone()}

    def decide(self, batch, memory):
        return memory["easy"].clone()


def test_evaluate_and_oracles_by_hand():
    from exitrl.traces.trace import SplitTrace

    # 3 examples, 3 layers, label 1; predictions per layer:
    preds = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 1]])
    logits = torch.nn.functional.one_hot(preds, 2).float() * 2
    probs_max = torch.softmax(torch.tensor([2.0, 0.0]), 0).max().item()
    trace = SplitTrace.from_logits(torch.zeros(3, 3, 4), logits, torch.ones(3, dtype=torch.long))
    bounds = oracle_bounds(trace)
    assert bounds["full_model"]["accuracy"] == pytest.approx(2 / 3)
    assert bounds["per_layer_score"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert bounds["consistency_oracle"]["exit_histogram"] == [2, 0, 1]  # ex2: last is 0, layer 1 already 0
    assert bounds["consistency_oracle"]["accuracy"] == pytest.approx(2 / 3)
    assert bounds["correctness_oracle"]["exit_histogram"] == [1, 1, 1] and bounds["correctness_oracle"]["accuracy"] == 1
    result = evaluate_policy(ConfidencePolicy(probs_max - 1e-3), trace)
    assert result["avg_exit_layer"] == 1.0 and result["speedup"] == 3.0
    assert result["saved_layers"] == pytest.approx(2 / 3)
    result = evaluate_policy(FixedLayer(2), trace)
    assert result["exit_histogram"] == [0, 3, 0] and result["accuracy"] == pytest.approx(2 / 3)
    assert task_metric(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), "f1") == 0.5


def test_memory_is_compacted_with_the_batch():
    """A policy with per-row memory sees its own rows' memory after others left the batch."""
    from exitrl.traces.trace import SplitTrace

    class RowIdPolicy(ExitPolicy):
        def init_memory(self, batch_size, device):
            return {"row": torch.arange(batch_size)}

        def decide(self, batch, memory):
            return memory["row"] % batch.num_layers == batch.layer - 1  # row r exits at layer r % L + 1

    trace = SplitTrace.from_logits(torch.zeros(9, 3, 2), torch.zeros(9, 3, 2), torch.zeros(9, dtype=torch.long))
    exit_layers, _ = run_policy(RowIdPolicy(), trace, batch_size=4)
    assert exit_layers.tolist() == [1, 2, 3, 1, 1, 2, 3, 1, 1]


def test_reinforce_refuses_bad_settings_clearly():
    train, _ = synthetic_trace(n=20)
    with pytest.raises(ValueError, match="at least agent.batch_size=32"):
        train_reinforce(ReinforceConfig(epochs=1), FitInputs.from_splits(train))
    with pytest.raises(ValueError, match="valid: state, confidence, observation"):
        train_reinforce(ReinforceConfig(epochs=1, batch_size=4, features="pixels"), FitInputs.from_splits(train))
