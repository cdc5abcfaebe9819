"""`MultiExitLM` drives each supported causal-LM family layer by layer exactly as the model's own forward does
(states, logits and KV cache, teacher-forced and in a cached decoding step), refuses what it cannot drive, and
saves and loads its exits."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.multi_exit_lm import MultiExitLM

SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    # a window shorter than the test sequences: the sliding layers' masks matter
    "qwen3-sliding": lambda: Qwen3Config(**SMALL, head_dim=8, use_sliding_window=True, sliding_window=3,
                                         max_window_layers=1),
    "mistral-sliding": lambda: MistralConfig(**SMALL, sliding_window=3),
    "gpt2": lambda: GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2),
}


def tiny_lm(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_by_layer_equals_the_models_own_forward(family):
    model = MultiExitLM(tiny_lm(family))
    assert model.check_layerwise() <= 1e-5
    # and independently of the self-check: every layer's states, the last exit and a cached step
    ids = torch.randint(101, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    with torch.no_grad():
        own = model.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = model.layer_states(ids, mask)
        keep = mask.bool()
        for ours, theirs in zip(states[:-1], own.hidden_states[1:-1]):
            torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.exit_logits(model.num_layers - 1, states[-1])[keep], own.logits[keep],
                                   rtol=0, atol=1e-5)
        # prefill 8 tokens into our cache, then decode the 9th: equals the full teacher-forced forward at position 8
        full = model.lm(input_ids=ids[:, :9]).logits[:, 8]
        cache = model.new_cache()
        hidden, inputs = model.embed(ids[:, :8], None, cache)
        for i in range(model.num_layers):
            hidden = model.run_layer(i, hidden, inputs)
        hidden, inputs = model.embed(ids[:, 8:9], None, cache)
        for i in range(model.num_layers):
            hidden = model.run_layer(i, hidden, inputs)
        torch.testing.assert_close(model.exit_logits(model.num_layers - 1, hidden)[:, 0], full, rtol=0, atol=1e-5)
        assert cache.get_seq_length() == 9


def test_an_architecture_it_cannot_drive_is_refused_with_what_it_drives():
    torch.manual_seed(0)
    bert = AutoModelForCausalLM.from_config(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, is_decoder=True))
    with pytest.raises(BackboneError, match="Llama, Qwen2/3.*GPT-2"):
        MultiExitLM(bert)
    model = MultiExitLM(tiny_lm("llama"))
    model.body.rotary_emb = None  # a layer that does not get what it needs: named, not silently wrong
    with pytest.raises(BackboneError, match="cannot be called one by one"):
        model.check_layerwise()
    model = MultiExitLM(tiny_lm("mistral-sliding"))
    model.layer_types = ["full_attention"] * model.num_layers  # the wrong mask for sliding layers
    with pytest.raises(BackboneError, match="differs from its own forward"):
        model.check_layerwise()
    with pytest.raises(BackboneError, match="shared, per_layer"):
        MultiExitLM(tiny_lm("llama"), exits="heads")


def test_per_layer_exits_start_as_the_shared_exit_and_survive_save_and_load(tmp_path):
    model = MultiExitLM(tiny_lm("qwen2"), exits="per_layer")
    shared = MultiExitLM(model.lm)
    ids = torch.randint(101, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = model.layer_states(ids)
        for i, state in enumerate(states):
            torch.testing.assert_close(model.exit_logits(i, state), shared.exit_logits(i, state))
        model.adapters[0].weight.add_(0.1 * torch.randn(32, 32))  # as training would move it
        before = [model.exit_logits(i, s) for i, s in enumerate(states)]
    model.save(tmp_path / "saved", extra={"note": "x"})
    loaded, tokenizer, meta = MultiExitLM.load(tmp_path / "saved")
    assert meta["exits"] == "per_layer" and meta["note"] == "x" and tokenizer is None
    with torch.no_grad():
        after = [loaded.exit_logits(i, s) for i, s in enumerate(loaded.layer_states(ids))]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(before[0], shared.exit_logits(0, states[0]))
    with pytest.raises(BackboneError, match="not a saved MultiExitLM"):
        MultiExitLM.load(tmp_path)


def test_layer_drop_passes_a_dropped_layers_input_through_in_training_only():
    model = MultiExitLM(tiny_lm("llama"))
    ids = torch.randint(101, (4, 5), generator=torch.Generator().manual_seed(3))
    model.train()
    states = model.layer_states(ids, layer_drop=[0.0, 1.0, 0.0])
    torch.testing.assert_close(states[1], states[0])  # layer 2 skipped by every row
    model.eval()
    states = model.layer_states(ids, layer_drop=[0.0, 1.0, 0.0])
    assert not torch.allclose(states[1], states[0])
    with pytest.raises(ValueError, match="3 layers"):
        model.layer_states(ids, layer_drop=[0.1])


def test_encoders_and_lms_share_one_layerwise_seam(tiny_bert):
    from exitrl.backbones import load_multi_exit
    from exitrl.backbones.protocol import LayerwiseBackbone

    encoder, _ = load_multi_exit(str(tiny_bert), 2)
    for model in (encoder, MultiExitLM(tiny_lm("llama"))):
        assert isinstance(model, LayerwiseBackbone)
        ids = torch.randint(5, 40, (2, 6))
        hidden, inputs = model.embed(ids, torch.ones_like(ids))
        for i in range(model.num_layers):
            hidden = model.run_layer(i, hidden, inputs)
        assert hidden.shape == (2, 6, model.hidden_size)
