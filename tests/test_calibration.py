"""Calibration pinned to independent computations: the Hoeffding–Bentkus p-value (scipy), the Learn-then-Test walk,
FREE's Beta-mixture threshold (scipy's Beta density), per-exit temperatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.calibration import (
    TemperatureScaledPolicy,
    beta_mixture_threshold,
    binomial_cdf,
    fit_beta_moments,
    fit_temperatures,
    hoeffding_bentkus_pvalue,
    learn_then_test,
)
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import load_policy
from exitrl.traces.trace import SplitTrace


def reference_pvalue(risk: float, n: int, delta: float) -> float:
    a = min(risk, delta)
    h1 = (a * np.log(a / delta) if a > 0 else 0.0) + (1 - a) * np.log((1 - a) / (1 - delta))
    return min(1.0, np.exp(-n * h1), np.e * stats.binom.cdf(np.ceil(round(n * risk, 9)), n, delta))  # n·R is a count


@pytest.mark.parametrize(("risk", "n", "delta"), [(0.02, 100, 0.1), (0.0, 50, 0.05), (0.07, 400, 0.1),
                                                  (0.1, 1000, 0.1), (0.3, 30, 0.1), (0.049, 3000, 0.05)])
def test_hoeffding_bentkus_pvalue_matches_scipy(risk, n, delta):
    assert hoeffding_bentkus_pvalue(risk, n, delta) == pytest.approx(reference_pvalue(risk, n, delta), rel=1e-9)


def test_pvalue_worked_by_hand():
    # n = 100, R = 0.02, delta = 0.1: Hoeffding exp(-100 * h1(0.02, 0.1)) = exp(-5.1266) = 0.005937;
    # Bentkus e * P(Bin(100, 0.1) <= 2) = e * 0.001945 = 0.005287 -> the smaller one
    by_hand = math.e * sum(math.comb(100, k) * 0.1 ** k * 0.9 ** (100 - k) for k in range(3))
    assert hoeffding_bentkus_pvalue(0.02, 100, 0.1) == pytest.approx(by_hand, rel=1e-9)
    assert by_hand == pytest.approx(0.005287, abs=1e-6)
    assert binomial_cdf(2, 100, 0.1) == pytest.approx(stats.binom.cdf(2, 100, 0.1), rel=1e-10)
    assert hoeffding_bentkus_pvalue(0.5, 100, 0.1) == 1.0  # far above delta: no evidence at all


def test_learn_then_test_stops_at_the_first_failure():
    walk = learn_then_test([0.0, 0.01, 0.05, 0.2, 0.0], n=1000, delta=0.1, epsilon=0.05)
    assert walk.index == 2 and walk.certified  # index 4 would pass but the fixed sequence stopped at 3
    assert len(walk.pvalues) == 4 and walk.pvalues[3] > 0.05 >= max(walk.pvalues[:3])
    assert not learn_then_test([0.3, 0.0], n=1000, delta=0.1, epsilon=0.05).certified
    with pytest.raises(ValueError, match="epsilon"):
        learn_then_test([0.0], 10, 0.1, 1.5)


def reference_threshold(confidence: np.ndarray, agrees: np.ndarray, zeta: float) -> float:
    """Written from the method's description with numpy/scipy only."""
    def moments(x):
        m, v = x.mean(), x.var()
        c = m * (1 - m) / v - 1
        return m * c, (1 - m) * c

    a1, b1 = moments(confidence[agrees])
    a0, b0 = moments(confidence[~agrees])
    w = agrees.mean()
    grid = np.linspace(0.3, 0.9, 10)
    p1 = w * stats.beta.pdf(grid, a1, b1)
    p0 = (1 - w) * stats.beta.pdf(grid, a0, b0)
    count = int((p1 / (p1 + p0) > zeta).sum())
    return float(grid[int(np.clip(10 - count, 0, 9))])


def test_beta_mixture_threshold_on_a_constructed_sample():
    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.beta(8, 2, 300), rng.beta(3, 3, 100)])  # agreeing rows are surer
    agrees = np.concatenate([np.ones(300, bool), np.zeros(100, bool)])
    for zeta in (0.4, 0.7, 0.9):
        ours = beta_mixture_threshold(torch.tensor(confidence), torch.tensor(agrees), zeta)
        assert ours == pytest.approx(reference_threshold(confidence, agrees, zeta))
    # a stricter posterior requirement can only raise the threshold
    assert beta_mixture_threshold(torch.tensor(confidence), torch.tensor(agrees), 0.9) >= beta_mixture_threshold(
        torch.tensor(confidence), torch.tensor(agrees), 0.4)
    fit = fit_beta_moments(torch.tensor([0.2, 0.4, 0.6]))  # mean 0.4, var 0.02667: c = 8, a = 3.2, b = 4.8
    assert (fit.a, fit.b) == (pytest.approx(3.2), pytest.approx(4.8))
    ones = torch.ones(5, dtype=torch.bool)
    assert beta_mixture_threshold(torch.rand(5), ones) == pytest.approx(0.3)  # everything agrees: loosest
    assert beta_mixture_threshold(torch.rand(5), ~ones) == pytest.approx(0.9)


def test_temperatures_recover_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 2, 3, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true_logits[:, 0], -1), 1, generator=g).squeeze(1)
    shown = torch.stack([true_logits[:, 0] * 3.0, true_logits[:, 0] * 0.5], 1)  # over- and under-confident heads
    temperatures = fit_temperatures(shown, labels)
    assert temperatures[0] == pytest.approx(3.0, rel=0.08) and temperatures[1] == pytest.approx(0.5, rel=0.08)


def test_temperature_scaled_rule_exits_where_worked_out(tmp_path):
    # one row, 3 layers, logits (2, 0): p = 0.881 at T = 1; at T = 2, (1, 0): p = 0.731; at T = 0.5, (4, 0): 0.982
    logits = torch.tensor([[[2.0, 0.0]] * 3])
    trace = SplitTrace.from_logits(torch.zeros(1, 3, 4), logits, torch.tensor([0]))
    assert run_policy(ConfidencePolicy(0.85), trace)[0].tolist() == [1]
    scaled = TemperatureScaledPolicy(ConfidencePolicy(0.85), [2.0, 2.0, 0.5])
    assert run_policy(scaled, trace)[0].tolist() == [3]  # layers 1-2 drop to 0.731, layer 3 is last anyway
    scaled = TemperatureScaledPolicy(ConfidencePolicy(0.95), [2.0, 0.5, 1.0])
    assert run_policy(scaled, trace)[0].tolist() == [2]
    scaled.save(tmp_path / "t.pt")
    loaded = load_policy(tmp_path / "t.pt")
    assert isinstance(loaded, TemperatureScaledPolicy) and loaded.temperatures.tolist() == [2.0, 0.5, 1.0]
    assert run_policy(loaded, trace)[0].tolist() == [2]
