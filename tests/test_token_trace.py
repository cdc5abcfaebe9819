"""Token traces: a causal LM's exits per teacher-forced position, kept without the vocabulary, and every env,
rule, reward and agent running on them unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env

from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.core.observation import ObservationLayout, confidence_measure, summarize_token_logits
from exitrl.data.lm_text import pack
from exitrl.envs import EarlyExitEnv, TraceVectorEnv
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds, oracle_exit_layers, run_policy
from exitrl.experiments.pipeline import AgentRun
from exitrl.rewards import RewardSpec
from exitrl.traces.tokens import build_token_split, state_projection
from exitrl.traces.trace import Trace

TEXT = ["the good film was great", "the bad movie was awful", "she said it was a good story",
        "they were not good and not bad", "he has a film", "we will see the movie"] * 6


def test_a_hand_made_exit_is_summarized_exactly():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.1, 0.05], [0.25, 0.25, 0.2, 0.1, 0.1, 0.1]])
    compact, token = summarize_token_logits(probs.log(), k=2)
    torch.testing.assert_close(compact.exp(), torch.tensor([[0.5, 0.2, 0.3], [0.25, 0.25, 0.5]]))
    assert token.predictions.tolist()[0] == 1 and token.predictions.tolist()[1] in (0, 1)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(token.entropy, entropy)
    # what the confidence measures read: the top k, exactly; the rest's 0.3 / 0.5 is not one token's probability
    torch.testing.assert_close(confidence_measure(compact, "maxprob", token), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(confidence_measure(compact, "margin", token), torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(confidence_measure(compact, "entropy", token), entropy)


@pytest.fixture(scope="module")
def lm_trace(tiny_llama):
    model, tokenizer = load_multi_exit_lm(str(tiny_llama))
    chunks = pack(tokenizer, TEXT, 10)
    return model, chunks, build_token_split(model, chunks, k=4, state_dim=8, batch_size=3)


def test_the_token_trace_holds_each_exits_own_numbers(lm_trace):
    model, chunks, split = lm_trace
    n = len(chunks) * 9
    assert (len(split), split.num_layers, split.num_classes, split.hidden_size) == (n, 3, 5, 8)
    ids = torch.tensor([c["input_ids"] for c in chunks])
    projection = state_projection(32, 8)
    with torch.no_grad():
        states = model.layer_states(ids)
        for layer in range(3):
            full = model.exit_logits(layer, states[layer][:, :-1]).reshape(n, -1)
            log_probs = torch.log_softmax(full, -1)
            assert torch.equal(split.prediction_table()[:, layer], full.argmax(-1))
            torch.testing.assert_close(split.label_log_probs[:, layer],
                                       log_probs.gather(1, ids[:, 1:].reshape(-1, 1)).squeeze(1))
            torch.testing.assert_close(split.entropy[:, layer], -(log_probs.exp() * log_probs).sum(-1))
            torch.testing.assert_close(split.logits[:, layer, :4], log_probs.topk(4, -1).values)
            torch.testing.assert_close(split.states[:, layer].float(),
                                       (states[layer][:, :-1].reshape(n, -1) @ projection).half().float())
    assert torch.equal(split.labels, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(split.logits.exp().sum(-1), torch.ones(n, 3))
    correct = split.prediction_table() == split.labels[:, None]
    for row in range(n):  # the memorized layer: the first layer from which every exit is right
        m = int(split.memorized[row])
        assert correct[row, m - 1:].all() or (m == 3 and not correct[row, -1])
        assert m == 1 or not correct[row, m - 2:].all()
    preds = split.prediction_table()
    first_agreeing = [next(i for i in range(3) if preds[r, i] == preds[r, -1]) + 1 for r in range(n)]
    assert oracle_exit_layers(split, "consistency").tolist() == first_agreeing
    assert oracle_bounds(split)["full_model"]["score"] == pytest.approx(float(correct[:, -1].float().mean()))


def test_envs_and_their_checkers_run_on_a_token_trace(lm_trace):
    _, _, split = lm_trace
    env = EarlyExitEnv(split, RewardSpec("hardness", kwargs={"alpha": 0.01}))
    gym_check_env(env)
    layout = ObservationLayout(split.hidden_size, split.num_classes)
    obs, _ = env.reset(seed=0)
    index = env._index
    assert obs[layout.max_prob] == pytest.approx(math.exp(float(split.logits[index, 0, 0])), rel=1e-5)
    assert obs[layout.entropy] == pytest.approx(float(split.entropy[index, 0]), rel=1e-5)
    vector = TraceVectorEnv(split, 16, "consistency")
    vector.reset(seed=0)
    _, reward, done, _, info = vector.step(torch.ones(16, dtype=torch.long))  # everyone exits at layer 1
    rows = info["index"]
    agrees = split.prediction_table()[rows, 0] == split.prediction_table()[rows, -1]
    torch.testing.assert_close(reward, agrees.float() - 0.02)
    assert done.all()
    torchrl = pytest.importorskip("torchrl")
    from torchrl.envs.utils import check_env_specs

    from exitrl.envs.torchrl_env import TorchRLEarlyExitEnv

    assert torchrl is not None
    check_env_specs(TorchRLEarlyExitEnv(split, 8, "vanilla"))


def test_rules_read_token_exits_exactly(lm_trace):
    _, _, split = lm_trace
    trace = Trace({"train": split, "dev": split, "policy": split})
    top1 = split.logits[..., 0].exp()
    for threshold in (0.05, 0.1, 0.2):
        fitted = AgentRun.create("confidence", {"threshold": threshold}).fit(trace, torch.device("cpu"))
        expected = torch.where((top1[:, :-1] >= threshold).any(1), (top1[:, :-1] >= threshold).int().argmax(1) + 1,
                               split.num_layers).float().mean()
        assert evaluate_policy(fitted.policy, split)["avg_exit_layer"] == pytest.approx(float(expected))
    for rule in ("free", "confidence", "calm"):
        with pytest.raises(ValueError, match="top k only"):
            AgentRun.create(rule, {"temperature": True}).fit(trace, torch.device("cpu"))


@pytest.mark.parametrize("agent,options", [
    ("reinforce", {"epochs": 2, "batch_size": 8}), ("bandit_ucb", {"rounds": 500}),
    ("bandit_thompson", {"rounds": 500}), ("linucb", {"rounds": 500}), ("exit_scorer", {"steps": 20}),
    ("ppo", {"total_timesteps": 512, "n_envs": 2, "n_steps": 64, "batch_size": 64, "eval_every": 256}),
    ("ppo_torchrl", {"total_frames": 1024, "num_envs": 32, "frames_per_batch": 512, "minibatch_size": 256}),
    ("static", {"layer": 2}), ("patience", {"patience": 1}), ("calm", {"delta": 0.3}), ("free", {}),
    ("confidence_per_layer", {}), ("lte", {}), ("oracle", {}),
])
def test_every_agent_fits_and_is_evaluated_on_a_token_trace(lm_trace, agent, options):
    if agent == "ppo_torchrl":
        pytest.importorskip("torchrl")
    _, _, split = lm_trace
    trace = Trace({"train": split, "dev": split, "policy": split})
    fitted = AgentRun.create(agent, options, "consistency").fit(trace, torch.device("cpu"))
    result = evaluate_policy(fitted.policy, split)
    layers, predictions = run_policy(fitted.policy, split)
    rows = torch.arange(len(split))
    assert torch.equal(predictions, split.prediction_table()[rows, layers - 1])  # the exit layer's token, emitted
    assert result["score"] == pytest.approx(float((predictions == split.labels).float().mean()))
    assert result["avg_exit_layer"] == pytest.approx(float(layers.float().mean()))
    assert result["disagreement"] == pytest.approx(
        float((predictions != split.prediction_table()[:, -1]).float().mean()))
