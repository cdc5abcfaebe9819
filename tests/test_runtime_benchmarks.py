"""The encoder runtime's analysis scripts: the walk's cost model charges the launches the fast path makes
(`benchmarks/runtime_cost_model.py`); the timeline counts busy GPU time once (`benchmarks/runtime_timeline.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_architectures import tiny

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.static import StaticPolicy
from exitrl.runtime.fast_walk import FastWalker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from runtime_cost_model import StepCosts, interpolate, walk_cost  # noqa: E402 - a benchmark script, importable
from runtime_timeline import busy_and_span  # noqa: E402


def test_interpolation_is_linear_between_points_past_the_last_and_constant_for_one():
    assert interpolate([(0, 10.0), (100, 20.0)], 50) == pytest.approx(15.0)
    assert interpolate([(0, 10.0), (100, 20.0)], 300) == pytest.approx(40.0)
    assert interpolate([(64, 33.0)], 5000) == 33.0


def test_a_walk_is_charged_launch_by_launch_and_rows_that_leave_take_their_launches_with_them():
    model, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    full = FastWalker(model, StaticPolicy(3), max_batch=16, graphs=False, token_types=False, window=64)
    walker = FastWalker(model, ConfidencePolicy(0.5), max_batch=16, graphs=False, token_types=False, window=64)
    # a layer launch: 10 us plus 1 us per 16 tokens; a decision 5 (the full model's 2); a compaction 3; embedding 7
    costs = StepCosts([(0, 10.0), (16 * 16, 26.0)], [(0, 3.0)], 5.0, 2.0, 7.0)
    rows = [3] * 64  # four full launches, three layers, one (last-layer) decision
    assert walk_cost([(16, rows)], full, costs, exits=False) == pytest.approx(4 * 7 + 3 * 4 * 26 + 2)
    leaving = [1] * 48 + [3] * 16  # three launches leave after layer 1 (decisions from layer 1 on)
    charged = 4 * 7 + 4 * 26 + 5 + 3 + 26 + 5 + 26 + 5  # embed, layer 1, decide, compact, layers 2-3
    assert walk_cost([(16, leaving)], walker, costs, exits=True) == pytest.approx(charged)
    assert walk_cost([(16, leaving)], walker, costs, exits=True, decisions=False, compactions=False) == \
        pytest.approx(charged - 3 * 5 - 3)


def test_busy_time_counts_overlapping_kernels_once_and_the_span_runs_first_start_to_last_end():
    assert busy_and_span([(0, 10), (5, 12), (20, 25), (21, 22)]) == (17.0, 25)
    assert busy_and_span([]) == (0.0, 0.0)
