"""The engine's cheap exits (CPU, tiny random LMs): the skipped layers' keys and values in one fused step equal
what each layer writes, and segments, read-ahead and the fused fill change no token, exit or cache entry."""

from __future__ import annotations

import pytest
import torch
from test_decoding import prompts
from test_decoding_methods import sharpened
from test_multi_exit_lm import FAMILIES, SMALL, tiny_lm

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import greedy, policy_decoding
from exitrl.decoding.engine import SlotCache
from exitrl.decoding.fused_fill import FusedFill, fused_fill_for
from exitrl.decoding.per_token import exit_points


def with_random_biases(model: MultiExitLM) -> MultiExitLM:
    """Qwen2 starts its key/value biases at zero: random ones make the fused bias path matter."""
    with torch.no_grad():
        for layer in model.layers:
            for name in ("k_proj", "v_proj"):
                bias = getattr(layer.self_attn, name).bias
                if bias is not None:
                    bias.normal_()
            layer.input_layernorm.weight.uniform_(0.5, 1.5)  # a norm weight of ones would hide a missing fold
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral-sliding"])
@torch.no_grad()
def test_the_fused_fill_writes_what_every_layer_writes_alone(family):
    model = with_random_biases(MultiExitLM(tiny_lm(family, seed=3)))
    fill = FusedFill.build(model)
    assert fill is not None
    generator = torch.Generator().manual_seed(4)
    state = torch.randn(3, 1, model.hidden_size, generator=generator)
    ids = torch.randint(model.vocab_size, (3, 1), generator=generator)
    positions, slots = torch.tensor([[4], [2], [7]]), torch.tensor([5])
    for first in range(model.num_layers):
        caches = [SlotCache(8, model.num_layers) for _ in range(2)]
        inputs = []
        for cache in caches:
            cache.slots = slots
            cache.allocate(state.new_zeros(3, fill.kv_heads, 1, fill.head_dim), model.num_layers)
            inputs.append(model.layer_inputs(model.embed_tokens(ids, positions), positions, {}, cache))
        for index in range(first, model.num_layers):
            model.write_keys_values(index, state, inputs[0])
        fill(first, state, inputs[1], slots)
        torch.testing.assert_close(caches[1].key_stack, caches[0].key_stack, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].value_stack, caches[0].value_stack, rtol=1e-5, atol=1e-5)
        assert caches[1].key_stack[:first].abs().sum() == 0  # nothing below the first filled layer
        assert caches[1].key_stack[first:, :, :, 5].abs().sum() > 0  # and every filled layer at its slot


def test_architectures_it_is_not_exact_for_fill_layer_by_layer():
    assert FusedFill.build(MultiExitLM(tiny_lm("gpt2"))) is None


def test_the_fused_fill_is_rebuilt_when_the_weights_change():
    model = MultiExitLM(tiny_lm("llama", seed=5))
    first = fused_fill_for(model)
    assert fused_fill_for(model) is first  # built once
    with torch.no_grad():
        model.layers[1].self_attn.k_proj.weight.mul_(2.0)  # an optimizer step updates in place, like this
    again = fused_fill_for(model)
    assert again is not first
    assert torch.equal(again.weight[1, :again.kv_heads * again.head_dim], 2 * first.weight[1, :first.kv_heads *
                                                                                            first.head_dim])


def test_a_static_rule_stops_only_at_its_layer_and_the_last():
    class Never(StaticPolicy):
        graph_safe = False  # a decider with memory is asked at every allowed layer

    from exitrl.decoding.per_token import PolicyDecider

    static = PolicyDecider(StaticPolicy(3), 6)
    assert exit_points(frozenset(range(1, 7)), static, 6) == [3, 4, 5, 6]
    assert exit_points(frozenset({2, 3, 6}), static, 6) == [3, 6]
    assert exit_points(frozenset({2, 6}), PolicyDecider(Never(3), 6), 6) == [2, 6]


@pytest.mark.parametrize("propagation", ["copy", "recompute"])
def test_fused_fill_and_read_ahead_change_no_token_exit_or_cache_entry(propagation):
    config = FAMILIES["llama"]()
    config.num_hidden_layers = 7
    from transformers import AutoModelForCausalLM

    torch.manual_seed(16)
    model = sharpened(with_random_biases(MultiExitLM(AutoModelForCausalLM.from_config(config).eval())))
    ids, mask = prompts(3, seed=12)
    runs = {}
    for fused in (False, True):
        for read_ahead in (False, True):
            runs[fused, read_ahead] = _decode(model, ids, mask, propagation, fused, read_ahead)
    reference = runs[False, False]
    assert reference.info["fused_fill"] is False
    assert runs[True, False].info["fused_fill"] is (propagation == "copy")
    assert len(reference.exit_layers[:, 1:].unique()) >= 2  # tokens left at several layers
    written = ids.shape[1] + 11
    for key, run in runs.items():
        assert torch.equal(run.tokens, reference.tokens), key
        assert torch.equal(run.exit_layers, reference.exit_layers), key
        assert run.info["read_ahead"] is key[1]
        for layer in range(7):
            torch.testing.assert_close(run.info["cache"].keys[layer][:, :, :written],
                                       reference.info["cache"].keys[layer][:, :, :written], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(run.info["cache"].values[layer][:, :, :written],
                                       reference.info["cache"].values[layer][:, :, :written], rtol=1e-5, atol=1e-5)


def _decode(model, ids, mask, propagation, fused, read_ahead):
    from exitrl.agents.calm import CalmPolicy
    from exitrl.decoding.calm import CalmDecider
    from exitrl.decoding.per_token import per_token_decoding

    decider = CalmDecider(CalmPolicy("margin"), 0.6, model, 12, ids.device, decay=False)
    return per_token_decoding(model, decider, ids, mask, 12, propagation, exit_layers=[2, 4, 5], graphs=False,
                              read_ahead=read_ahead, fused_fill=fused)


def test_the_static_rule_runs_one_segment_and_one_fused_fill_per_token():
    """The static rule at layer 2 of 3: the loop stops at 2 (and the last layer) only, fills layer 3's cache in one
    fused step, and the tokens are those of the model cut after layer 2 ("an exit at E is an E-layer model")."""
    model = MultiExitLM(tiny_lm("llama", seed=7))
    assert model.num_layers == SMALL["num_hidden_layers"] == 3
    ids, mask = prompts(1, seed=2)
    out = policy_decoding(model, StaticPolicy(2), ids, mask, 6)
    assert out.info["exit_points"] == [2, 3] and out.info["fused_fill"] is True
    assert (out.exit_layers[:, 1:] == 2).all()
    cut = tiny_lm("llama", seed=7)
    cut.model.layers = cut.model.layers[:2]
    cut.config.num_hidden_layers = 2
    cut = MultiExitLM(cut)
    # layers 1-2 of every new token read only layers 1-2's cache: after the full model's first token, the tokens
    # are the 2-layer model's own greedy continuation
    prefix = torch.cat([ids, out.tokens[:, :1]], 1)
    follow = greedy(cut, prefix, torch.cat([mask, torch.ones_like(out.tokens[:, :1])], 1), 5)
    assert torch.equal(follow.tokens, out.tokens[:, 1:])
