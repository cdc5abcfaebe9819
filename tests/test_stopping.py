"""The optimal-stopping agent (CPU, planted traces): it recovers the stopping rule brute force finds where a
confidence rule cannot (a hopeless example and a fixable one look equally unsure), it is the max-prob rule when its
gain is max-prob and its continuation a constant, and one fit moves along the trade-off with λ."""

from __future__ import annotations

import itertools

import pytest
import torch

from exitrl.agents.inputs import FitInputs
from exitrl.agents.stopping import StoppingConfig, StoppingPolicy, fit_stopping
from exitrl.calibration.per_layer import exit_layers, fit_per_layer_thresholds
from exitrl.evaluation.evaluate import run_policy
from exitrl.traces.trace import SplitTrace

EASY, FIXABLE, HOPELESS = 0, 1, 2


def planted(n: int = 1200, seed: int = 0) -> tuple[SplitTrace, torch.Tensor]:
    """Three layers. Easy rows: every head right and sure. Fixable rows: layers 1-2 wrong and unsure, layer 3 right.
    Hopeless rows: every head wrong, layers 1-2 exactly as unsure as a fixable row's. State feature 0 tells the
    kind (what a learner can read and max-prob cannot)."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(3, (n,), generator=g)
    labels = torch.randint(2, (n,), generator=g)
    sign = torch.where(labels == 1, 1.0, -1.0)
    states = torch.randn(n, 3, 8, generator=g) * 0.3
    states[:, :, 0] += torch.tensor([2.0, 0.0, -2.0])[kind][:, None]
    logits = torch.zeros(n, 3, 2)
    strength = torch.tensor([[3.0, 3.0, 3.0], [-0.5, -0.5, 3.0], [-0.5, -0.5, -3.0]])[kind]  # + right, − wrong
    logits[:, :, 1] = strength * sign[:, None]
    return SplitTrace.from_logits(states, logits, labels), kind


def value_of(exits: torch.Tensor, trace: SplitTrace, lam: float) -> float:
    """Mean (correct at the exit) − λ · exit / L."""
    correct = (trace.prediction_table() == trace.labels[:, None]).float()
    rows = torch.arange(len(trace))
    return float((correct[rows, exits - 1] - lam * exits / trace.num_layers).mean())


def brute_force(trace: SplitTrace, kind: torch.Tensor, lam: float) -> tuple[dict[int, int], float]:
    """The best of every policy that decides by kind at layers 1 and 2: its exit layer per kind, and its value."""
    best = None
    for first, second in itertools.product(itertools.product([False, True], repeat=3), repeat=2):
        by_kind = {k: 1 if first[k] else 2 if second[k] else 3 for k in range(3)}
        exits = torch.tensor([by_kind[int(k)] for k in kind])
        value = value_of(exits, trace, lam)
        if best is None or value > best[1] + 1e-12:
            best = (by_kind, value)
    return best


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_it_recovers_the_brute_force_stopping_rule_where_max_prob_cannot(lam):
    trace, kind = planted()
    test, test_kind = planted(seed=1)
    optimal, optimum = brute_force(test, test_kind, lam)
    # cheap layers: the fixable go to the end, the easy and the hopeless leave at once; dear ones: all leave at once
    assert optimal == ({EASY: 1, FIXABLE: 3, HOPELESS: 1} if lam == 0.3 else {EASY: 1, FIXABLE: 1, HOPELESS: 1})
    policy, info = fit_stopping(StoppingConfig(cost_weight=lam, features="state", steps=200),
                                FitInputs.from_splits(trace))
    exits, _ = run_policy(policy, test)
    for k in (EASY, FIXABLE, HOPELESS):
        assert (exits[test_kind == k] == optimal[k]).float().mean() > 0.95, (k, exits[test_kind == k].unique())
    assert value_of(exits, test, lam) >= optimum - 0.01
    # the best per-layer max-prob thresholds, fitted on the test rows themselves, still cannot tell the hopeless
    # from the fixable
    correct = (test.prediction_table() == test.labels[:, None]).float()
    max_prob = test.observations()[..., policy.layout.max_prob]
    _, rule_value = fit_per_layer_thresholds(max_prob, correct, lam)
    if lam == 0.3:
        assert value_of(exits, test, lam) > rule_value + 0.02
    assert info["fitted_on"] == "train" and set(info["stop_share_by_layer"]) == {1, 2}


def test_with_max_prob_gain_and_a_constant_continuation_it_is_the_max_prob_rule():
    trace, _ = planted(n=300, seed=2)
    lam, constant = 0.3, 0.55
    policy = StoppingPolicy(3, 8, 2, features="state", gain_model="max_prob", cost_weight=lam)
    with torch.no_grad():
        for nets in policy.module:
            for mlp in nets.value.mlps:  # future gain: the constant; future depth: none (λ drops out)
                mlp[-1].weight.zero_()
                mlp[-1].bias.copy_(torch.tensor([torch.logit(torch.tensor(constant)).item(), -1e4]))
    exits, _ = run_policy(policy, trace)
    max_prob = trace.observations()[..., policy.layout.max_prob]
    thresholds = torch.tensor([constant + lam * layer / 3 for layer in (1, 2, 3)])
    assert torch.equal(exits, exit_layers(max_prob, thresholds))
    assert len(exits.unique()) >= 2  # the comparison saw exits at more than one layer


def test_one_fit_moves_along_the_trade_off_with_the_cost_weight():
    trace, _ = planted(seed=3)
    policy, _ = fit_stopping(StoppingConfig(cost_weight=0.1, features="state", steps=150),
                             FitInputs.from_splits(trace))
    means = []
    for lam in (0.0, 0.1, 0.4, 0.8):
        policy.cost_weight = lam
        means.append(float(run_policy(policy, trace)[0].float().mean()))
    assert all(a >= b - 0.02 for a, b in zip(means, means[1:])), means
    assert means[0] > means[-1] + 0.3, means


def test_bad_options_are_refused_with_the_key():
    for values, key in (({"gain": "accuracy"}, "agent.gain"), ({"gain_model": "oracle"}, "agent.gain_model"),
                        ({"cost_weight": -1.0}, "agent.cost_weight"), ({"folds": 0}, "agent.folds"),
                        ({"train_costs": [-0.1]}, "agent.train_costs"), ({"steps": 0}, "agent.steps")):
        with pytest.raises(ValueError, match=key):
            StoppingConfig(**values)
    trace, _ = planted(n=3)
    with pytest.raises(ValueError, match="at least 4 rows"):
        fit_stopping(StoppingConfig(), FitInputs.from_splits(trace))
