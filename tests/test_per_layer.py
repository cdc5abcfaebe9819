"""Per-layer thresholds: the coordinate ascent finds the brute-force optimum on small cases, never loses to one
global threshold, and the learned exit scorer never loses to the per-layer rule on the rows it is fitted on."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import synthetic_trace

from exitrl.agents.confidence_per_layer import PerLayerConfidencePolicy, fit_per_layer_confidence
from exitrl.agents.exit_scorer import fit_exit_scorer
from exitrl.agents.inputs import FitInputs
from exitrl.agents.registry import get_agent
from exitrl.calibration.per_layer import exit_gains, exit_layers, fit_per_layer_thresholds
from exitrl.evaluation.evaluate import run_policy


def utility(scores, gains, thresholds, cost_weight):
    layers = exit_layers(scores, thresholds)
    cost = cost_weight * layers.double() / scores.shape[1]
    return float((gains[torch.arange(len(layers)), layers - 1] - cost).mean())


@pytest.mark.parametrize("cost_weight", [0.0, 0.1, 0.5, 2.0])
def test_search_matches_brute_force(cost_weight):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(120, 3, generator=g)
    gains = (torch.rand(120, 3, generator=g) < 0.3 + 0.5 * scores).double()
    thresholds, objective = fit_per_layer_thresholds(scores, gains, cost_weight)
    candidates = [[float("inf"), *sorted(set(scores[:, layer].tolist()))] for layer in range(2)]
    best = max(utility(scores, gains, torch.tensor([a, b, float("inf")]), cost_weight)
               for a, b in itertools.product(*candidates))
    assert objective == pytest.approx(best, abs=1e-9)
    assert utility(scores, gains, thresholds.double(), cost_weight) == pytest.approx(objective, abs=1e-6)


def test_per_layer_never_loses_to_one_global_threshold():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(500, 5, generator=g) + torch.linspace(0, 0.3, 5)
    gains = (torch.rand(500, 5, generator=g) < scores * 0.8).double()
    for cost_weight in (0.05, 0.3, 1.0):
        _, objective = fit_per_layer_thresholds(scores, gains, cost_weight)
        levels = scores.reshape(-1).unique()
        best_global = max(utility(scores, gains, torch.cat([t.repeat(4), torch.tensor([float("inf")])]), cost_weight)
                          for t in levels[::5])
        assert objective >= best_global - 1e-9


def test_a_larger_cost_weight_exits_earlier():
    trace, _ = synthetic_trace(n=400, num_layers=4, hidden=8)
    spec = get_agent("confidence_per_layer")
    means = []
    for cost_weight in (0.0, 0.2, 4.0):
        options = spec.make_options({"cost_weight": cost_weight})
        policy, _ = fit_per_layer_confidence(options, FitInputs.from_splits(trace))
        means.append(run_policy(policy, trace)[0].float().mean().item())
    assert means[0] >= means[1] >= means[2] and means[2] == 1.0


@pytest.mark.parametrize("features", ["history", "full"])
def test_exit_scorer_contains_the_per_layer_rule(features):
    trace, _ = synthetic_trace(n=600, num_layers=4, hidden=8, easy_fraction=0.6)
    g = torch.Generator().manual_seed(0)
    trace.logits += torch.randn(trace.logits.shape, generator=g) * 1.5  # confidence no longer says it all
    inputs = FitInputs.from_splits(trace)
    for cost_weight in (0.05, 0.3):
        rule, rule_info = fit_per_layer_confidence(get_agent("confidence_per_layer").make_options(
            {"cost_weight": cost_weight}), inputs)
        scorer, info = fit_exit_scorer(get_agent("exit_scorer").make_options(
            {"cost_weight": cost_weight, "features": features, "steps": 150}), inputs)
        assert max(info["objective_by_blend"].values()) >= rule_info["objective"] - 1e-6  # info rounds to 1e-6
        assert info["objective_by_blend"]["0.0"] == pytest.approx(rule_info["objective"], abs=1e-6)
        if info["blend"] == 0.0:  # the rule itself was best: same exits
            assert torch.equal(run_policy(scorer, trace)[0], run_policy(rule, trace)[0])
    # the synthetic state feature 0 says which rows are easy: the full view must find it and beat the rule
    if features == "full":
        assert info["blend"] > 0 and max(info["objective_by_blend"].values()) > rule_info["objective"]


def test_per_layer_policy_reproduces_its_thresholds():
    trace, _ = synthetic_trace(n=200, num_layers=3, hidden=8)
    thresholds = [0.97, 0.5, float("inf")]
    layers, _ = run_policy(PerLayerConfidencePolicy(thresholds), trace)
    probs = torch.softmax(trace.logits, -1).max(-1).values
    assert torch.equal(layers, exit_layers(probs, torch.tensor(thresholds)))
    assert exit_gains(trace.prediction_table(), trace.labels, "consistency")[:, -1].all()
