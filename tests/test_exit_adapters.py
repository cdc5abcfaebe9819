"""Exit adapters on a frozen causal LM: they leave the model's own output bit-identical, a ``layer`` adapter decodes
through a cache exactly as it runs teacher-forced, distillation from the model's own samples makes the exits agree
with the last layer without touching the trunk, and the adapters travel as one file that refuses a model of another
shape."""

from __future__ import annotations

import pytest
import torch
from test_multi_exit_lm import SMALL, tiny_lm
from transformers import AutoModelForCausalLM, LlamaConfig

from exitrl.backbones.exit_adapters import ADAPTER_KINDS, ExitAdapters
from exitrl.backbones.exit_distillation import (
    DistillConfig,
    distill,
    exit_agreement,
    kl_sum,
    positions_of,
    sample_mask,
    sample_texts,
)
from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding.engine import Engine

EXITS = [1, 2]  # tiny_lm has 3 layers: every exit an adapter may have


def llama(seed: int = 0, **changes) -> MultiExitLM:
    """`tiny_lm("llama")` with other sizes."""
    torch.manual_seed(seed)
    return MultiExitLM(AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, **changes})).eval())


def sharpened(model: MultiExitLM, scale: float = 20.0) -> MultiExitLM:
    """A random model's distributions are nearly flat; a larger LM head gives its exits something to match."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def batch(rows: int = 3, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with row 1 left-padded by three."""
    ids = torch.randint(3, 101, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def every_exit(model: MultiExitLM, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's exit logits, teacher-forced (through attached adapters, which get the layers' inputs)."""
    hidden, inputs = model.embed(ids, mask, None, positions_of(mask))
    logits = []
    for index in range(model.num_layers):
        hidden = model.run_layer(index, hidden, inputs)
        logits.append(model.exit_logits(index, hidden, inputs))
    return logits


def perturbed(adapters: ExitAdapters, seed: int = 3) -> ExitAdapters:
    """As training would leave them: every weight moved."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return adapters


@torch.no_grad()
def test_linear_adapters_start_as_the_bare_exit_and_no_kind_touches_the_last_layer():
    model = MultiExitLM(tiny_lm("llama"))
    ids, mask = batch()
    keys = set(model.state_dict())
    bare = every_exit(model, ids, mask)
    for kind in ADAPTER_KINDS:
        adapters = ExitAdapters(model, EXITS, kind)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in adapters.parameters())
        adapted = every_exit(model.attach_exit_adapters(perturbed(adapters) if kind != "linear" else adapters),
                             ids, mask)
        assert torch.equal(adapted[-1], bare[-1]), kind  # the model's own output, bit for bit
        if kind == "linear":
            for exit_layer in EXITS:
                assert torch.equal(adapted[exit_layer - 1], bare[exit_layer - 1])
        else:
            assert not torch.allclose(adapted[0], bare[0])
        assert set(model.state_dict()) == keys  # attached, not registered: the trunk's checkpoints are unchanged
        model.attach_exit_adapters(None)
    # an untouched one-layer adapter at exit 1 is a copy of layer 2: it reads exactly what layer 2 computes
    adapters = ExitAdapters(model, [1], "layer")
    hidden, inputs = model.embed(ids, mask, None, positions_of(mask))
    first = model.run_layer(0, hidden, inputs)
    torch.testing.assert_close(adapters.adapt(1, first, inputs), model.run_layer(1, first, inputs), rtol=0, atol=1e-6)
    assert adapters.needs_cache and adapters.cache_layer_indices(1) == [3]
    assert ExitAdapters(model, EXITS, "layer").cache_layer_indices(2) == [4]
    gpt2 = MultiExitLM(tiny_lm("gpt2"))  # GPT-2-like models get linear adapters
    states = gpt2.layer_states(ids)
    bare = gpt2.exit_logits(0, states[0])
    assert torch.equal(gpt2.attach_exit_adapters(ExitAdapters(gpt2, EXITS)).exit_logits(0, states[0]), bare)


@torch.no_grad()
def test_layer_adapters_decode_through_a_cache_as_they_run_teacher_forced():
    model = MultiExitLM(tiny_lm("llama"))
    adapters = perturbed(ExitAdapters(model, EXITS, "layer"))
    model.attach_exit_adapters(adapters)
    ids, mask = batch(length=8)
    full = every_exit(model, ids, mask)
    real = mask.bool()

    # transformers' DynamicCache built from the config (room is made for the adapters' layers), one token a step
    cache = model.new_cache()
    positions = positions_of(mask)
    for t in range(ids.shape[1]):
        hidden, inputs = model.embed(ids[:, t:t + 1], mask[:, :t + 1], cache, positions[:, t:t + 1])
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, inputs)
            logits = model.exit_logits(index, hidden, inputs)[:, 0]
            torch.testing.assert_close(logits[real[:, t]], full[index][:, t][real[:, t]], rtol=0, atol=1e-5)
    assert len(cache.layers) == model.num_layers + 2 and cache.get_seq_length(4) == ids.shape[1]

    # the decoding engine's SlotCache: a prompt of 4 at once, then one slot a step
    engine = Engine(model, ids[:, :4], mask[:, :4], new_slots=4, graphs=False)
    steps = [torch.arange(4)] + [torch.tensor([t]) for t in range(4, 8)]
    for slots in steps:
        hidden, inputs = engine.embed(ids[:, slots], slots)
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, inputs)
            logits = model.exit_logits(index, hidden, inputs)
            keep = real[:, slots]
            torch.testing.assert_close(logits[keep], full[index][:, slots][keep], rtol=0, atol=1e-5)
    assert set(engine.cache.keys) == {0, 1, 2, 3, 4}


def test_distillation_on_the_models_own_samples_raises_agreement_and_leaves_the_trunk_alone():
    model = sharpened(llama(seed=5, num_hidden_layers=4))  # 4 layers: no adapter copies the last layer
    prompts, prompt_mask = batch(rows=64, length=4, seed=2)
    samples = sample_texts(model, prompts, prompt_mask, new_tokens=28, batch_size=32, seed=0)
    assert samples.shape == (64, 32) and torch.equal(samples[:, :4], prompts)
    rng = torch.get_rng_state()
    assert torch.equal(sample_texts(model, prompts[:32], prompt_mask[:32], 28, 32, seed=0), samples[:32])
    assert torch.equal(torch.get_rng_state(), rng)  # sampling leaves the global RNG alone
    mask = sample_mask(prompt_mask, 28, 64, 4)
    train, held_out = slice(0, 48), slice(48, 64)

    trunk = {name: value.clone() for name, value in model.state_dict().items()}
    ids, ids_mask = samples[held_out], mask[held_out]
    with torch.no_grad():
        last = every_exit(model, ids, ids_mask)[-1]
    cfg = DistillConfig(tokens=48 * 32 * 10, batch_size=16, lr=1e-2, warmup_ratio=0.1, log_every=6, chunk=100)
    for kind in ADAPTER_KINDS:
        adapters = ExitAdapters(model, EXITS, kind)
        untrained = exit_agreement(model.attach_exit_adapters(adapters), ids, EXITS, 8, attention_mask=ids_mask)
        model.attach_exit_adapters(None)
        result = distill(model, adapters, samples[train], cfg, attention_mask=mask[train])
        losses = [entry["loss"] for entry in result["losses"]]
        assert result["steps"] == 30 and result["finished"] and len(losses) == 5
        assert losses[-1] < 0.8 * losses[0], (kind, losses)
        trained = exit_agreement(model.attach_exit_adapters(adapters), ids, EXITS, 8, attention_mask=ids_mask)
        assert all(trained[e] > untrained[e] for e in EXITS), (kind, untrained, trained)
        assert sum(trained.values()) > sum(untrained.values()) + 0.08, (kind, untrained, trained)
        with torch.no_grad():
            assert torch.equal(every_exit(model, ids, ids_mask)[-1], last)
        model.attach_exit_adapters(None)
        assert all(torch.equal(value, trunk[name]) for name, value in model.state_dict().items())
        assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored, no gradient


def test_adapters_travel_as_one_file_that_refuses_another_model(tmp_path):
    model = MultiExitLM(tiny_lm("llama"))
    ids, mask = batch()
    for kind in ADAPTER_KINDS:
        adapters = perturbed(ExitAdapters(model, EXITS, kind))
        path = adapters.save(tmp_path / f"{kind}.safetensors", training={"tokens": 123})
        with torch.no_grad():
            before = every_exit(model.attach_exit_adapters(adapters), ids, mask)
            loaded = ExitAdapters.load(path, model)
            after = every_exit(model.attach_exit_adapters(loaded), ids, mask)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert (loaded.kind, loaded.exit_layers, loaded.trained_with) == (kind, (1, 2), {"tokens": 123})
        assert list(tmp_path.glob(f"{kind}*")) == [path] and path.read_bytes()[8:9] == b"{"  # safetensors
    with pytest.raises(BackboneError, match="hidden_size=32, but this model has hidden_size=48"):
        ExitAdapters.load(path, llama(hidden_size=48))
    with pytest.raises(BackboneError, match="num_layers=3, but this model has num_layers=4"):
        ExitAdapters.load(path, llama(num_hidden_layers=4))
    with pytest.raises(BackboneError, match="num_layers"):
        llama(num_hidden_layers=4).attach_exit_adapters(adapters)
    # torch.save files (written where safetensors is missing) load too
    manifest, weights = ExitAdapters(model, [2]).manifest(), ExitAdapters(model, [2]).state_dict()
    torch.save({"exitrl": __import__("json").dumps(manifest), "weights": weights}, tmp_path / "old.pt")
    assert ExitAdapters.load(tmp_path / "old.pt", model).exit_layers == (2,)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not weights at all" * 10)
    with pytest.raises(BackboneError, match="not an exit-adapter file"):
        ExitAdapters.load(tmp_path / "junk.bin", model)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(BackboneError, match="not written by ExitAdapters.save"):
        ExitAdapters.load(tmp_path / "model.safetensors", model)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        ExitAdapters.load(tmp_path / "nowhere.safetensors", model)


def test_bad_arguments_are_refused_with_what_is_wrong():
    model = MultiExitLM(tiny_lm("llama"))
    with pytest.raises(ValueError, match="Unknown exit adapter kind 'conv'; valid: linear, mlp, layer"):
        ExitAdapters(model, EXITS, "conv")
    with pytest.raises(ValueError, match=r"exit_layers \[0, 3\] are out of range.*1\.\.2"):
        ExitAdapters(model, [0, 1, 3])
    with pytest.raises(ValueError, match="names a layer twice"):
        ExitAdapters(model, [1, 1])
    with pytest.raises(ValueError, match=r"exit_layers \[2\] with depth=2"):
        ExitAdapters(model, EXITS, "layer", depth=2)
    with pytest.raises(ValueError, match="only kind 'linear'"):
        ExitAdapters(MultiExitLM(tiny_lm("gpt2")), [1], "mlp")
    with pytest.raises(ValueError, match="pass layer_inputs"):
        ExitAdapters(model, [1], "layer").adapt(1, torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="No exit adapter at layer 2"):
        ExitAdapters(model, [1]).adapt(2, torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="exit_layers must name layers 1..3"):
        exit_agreement(model, torch.zeros(1, 4, dtype=torch.long), [4])
    bad = {"tokens": 0, "batch_size": 0, "lr": 0.0, "warmup_ratio": 1.0, "weight_decay": -1.0, "kl": "js",
           "top_k": 0, "temperature": 0.0, "seed": -1, "compile": "yes", "chunk": 0, "log_every": 0,
           "checkpoint_every": 0, "clip_norm": float("nan")}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=f"DistillConfig.{key} must"):
            DistillConfig(**{key: value})


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    generator = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(5, 101, generator=generator), 3 * torch.randn(5, 101, generator=generator)
    full = kl_sum(student, teacher, "full", 0, 2.0)
    torch.testing.assert_close(kl_sum(student, teacher, "top_k", 101, 2.0), full)
    assert 0 < kl_sum(student, teacher, "top_k", 5, 2.0) < full  # merging tokens never raises a KL
    assert float(kl_sum(teacher, teacher, "full", 0, 1.0)) == pytest.approx(0, abs=1e-6)


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """Bit-identical weights, not just "continues from the saved step": batches and learning rate are functions of
    the step and the optimiser state is saved whole, so on one CPU thread nothing else can differ."""
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=6)))
    sequences = torch.randint(3, 101, (24, 32), generator=torch.Generator().manual_seed(4))
    cfg = DistillConfig(tokens=2000, batch_size=8, lr=5e-3, log_every=1, checkpoint_every=2, kl="top_k", top_k=8)
    whole, stopped, resumed = (ExitAdapters(model, EXITS, "mlp") for _ in range(3))
    reference = distill(model, whole, sequences, cfg)
    assert reference["steps"] == 8 and reference["tokens"] == 8 * 8 * 32
    path = tmp_path / "distill.ckpt"
    first = distill(model, stopped, sequences, cfg, checkpoint=path, max_steps=3)
    assert (first["steps"], first["finished"]) == (3, False)
    second = distill(model, resumed, sequences, cfg, checkpoint=path)  # as a fresh process would: new adapters
    assert (second["resumed_from"], second["steps"], second["finished"]) == (3, 8, True)
    assert [e["loss"] for e in second["losses"]] == [e["loss"] for e in reference["losses"]]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    final = ExitAdapters(model, EXITS, "mlp")
    again = distill(model, final, sequences, cfg, checkpoint=path)  # finished: loads the weights, trains nothing
    assert again["resumed_from"] == 8 and all(torch.equal(a, b) for a, b in zip(final.parameters(),
                                                                                   whole.parameters()))
    with pytest.raises(ValueError, match="DistillConfig.lr=0.005 there, 0.001 here"):
        distill(model, final, sequences, DistillConfig(**{**cfg.__dict__, "lr": 1e-3}), checkpoint=path)
    assert all(p.requires_grad for p in model.parameters()) and model.exit_adapters is None  # restored on refusal
