"""CALM, FREE and the engine's pieces on tiny random LMs (CPU): hand-built cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from test_decoding import prompts
from test_multi_exit_lm import FAMILIES, tiny_lm

from exitrl.agents.free import FreePolicy
from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import (
    calibrate_calm,
    calm_decoding,
    decaying_threshold,
    free_decoding,
    greedy,
    perplexity,
    policy_decoding,
    rouge_l,
)


def sharpened(model: MultiExitLM, scale: float = 40.0) -> MultiExitLM:
    """A random model's exits are nearly flat; a larger LM head makes confidences spread over (0, 1) without
    changing any argmax."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keys_and_values_alone_equal_what_the_whole_layer_writes(family):
    assert MultiExitLM(tiny_lm(family)).keys_values_exact


def test_rouge_l_and_perplexity_on_hand_built_cases():
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [5, 6]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([1], []) == 0.0
    # LCS of (1 2 3 4) and (1 3 4 5 6) is 1 3 4: P = 3/4, R = 3/5
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5, 6]) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    model = MultiExitLM(tiny_lm("llama", seed=1))
    ids = torch.randint(3, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model.lm(input_ids=ids, labels=ids).loss  # mean NLL of tokens 2..9 given their prefixes
    assert perplexity(model, ids[:, :1], None, [ids[0, 1:].tolist()]) == pytest.approx(math.exp(float(loss)), 1e-5)
    # a left-padded prompt gives the same number as the unpadded one
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, :1]], 1)
    mask = torch.tensor([[0, 0, 0, 1]])
    assert perplexity(model, padded, mask, [ids[0, 1:].tolist()]) == pytest.approx(math.exp(float(loss)), 1e-4)


def test_prompts_padded_on_the_right_are_refused():
    model = MultiExitLM(tiny_lm("llama"))
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match="left-padded"):
        greedy(model, ids, mask.flip(1), 4)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no token"):
        free_decoding(model, ids, empty, 4, shallow_layer=1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        calm_decoding(model, ids, mask, 0)


def test_calms_threshold_decays_as_in_the_paper():
    assert decaying_threshold(0.8, 0, 10) == pytest.approx(0.9 * 0.8 + 0.1)
    assert decaying_threshold(0.8, 5, 10) == pytest.approx(0.72 + 0.1 * math.exp(-2.0))
    assert decaying_threshold(1.0, 0, 10) == 1.0  # clipped
    assert decaying_threshold(0.0, 10, 10) == pytest.approx(0.1 * math.exp(-4.0))


def test_calm_at_its_extremes_is_the_full_model_or_the_first_exit():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=7)))
    ids, mask = prompts(3, seed=4)
    full = greedy(model, ids, mask, 10).tokens
    never = calm_decoding(model, ids, mask, 10, threshold=1.0, decay=False)  # a margin never reaches 1 here
    assert torch.equal(never.tokens, full) and never.accepted == 0 and (never.exit_layers == 3).all()
    first = calm_decoding(model, ids, mask, 10, threshold=0.0, decay=False)  # every token leaves at layer 1
    assert (first.exit_layers[:, 1:] == 1).all() and first.accepted == 3 * 9 * 2
    static = policy_decoding(model, StaticPolicy(1), ids, mask, 10, propagation="copy")
    assert torch.equal(first.tokens, static.tokens)
    # in between: exits spread over the layers, and each token is its exit layer's greedy token
    middle = calm_decoding(model, ids, mask, 10, threshold=0.5, decay=True)
    layers = middle.exit_layers[:, 1:]
    assert 0 < middle.accepted < 3 * 9 * 2 and len(layers.unique()) >= 2
    saturation = calm_decoding(model, ids, mask, 10, threshold=0.0, measure="saturation", decay=False)
    assert (saturation.exit_layers[:, 1:] == 2).all()  # no previous state at layer 1: the first exit is layer 2


def test_calm_recompute_leaves_the_full_models_cache_and_copy_does_not():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=8)))
    ids, mask = prompts(2, seed=5)
    copied = calm_decoding(model, ids, mask, 8, threshold=0.3, propagation="copy")
    recomputed = calm_decoding(model, ids, mask, 8, threshold=0.3, propagation="recompute")
    assert copied.accepted > 0 and recomputed.accepted > 0
    # recompute: the cache equals a teacher-forced full pass over prompt + produced tokens
    sequence = torch.cat([ids, recomputed.tokens[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones_like(recomputed.tokens[:, :-1])], 1)
    with torch.no_grad():
        own = model.lm(input_ids=sequence, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    cache = recomputed.info["cache"]
    keep = full_mask.bool()
    own_cache = own.past_key_values if hasattr(own, "past_key_values") else own.cache
    for layer in range(model.num_layers):
        ours = cache.keys[layer][:, :, :sequence.shape[1]].transpose(1, 2)[keep]
        theirs = own_cache.layers[layer].keys.transpose(1, 2)[keep]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    deep = copied.info["cache"].keys[2][:, :, ids.shape[1]:sequence.shape[1]]
    assert not torch.allclose(deep, cache.keys[2][:, :, ids.shape[1]:sequence.shape[1]])


def test_calm_calibration_certifies_the_loosest_threshold_the_bound_allows():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=9)))
    batches = [prompts(3, seed=s) for s in range(4)]  # 12 calibration prompts
    loose, info = calibrate_calm(model, batches, 8, delta=0.5, epsilon=0.2, candidates=[0.99, 0.9, 0.6, 0.3, 0.0])
    assert info["n"] == 12 and len(info["risks"]) == len(info["pvalues"]) >= 1
    if loose is not None:  # every accepted candidate passed the test, and the next one (if run) did not
        index = info["candidates"].index(loose)
        assert all(p <= 0.2 for p in info["pvalues"][:index + 1])
        assert index == len(info["pvalues"]) - 1 or info["pvalues"][index + 1] > 0.2
    strict, strict_info = calibrate_calm(model, batches, 8, delta=0.01, epsilon=0.05, candidates=[0.0])
    assert strict is None and strict_info["risks"][0] > 0  # exiting every token at layer 1 is never certified
    assert info["risks"][0] <= info["risks"][-1]


def test_free_with_a_never_confident_shallow_exit_is_the_full_model():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=10)))
    ids, mask = prompts(3, seed=6)
    out = free_decoding(model, ids, mask, 10, shallow_layer=1, threshold=1.01, adaptive=False)
    assert torch.equal(out.tokens, greedy(model, ids, mask, 10).tokens)
    assert out.steps == 10 and out.accepted == 0


@pytest.mark.parametrize("max_pending", [1, 3, 20])
def test_free_synchronized_decoding_fills_the_deep_cache_exactly(max_pending):
    """Always confident: every token comes from the shallow exit; the deep layers run only every ``max_pending``
    tokens, on the stacked waiting states. Their cache must equal the one of a run whose deep layers ran at every
    token (the skipped layers recomputed), and so must the tokens."""
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=11)))
    ids, mask = prompts(2, seed=7)
    out = free_decoding(model, ids, mask, 12, shallow_layer=1, threshold=0.0, adaptive=False,
                        max_pending=max_pending)
    reference = policy_decoding(model, StaticPolicy(1), ids, mask, 12, propagation="recompute")
    assert torch.equal(out.tokens, reference.tokens)
    assert out.steps == 1 + 11 // max_pending  # the prefill and the forced deep passes
    assert (out.exit_layers[:, 1:] == 1).all()


def test_free_refits_its_threshold_from_the_pairs_of_every_deep_pass():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=12)))
    ids, mask = prompts(3, seed=8)
    policy = FreePolicy(shallow_layer=1, threshold=0.5, refit_every=6)
    out = free_decoding(model, ids, mask, 16, policy=policy, max_pending=4)
    # one pair per row and position a deep pass covered: every generated token but those still waiting at the end
    covered = policy.agrees.numel()
    assert covered % 3 == 0 and 3 * (out.steps - 1) <= covered <= 3 * 15
    assert policy.confidence.numel() == covered
    assert policy.refits >= 1 and len(out.info["thresholds"]) == out.steps
    assert all(0.3 <= t <= 0.9 for t in out.info["thresholds"][1:])  # FREE's grid


def test_a_decider_that_reads_no_logits_gets_the_exit_head_once_per_token_with_the_same_tokens():
    from exitrl.agents.calm import CalmPolicy
    from exitrl.decoding.calm import CalmDecider
    from exitrl.decoding.per_token import per_token_decoding

    model = sharpened(MultiExitLM(tiny_lm("llama", seed=14)))
    ids, mask = prompts(3, seed=10)
    runs = []
    for per_layer_head in (False, True):
        decider = CalmDecider(CalmPolicy("saturation"), 0.98, model, 10, ids.device, decay=False)
        assert decider.needs_logits is False
        decider.needs_logits = per_layer_head  # the slow path: the head at every layer, as the margin needs
        runs.append(per_token_decoding(model, decider, ids, mask, 10))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].exit_layers, runs[1].exit_layers)
    assert 2 < float(runs[0].exit_layers[:, 1:].float().mean()) < 3  # some tokens left at layer 2



@pytest.mark.parametrize("propagation,measure", [("copy", "margin"), ("recompute", "margin"),
                                                 ("copy", "saturation")])
def test_exits_restricted_to_some_layers_equal_a_decider_that_says_no_elsewhere(propagation, measure):
    from test_multi_exit_lm import SMALL
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exitrl.agents.calm import CalmPolicy
    from exitrl.decoding.calm import CalmDecider
    from exitrl.decoding.per_token import Decider, per_token_decoding

    class OnlyAt(Decider):
        """The reference: every layer runs its head and asks, and the answer is no outside ``layers``."""

        def __init__(self, inner: CalmDecider, layers: set[int]):
            self.inner, self.layers = inner, layers
            self.graph_safe, self.first_exit_layer = inner.graph_safe, inner.first_exit_layer

        def start_token(self, step: int) -> None:
            self.inner.start_token(step)

        def decide(self, index, states, logits, previous):
            return self.inner.decide(index, states, logits, previous) & (index + 1 in self.layers)

    torch.manual_seed(15)
    config = LlamaConfig(**{**SMALL, "num_hidden_layers": 7})
    model = sharpened(MultiExitLM(AutoModelForCausalLM.from_config(config).eval()))
    ids, mask = prompts(3, seed=11)
    threshold = 0.6 if measure == "margin" else 0.98
    for layers in ([3, 5], [2, 4, 6], [6]):
        decider = CalmDecider(CalmPolicy(measure), threshold, model, 12, ids.device)
        restricted = per_token_decoding(model, decider, ids, mask, 12, propagation, exit_layers=layers)
        reference = per_token_decoding(model, OnlyAt(decider, set(layers)), ids, mask, 12, propagation)
        assert torch.equal(restricted.tokens, reference.tokens), layers
        assert torch.equal(restricted.exit_layers, reference.exit_layers), layers
        assert set(restricted.exit_layers.unique().tolist()) <= set(layers) | {7}
        written = ids.shape[1] + 11  # the prompt and every generated token but the last
        for layer in range(7):
            torch.testing.assert_close(restricted.info["cache"].keys[layer][:, :, :written],
                                       reference.info["cache"].keys[layer][:, :, :written], rtol=0, atol=1e-5)
    spread = calm_decoding(model, ids, mask, 12, threshold=threshold, measure=measure, propagation=propagation,
                           exit_layers=[2, 4, 6])
    assert len(spread.exit_layers[:, 1:].unique()) >= 2  # the check above compared exits that happened
    # every token leaves at the first allowed layer: the static rule there
    first = calm_decoding(model, ids, mask, 12, threshold=0.0, decay=False, exit_layers=[4, 6])
    static = policy_decoding(model, StaticPolicy(4), ids, mask, 12)
    assert (first.exit_layers[:, 1:] == 4).all() and torch.equal(first.tokens, static.tokens)
    for bad in ([0], [8], [2.0], [True], []):
        with pytest.raises(ValueError, match="exit_layers"):
            calm_decoding(model, ids, mask, 4, exit_layers=bad)
