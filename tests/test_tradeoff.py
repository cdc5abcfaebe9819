"""Trade-off numbers by hand: Pareto frontier, the AUC definition, best score at a saving, speedup within a point,
and the oracle frontier on a constructed trace."""

from __future__ import annotations

import pytest
import torch

from exitrl.evaluation.tradeoff import (
    auc,
    best_score_saving_at_least,
    oracle_frontier,
    pareto_frontier,
    saving_grid,
    speedup_within,
)
from exitrl.traces.trace import SplitTrace


def point(score: float, saved: float, num_layers: int = 4) -> dict:
    return {"score": score, "saved_layers": saved, "speedup": 1 / (1 - saved)}


def test_pareto_frontier_drops_dominated_points():
    pts = [point(0.80, 0.50), point(0.85, 0.25), point(0.82, 0.20), point(0.70, 0.60), point(0.84, 0.50)]
    frontier = pareto_frontier(pts)
    assert [(p["score"], p["saved_layers"]) for p in frontier] == [(0.70, 0.60), (0.84, 0.50), (0.85, 0.25)]


def test_auc_by_hand():
    # L = 4: grid of 16 savings from 0 to 0.75 in steps of 0.05
    assert saving_grid(4)[:3] == pytest.approx([0.0, 0.05, 0.10]) and saving_grid(4)[-1] == pytest.approx(0.75)
    full = point(0.90, 0.0)
    pts = [point(0.88, 0.30), point(0.80, 0.50)]
    # s = 0: 0.90 (full model); s in (0, 0.30]: 0.88 (0.05 .. 0.30: 6 points); s in (0.30, 0.50]: 0.80 (0.35 .. 0.50:
    # 4 points); s > 0.50 (0.55 .. 0.75: 5 points): nothing saves that much -> the layer-1 score 0.60
    expected = (0.90 + 6 * 0.88 + 4 * 0.80 + 5 * 0.60) / 16
    assert auc(pts, full, 0.60, 4) == pytest.approx(expected)
    assert best_score_saving_at_least(pts, 0.30) == 0.88 and best_score_saving_at_least(pts, 0.6) is None
    assert speedup_within(pts, full, 0.01) == pytest.approx(1.0)  # 0.88 loses 2 points
    assert speedup_within([point(0.895, 0.30), *pts], full, 0.01) == pytest.approx(1 / 0.7)


def test_oracle_frontier_on_a_constructed_trace():
    # 4 examples, 3 layers, label 1. Correct layers: ex0 {1,2,3}; ex1 {3}; ex2 {2,3}; ex3 never.
    correct = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    logits = torch.stack([torch.zeros_like(correct, dtype=torch.float), correct.float() * 2 - 1], -1)
    trace = SplitTrace.from_logits(torch.zeros(4, 3, 2), logits, torch.ones(4, dtype=torch.long))
    points = oracle_frontier(trace, max_points=10)
    # start: all at layer 1, 1 of 4 correct, mean exit 1; move ex2 to layer 2 (+1): 2/4 at mean 5/4;
    # move ex1 to layer 3 (+1): 3/4 at mean 7/4; ex3 is never correct and stays at layer 1
    got = [(p["score"], p["avg_exit_layer"]) for p in points]
    assert got == [(0.25, 1.0), (0.5, 1.25), (0.75, 1.75)]
