"""Classic fixed rules, pinned to hand-worked examples: confidence measures, static exit, PABEE patience."""

from __future__ import annotations

import math

import pytest
import torch

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.patience import PatiencePolicy
from exitrl.agents.registry import check_agent
from exitrl.agents.static import StaticPolicy
from exitrl.core.observation import confidence_measure
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.traces.trace import SplitTrace


def trace_from_probs(probs: list[list[list[float]]], labels: list[int]) -> SplitTrace:
    """A trace whose exit heads output exactly ``probs [N][L][C]``."""
    logits = torch.tensor(probs).log()
    n, layers, _ = logits.shape
    return SplitTrace.from_logits(torch.zeros(n, layers, 4), logits, torch.tensor(labels))


def test_confidence_measures_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    logits = probs.log()
    torch.testing.assert_close(confidence_measure(logits, "maxprob"), torch.tensor([0.7, 0.4]))
    torch.testing.assert_close(confidence_measure(logits, "margin"), torch.tensor([0.5, 0.0]))
    expected = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
                -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))]
    torch.testing.assert_close(confidence_measure(logits, "entropy"), torch.tensor(expected))


def test_each_measure_exits_where_worked_out():
    # one row, three layers: max-prob 0.6, 0.8, 0.95 -> margin 0.2, 0.6, 0.9 -> entropy 0.673, 0.500, 0.199 nats
    trace = trace_from_probs([[[0.6, 0.4], [0.8, 0.2], [0.95, 0.05]]], [0])
    assert run_policy(ConfidencePolicy(0.75, "maxprob"), trace)[0].tolist() == [2]
    assert run_policy(ConfidencePolicy(0.5, "margin"), trace)[0].tolist() == [2]
    assert run_policy(ConfidencePolicy(0.3, "entropy"), trace)[0].tolist() == [3]
    assert run_policy(ConfidencePolicy(0.6, "entropy"), trace)[0].tolist() == [2]
    with pytest.raises(ValueError, match="maxprob, entropy, margin"):
        ConfidencePolicy(0.5, "variance")
    with pytest.raises(ValueError, match="must lie in"):
        ConfidencePolicy(1.5, "margin")


def test_static_exits_every_row_at_its_layer():
    trace = trace_from_probs([[[0.6, 0.4]] * 4] * 3, [0, 1, 0])
    assert run_policy(StaticPolicy(3), trace)[0].tolist() == [3, 3, 3]
    assert run_policy(StaticPolicy(9), trace)[0].tolist() == [4, 4, 4]  # deeper than the model: the last layer
    with pytest.raises(ValueError, match=">= 1"):
        StaticPolicy(0)


def test_patience_counter_over_worked_sequences(tmp_path):
    a, b = [0.9, 0.1], [0.2, 0.8]  # predict class 0 / class 1
    # predictions per layer:       counter per layer (t = 2):   exit
    rows = [[a, a, a, b, b, b],    # 0 1 2 -> exit at 3            3
            [a, b, a, b, a, b],    # 0 0 0 0 0 0 -> never, forced  6
            [a, b, b, b, a, a],    # 0 0 1 2 -> exit at 4          4
            [b, a, a, b, b, a]]    # 0 0 1 0 1 0 -> forced         6
    trace = trace_from_probs(rows, [0, 0, 1, 1])
    exits, predictions = run_policy(PatiencePolicy(2), trace)
    assert exits.tolist() == [3, 6, 4, 6] and predictions.tolist() == [0, 1, 1, 0]
    assert run_policy(PatiencePolicy(1), trace)[0].tolist() == [2, 6, 3, 3]
    PatiencePolicy(2).save(tmp_path / "p.pt")
    assert run_policy(load_policy(tmp_path / "p.pt"), trace)[0].tolist() == [3, 6, 4, 6]


def test_patience_memory_follows_compaction():
    """Rows leave the batch at different layers; the survivors' counters must stay theirs."""
    a, b = [0.9, 0.1], [0.2, 0.8]
    rows = [[a, a, b, b, b], [a, b, b, a, a], [b, b, a, a, a]]
    exits, _ = run_policy(PatiencePolicy(1), trace_from_probs(rows, [0, 0, 0]), batch_size=2)
    assert exits.tolist() == [2, 3, 2]


def test_fixed_rule_options_are_checked():
    check_agent("patience", {"patience": 3})
    with pytest.raises(ValueError, match="unknown option"):
        check_agent("static", {"threshold": 0.5})
    with pytest.raises(ValueError, match="maxprob, entropy, margin"):
        check_agent("confidence", {"threshold": 0.5, "measure": "nope"})
