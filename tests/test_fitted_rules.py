"""CALM, FREE, BERxiT learn-to-exit and the oracles: hand-worked decisions, calibration that keeps its promise on
fresh data, persistence, and their options through the registry."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_trace

from exitrl.agents.calm import CalmConfig, CalmPolicy, fit_calm, score_table
from exitrl.agents.free import FreeConfig, FreePolicy, default_shallow_layer, fit_free
from exitrl.agents.inputs import FitInputs
from exitrl.agents.lte import LteConfig, fit_lte
from exitrl.agents.oracle import OraclePolicy
from exitrl.agents.registry import check_agent, needs_held_out
from exitrl.calibration import beta_mixture_threshold
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds, run_policy
from exitrl.policy import load_policy
from exitrl.traces.trace import SplitTrace


def noisy_trace(n: int, seed: int, num_layers: int = 4) -> SplitTrace:
    """Heads get surer and more often agree with the last one as depth grows; margin tracks agreement loosely."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    sign = torch.where(labels == 1, 1.0, -1.0)
    logits = torch.zeros(n, num_layers, 2)
    for layer in range(num_layers):
        strength = 0.5 + layer + torch.randn(n, generator=g)
        logits[:, layer, 1] = sign * strength + torch.randn(n, generator=g) * 1.5
    states = torch.randn(n, num_layers, 8, generator=g)
    return SplitTrace.from_logits(states, logits, labels)


def test_saturation_memory_follows_rows_that_leave_at_different_layers():
    # cos to the previous state: row 0 = 1.0 at layer 2; row 1 = 0.0 then 1.0 at layer 3; row 2 = 0.0, 0.0, 0.0
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    states = torch.tensor([[e1, e1, e2, e1], [e1, e2, e2, e1], [e1, e2, e1, e2]])
    trace = SplitTrace.from_logits(states, torch.zeros(3, 4, 2), torch.tensor([0, 0, 0]))
    for batch_size in (3, 2, 1):
        assert run_policy(CalmPolicy("saturation", 0.9), trace, batch_size=batch_size)[0].tolist() == [2, 3, 4]


def test_rule_values_are_checked():
    from exitrl.calibration import fit_temperatures

    for bad in ({"zeta": 1.5}, {"max_pairs": 0}, {"shallow_layer": 0}, {"threshold": 2.0}):
        with pytest.raises(ValueError):
            FreeConfig(**bad)
    with pytest.raises(ValueError, match="threshold"):
        LteConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="at least one"):
        fit_temperatures(torch.zeros(0, 3, 2), torch.zeros(0, dtype=torch.long))


def test_saturation_is_the_cosine_of_consecutive_states():
    states = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])  # cos: -, 0.7071, 0.7071
    trace = SplitTrace.from_logits(states, torch.zeros(1, 3, 2), torch.tensor([0]))
    table = score_table(CalmPolicy("saturation"), trace)
    assert table[0, 0] == -float("inf")
    torch.testing.assert_close(table[0, 1:], torch.tensor([0.70710678, 0.70710678]))
    assert run_policy(CalmPolicy("saturation", 0.7), trace)[0].tolist() == [2]
    assert run_policy(CalmPolicy("saturation", 0.71), trace)[0].tolist() == [3]
    assert run_policy(CalmPolicy("margin", None), trace)[0].tolist() == [3]  # nothing certified: never early


@pytest.mark.parametrize("measure", ["margin", "meta"])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_calm_certificate_holds_on_fresh_data(measure, delta):
    torch.manual_seed(0)  # the meta classifier's initialisation: not whatever the worker's earlier tests left
    train, calibration, fresh = noisy_trace(4000, 0), noisy_trace(3000, 1), noisy_trace(20000, 2)
    policy, info = fit_calm(CalmConfig(measure=measure, delta=delta, meta_epochs=3),
                            FitInputs.from_splits(train, held_out=calibration))
    assert info["certified"] and info["calibration_risk"] <= delta
    result = evaluate_policy(policy, fresh)
    assert result["disagreement"] <= delta  # the promise, on 20k rows from the same distribution
    assert result["saved_layers"] > 0.05  # and it does exit early
    # the certificate is conservative but not vacuous: a looser threshold would break delta on calibration data
    looser = CalmPolicy(measure, info["threshold"] - 0.1, train.hidden_size)
    if measure == "meta":
        looser.meta = policy.meta
    assert evaluate_policy(looser, calibration)["disagreement"] > info["calibration_risk"]


def test_calm_loss_risk_and_temperature_and_persistence(tmp_path):
    train, calibration = noisy_trace(2000, 0), noisy_trace(2000, 1)
    policy, info = fit_calm(CalmConfig(risk="loss", temperature=True, delta=0.05),
                            FitInputs.from_splits(train, held_out=calibration))
    assert info["certified"] and len(info["temperatures"]) == 4 and info["calibration_examples"] == 1000
    policy.save(tmp_path / "calm.pt")
    loaded = load_policy(tmp_path / "calm.pt")
    fresh = noisy_trace(5000, 3)
    torch.testing.assert_close(run_policy(loaded, fresh)[0], run_policy(policy, fresh)[0])
    assert evaluate_policy(loaded, fresh)["loss_increase"] <= 0.05
    with pytest.raises(ValueError, match="data.policy_split"):
        fit_calm(CalmConfig(), FitInputs.from_splits(train))
    with pytest.raises(ValueError, match="margin, saturation, meta"):
        CalmConfig(measure="entropy")


def test_free_exits_only_at_the_shallow_layer_and_refits_online(tmp_path):
    assert default_shallow_layer(6) == 2 and default_shallow_layer(12) == 3 and default_shallow_layer(2) == 1
    a, b = [0.97, 0.03], [0.3, 0.7]
    # shallow max-prob 0.97 / 0.7 / 0.7, rescaled to [0, 1] for two classes: 0.94 / 0.4 / 0.4
    probs = torch.tensor([[a, a, a, a], [b, b, a, a], [a, b, b, b]])
    trace = SplitTrace.from_logits(torch.zeros(3, 4, 2), probs.log(), torch.tensor([0, 0, 1]))
    policy = FreePolicy(shallow_layer=2, threshold=0.9, refit_every=2)
    exits, predictions = run_policy(policy, trace)
    assert exits.tolist() == [2, 4, 4] and predictions.tolist() == [0, 0, 1]
    # rows 1 and 2 went deep: (0.4, shallow 1 vs deep 0: disagree), (0.4, shallow 1 vs deep 1: agree)
    assert policy.confidence.tolist() == pytest.approx([0.4, 0.4]) and policy.agrees.tolist() == [False, True]
    assert policy.refits == 1 and policy.threshold == beta_mixture_threshold(policy.confidence, policy.agrees)
    # by hand: both classes are the single value 0.4 (variance 0: Beta(40, 60) each), weights 1/2 and 1/2, so the
    # posterior of "agrees" is 0.5 > zeta = 0.4 at all 10 grid points: threshold = grid[10 - 10] = 0.3
    assert policy.threshold == pytest.approx(0.3)
    policy.save(tmp_path / "free.pt")
    loaded = load_policy(tmp_path / "free.pt")
    assert loaded.agrees.tolist() == [False, True] and loaded.threshold == policy.threshold


def test_free_confidence_is_rescaled_max_prob():
    from exitrl.agents.free import rescaled_confidence

    two = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.1, 0.9]])
    three = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(rescaled_confidence(two.max(-1).values, 2), torch.tensor([0.0, 0.5, 0.8]))
    torch.testing.assert_close(rescaled_confidence(three.max(-1).values, 3), torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(rescaled_confidence(torch.tensor([0.3]), None), torch.tensor([0.3]))  # a vocabulary


def test_free_fit_uses_shallow_agreement():
    trace, easy = synthetic_trace(n=2000, num_layers=4)
    policy, info = fit_free(FreeConfig(), FitInputs.from_splits(trace))
    assert info["shallow_layer"] == 1 and info["fit_agree_fraction"] == pytest.approx(float(easy.float().mean()))
    assert policy.threshold == beta_mixture_threshold(policy.confidence, policy.agrees)
    fixed, _ = fit_free(FreeConfig(adaptive=False, threshold=0.99, shallow_layer=2), FitInputs.from_splits(trace))
    assert fixed.threshold == 0.99 and set(run_policy(fixed, trace)[0].tolist()) <= {2, 4}
    with pytest.raises(ValueError, match="1..3"):
        fit_free(FreeConfig(shallow_layer=4), FitInputs.from_splits(trace))


def test_learn_to_exit_separates_easy_from_hard(tmp_path):
    train, _ = synthetic_trace(n=3000, num_layers=4, seed=0)
    dev, easy = synthetic_trace(n=1000, num_layers=4, seed=1)
    policy, info = fit_lte(LteConfig(epochs=30), FitInputs.from_splits(train))
    exits = run_policy(policy, dev)[0]
    assert (exits[easy] == 1).float().mean() > 0.8 and (exits[easy] <= 2).float().mean() > 0.97
    assert (exits[~easy] == 4).float().mean() > 0.95
    assert evaluate_policy(policy, dev)["accuracy"] > 0.97
    policy.save(tmp_path / "lte.pt")
    torch.testing.assert_close(run_policy(load_policy(tmp_path / "lte.pt"), dev)[0], exits)


def test_oracle_policies_reproduce_the_bounds_and_refuse_other_splits():
    dev = noisy_trace(500, 4)
    bounds = oracle_bounds(dev)
    for kind in ("consistency", "correctness"):
        oracle = OraclePolicy.for_split(dev, kind)
        result = evaluate_policy(oracle, dev)
        assert not result["deployable"] and not oracle.deployable
        for key in ("score", "avg_exit_layer", "exit_histogram"):
            assert result[key] == bounds[f"{kind}_oracle"][key]
    assert evaluate_policy(OraclePolicy.for_split(dev), dev)["disagreement"] == 0.0
    for other in (noisy_trace(10, 5), noisy_trace(1000, 5)):  # smaller and larger than dev
        with pytest.raises(ValueError, match="split it was built from"):
            run_policy(OraclePolicy.for_split(other), dev)


def test_rule_options_through_the_registry():
    check_agent("calm", {"measure": "saturation", "delta": 0.05})
    check_agent("confidence", {"threshold": 0.8, "temperature": True})
    with pytest.raises(ValueError, match="unknown option"):
        check_agent("free", {"shallow": 2})
    with pytest.raises(ValueError, match="consistency, loss"):
        check_agent("calm", {"risk": "kl"})
    with pytest.raises(ValueError, match="consistency, correctness"):
        check_agent("oracle", {"kind": "best"})
    assert needs_held_out("calm", {}) and not needs_held_out("calm", {"threshold": 0.5})
    assert needs_held_out("confidence", {"temperature": True}) and not needs_held_out("free", {})


def test_learn_on_picks_the_split_agents_learn_from():
    from exitrl.agents.inputs import learn_split

    assert learn_split("auto", True) == "policy" and learn_split("auto", False) == "train"
    assert learn_split("train", True) == "train"
    assert learn_split("held_out", True) == "policy"
    with pytest.raises(ValueError, match="data.policy_split"):
        learn_split("held_out", False)
    with pytest.raises(ValueError, match="auto, train, held_out"):
        learn_split("everything", False)
