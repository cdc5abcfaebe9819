"""Light trunk tuning (the second arm of exit-ready LMs, CPU, tiny Llama): the deltas start as nothing, merge into
plain weights and come out exactly; trained, they make the exits agree with the original last layer while the
anchor holds that layer near the original; they travel as one file that refuses a model of another shape."""

from __future__ import annotations

import pytest
import torch
from test_exit_adapters import batch, every_exit, llama, sharpened
from torch import nn

from exitrl.backbones.exit_distillation import exit_agreement, sample_mask, sample_texts
from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.trunk_lora import LoRALinear, TrunkLoRA
from exitrl.backbones.trunk_tuning import TrunkTuneConfig, last_layer_drift, tune_trunk

EXITS = [1, 2]


def test_deltas_start_as_nothing_and_merge_and_unmerge_exactly():
    model = llama(seed=3, num_hidden_layers=4)
    ids, mask = batch()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        before = every_exit(model, ids, mask)[-1]
        lora = TrunkLoRA(model, rank=4)
        assert len(lora.wrapped) == 4 * 7  # q, k, v, o, gate, up, down in every layer
        assert torch.equal(every_exit(model, ids, mask)[-1], before)
        for wrapper in lora.wrapped.values():
            wrapper.lora_b.normal_(0, 0.05)
        wrapped = every_exit(model, ids, mask)[-1]
        assert not torch.allclose(wrapped, before)
        lora.merge()
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.allclose(every_exit(model, ids, mask)[-1], wrapped, atol=1e-5)
        lora.unmerge()
        assert torch.allclose(every_exit(model, ids, mask)[-1], wrapped, atol=1e-6)
        lora.remove()
    assert all(isinstance(m, nn.Linear) for m in model.layers[0].self_attn.children())
    assert set(model.state_dict()) == set(original)
    assert all(torch.equal(value, original[name]) for name, value in model.state_dict().items())


def samples(model, rows: int = 64):
    prompts, prompt_mask = batch(rows=rows, length=4, seed=2)
    return sample_texts(model, prompts, prompt_mask, new_tokens=28, batch_size=32, seed=0), sample_mask(
        prompt_mask, 28, rows, 4)


def test_tuning_makes_exits_agree_with_the_original_and_the_anchor_holds_the_last_layer():
    results = {}
    for anchor in (0.0, 4.0):
        model = sharpened(llama(seed=5, num_hidden_layers=4))
        texts, mask = samples(model)
        held = slice(48, 64)
        untrained = exit_agreement(model, texts[held], EXITS, 8, attention_mask=mask[held])
        cfg = TrunkTuneConfig(tokens=48 * 32 * 10, batch_size=16, lr=1e-2, rank=4, anchor=anchor, log_every=6,
                              chunk=100)
        lora, info = tune_trunk(model, EXITS, texts[:48], cfg, attention_mask=mask[:48])
        losses = [entry["loss"] for entry in info["losses"]]
        assert info["steps"] == 30 and info["finished"] and losses[-1] < 0.8 * losses[0], losses
        assert all(p.grad is None and p.requires_grad for n, p in model.lm.named_parameters()  # flags put back
                   if "lora_" not in n)
        drift = last_layer_drift(model, lora, texts[held], mask[held], exit_layers=EXITS)
        trained = drift["exits_agree_with_original"]
        assert all(trained[e] > untrained[e] for e in EXITS), (anchor, untrained, trained)
        assert 0 <= drift["agreement_with_original"] <= 1 and drift["perplexity_tuned"] > 1
        results[anchor] = drift
    assert results[4.0]["agreement_with_original"] > results[0.0]["agreement_with_original"], results
    assert results[4.0]["agreement_with_original"] > 0.8


def test_deltas_travel_as_one_file_that_refuses_another_model(tmp_path):
    model = llama(seed=3, num_hidden_layers=4)
    ids, mask = batch()
    lora = TrunkLoRA(model, rank=4)
    with torch.no_grad():
        for wrapper in lora.wrapped.values():
            wrapper.lora_b.normal_(0, 0.05)
        tuned = every_exit(model, ids, mask)[-1]
    path = lora.save(tmp_path / "trunk.safetensors", training={"tokens": 1})
    assert path.stat().st_size < 200_000
    fresh = llama(seed=3, num_hidden_layers=4)
    loaded = TrunkLoRA.load(path, fresh)
    assert loaded.trained_with == {"tokens": 1}
    with torch.no_grad():
        assert torch.allclose(every_exit(fresh, ids, mask)[-1], tuned, atol=1e-6)
    with pytest.raises(BackboneError, match="num_layers"):
        TrunkLoRA.load(path, llama(seed=3, num_hidden_layers=3))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BackboneError, match="TrunkLoRA.save"):
        TrunkLoRA.load(tmp_path / "junk.safetensors", fresh)


@pytest.mark.parametrize("key,value", [("rank", 0), ("anchor", -1.0), ("lr", 0.0), ("kl", "half")])
def test_bad_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"TrunkTuneConfig.{key}"):
        TrunkTuneConfig(**{key: value})
