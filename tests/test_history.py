"""History features: equal in the single env, the vector env and a live walk's `LayerBatch`; and rich enough that
every fixed rule is a function of one observation."""

from __future__ import annotations

import pytest
import torch

from exitrl.agents.calm import CalmPolicy
from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.patience import PatiencePolicy
from exitrl.core.observation import HISTORY, ObservationLayout, history_table, observation_table
from exitrl.envs import EarlyExitEnv, TraceVectorEnv
from exitrl.evaluation.evaluate import run_policy
from exitrl.policy import ExitPolicy, LayerBatch, Memory
from exitrl.traces.trace import SplitTrace

LAYERS, HIDDEN, CLASSES = 5, 12, 3


@pytest.fixture(scope="module")
def trace() -> SplitTrace:
    g = torch.Generator().manual_seed(3)
    n = 300
    states = torch.randn(n, LAYERS, HIDDEN, generator=g)
    states = (states + 3 * torch.randn(n, 1, HIDDEN, generator=g)).half()  # consecutive layers look alike
    logits = torch.randn(n, LAYERS, CLASSES, generator=g) * 2 + torch.randn(n, 1, CLASSES, generator=g) * 2
    return SplitTrace.from_logits(states, logits, torch.randint(CLASSES, (n,), generator=g))


class Recorder(ExitPolicy):
    """Reads the history, exits rows by a fixed pseudo-random pattern, and remembers what it was shown."""

    uses_history = True

    def __init__(self):
        self.seen: dict[tuple[int, int], torch.Tensor] = {}

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        for row, history in zip(batch.extras["rows"].tolist(), batch.history, strict=True):
            self.seen[(row, batch.layer)] = history
        return (batch.extras["rows"] * 7 + batch.layer) % 5 == 0


def test_history_by_hand(trace):
    table = history_table(trace.states, trace.logits)
    predictions, probs = trace.logits.argmax(-1), torch.softmax(trace.logits, -1)
    max_prob = probs.max(-1).values
    row = 17
    streak = 0
    for layer in range(LAYERS):
        agrees = layer > 0 and predictions[row, layer] == predictions[row, layer - 1]
        streak = streak + 1 if agrees else 0
        expected_cos = 0.0 if layer == 0 else torch.nn.functional.cosine_similarity(
            trace.states[row, layer - 1].float(), trace.states[row, layer].float(), dim=0).item()
        got = dict(zip(HISTORY, table[row, layer].tolist(), strict=True))
        assert got["agrees_with_previous"] == float(agrees) and got["agreement_streak"] == streak
        assert got["min_max_prob"] == pytest.approx(max_prob[row, :layer + 1].min().item())
        assert got["max_max_prob"] == pytest.approx(max_prob[row, :layer + 1].max().item())
        change = 0.0 if layer == 0 else (max_prob[row, layer] - max_prob[row, layer - 1]).item()
        assert got["max_prob_change"] == pytest.approx(change, abs=1e-6)
        assert got["cosine_to_previous"] == pytest.approx(expected_cos, abs=1e-5)


def test_history_is_equal_in_single_env_vector_env_and_live_walk(trace):
    layout = ObservationLayout(HIDDEN, CLASSES)
    table = observation_table(trace.states, trace.logits)
    single = EarlyExitEnv(trace)
    obs, _ = single.reset(seed=0, options={"index": 5})
    for layer in range(LAYERS):
        assert torch.equal(torch.as_tensor(obs), table[5, layer])
        if layer < LAYERS - 1:
            obs, *_ = single.step(0)
    vector = TraceVectorEnv(trace, 4, autoreset=False)
    obs, _ = vector.reset(options={"indices": torch.tensor([0, 1, 2, 3])})
    for layer in range(LAYERS):
        assert torch.equal(obs, table[:4, layer])
        obs, *_ = vector.step(torch.zeros(4, dtype=torch.long))
    recorder = Recorder()
    run_policy(recorder, trace, batch_size=64)  # compaction moves rows between layers: memory must follow them
    assert len(recorder.seen) > len(trace)
    for (row, layer), history in recorder.seen.items():
        assert torch.allclose(history, table[row, layer - 1, layout.history], atol=1e-6), (row, layer)


def exits_of(rule, trace: SplitTrace) -> torch.Tensor:
    """First layer where ``rule(observation)`` holds (the last layer at the latest)."""
    table = observation_table(trace.states, trace.logits)
    decide = rule(table)  # [N, L]
    decide[:, -1] = True
    return decide.int().argmax(1) + 1


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_confidence_is_a_function_of_one_observation(trace, threshold):
    layout = ObservationLayout(HIDDEN, CLASSES)
    layers, _ = run_policy(ConfidencePolicy(threshold), trace)
    assert torch.equal(layers, exits_of(lambda obs: obs[..., layout.max_prob] >= threshold, trace))


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_is_a_function_of_one_observation(trace, patience):
    layout = ObservationLayout(HIDDEN, CLASSES)
    streak = layout.history_index("agreement_streak")
    layers, _ = run_policy(PatiencePolicy(patience), trace)
    assert 1 < layers.float().mean() < LAYERS  # the rule really exits some rows early and keeps others
    assert torch.equal(layers, exits_of(lambda obs: obs[..., streak] >= patience, trace))


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.97])
def test_saturation_is_a_function_of_one_observation(trace, threshold):
    layout = ObservationLayout(HIDDEN, CLASSES)
    cosine = layout.history_index("cosine_to_previous")
    layers, _ = run_policy(CalmPolicy("saturation", threshold), trace)
    assert 1 < layers.float().mean() < LAYERS
    rule = lambda obs: (obs[..., layout.position] > 1 / LAYERS + 1e-6) & (obs[..., cosine] >= threshold)  # noqa: E731
    assert torch.equal(layers, exits_of(rule, trace))
