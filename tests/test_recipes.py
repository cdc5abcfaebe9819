"""Backbone training recipes (backbone.finetune.objective=): SWEET's detached gradients, LayerSkip's schedules,
layer dropout and shared head, DeeBERT's two stages, FREE's loss, and every recipe end to end with its own
cache and trace keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from exitrl.backbones import (
    FinetuneConfig,
    MultiExitModel,
    build_recipe,
    finetune,
    load_multi_exit,
    load_or_finetune,
)
from exitrl.backbones.recipes import RECIPES, Progress
from exitrl.backbones.recipes.deebert import DeeBERT
from exitrl.backbones.recipes.free import default_shallow_layer, shallow_deep_loss
from exitrl.backbones.recipes.layerskip import (
    early_exit_scales,
    exit_loss_weights,
    gradual_curriculum,
    layer_drop_rates,
    rotational_curriculum,
)
from exitrl.core.options import checked_options
from exitrl.data import load_task
from exitrl.traces.build import load_or_build_trace

SENTENCES = ["the film is great", "a story", "he said it was not good and the movie was bad", "good movie",
             "they had a bad film", "it is awful", "we would see it", "the story was great and good"]
CPU = torch.device("cpu")


def _model(tiny_bert: Path, pooling: str = "cls") -> tuple[MultiExitModel, object]:
    torch.manual_seed(0)
    return load_multi_exit(str(tiny_bert), 2, pooling)


def _batch(tok, n: int = 4) -> tuple[dict, torch.Tensor]:
    batch = dict(tok(SENTENCES[:n], padding=True, return_tensors="pt"))
    return batch, torch.arange(n) % 2


def _no_dropout(model: MultiExitModel) -> MultiExitModel:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _rte(glue_dir: Path, train: int = 32, dev: int = 16):
    return load_task("rte", glue_dir, limit={"train": train, "dev": dev})


# -- SWEET -------------------------------------------------------------------------------------------------------
def test_sweet_forward_trains_each_layer_only_by_the_next_head(tiny_bert):
    model, tok = _model(tiny_bert)
    model.eval()
    batch, labels = _batch(tok)
    F.cross_entropy(model(**batch, detach_between=True).logits[:, 1], labels).backward()
    assert _grad_norm(model.layers[0]) == 0.0 and _grad_norm(model.embeddings) == 0.0
    assert _grad_norm(model.layers[1]) > 0.0 and _grad_norm(model.heads[1]) > 0.0

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(**batch).logits[:, 1], labels).backward()  # the ordinary forward: gradient flows down
    assert _grad_norm(model.layers[0]) > 0.0 and _grad_norm(model.embeddings) > 0.0


def test_sweet_forward_values_equal_the_ordinary_forward(tiny_bert):
    model, tok = _model(tiny_bert)
    model.eval()
    batch, _ = _batch(tok)
    torch.testing.assert_close(model(**batch, detach_between=True).logits, model(**batch).logits)


# -- LayerSkip ---------------------------------------------------------------------------------------------------
def test_layerskip_schedules_by_hand():
    expected = [0.0, 0.2 * (2 ** (1 / 3) - 1), 0.2 * (2 ** (2 / 3) - 1), 0.2]
    assert layer_drop_rates(4, 0.2) == pytest.approx(expected)
    assert layer_drop_rates(1, 0.2) == [0.0]
    # e(l) = e_scale * sum_{i<=l} i below the top; e(L-1) = (L-1) + e_scale * sum_{i<=L-2} i
    assert early_exit_scales(4, 1.0) == pytest.approx([0.0, 1.0, 3.0, 3.0 + 3.0])
    assert early_exit_scales(4, 0.5) == pytest.approx([0.0, 0.5, 1.5, 3.0 + 1.5])
    # rotational, R = 2: layers with (l - t) even, plus the last
    assert rotational_curriculum(0, 4, 2) == [True, False, True, True]
    assert rotational_curriculum(1, 4, 2) == [False, True, False, True]
    assert rotational_curriculum(2, 4, 3) == [False, False, True, True]
    assert rotational_curriculum(4, 4, 3) == [False, True, False, True]
    # gradual, T = 8, L = 4: layer l switches on at t >= 8 (3 - l) / 4, i.e. 6, 4, 2, 0
    on = {t: gradual_curriculum(t, 8, 4) for t in (0, 1, 2, 3, 4, 5, 6, 7)}
    assert on[0] == on[1] == [False, False, False, True]
    assert on[2] == on[3] == [False, False, True, True]
    assert on[4] == on[5] == [False, True, True, True]
    assert on[6] == on[7] == [True, True, True, True]
    # normalised weights: rotational t=0 -> e = (0, -, 3, 6) / 9; t=1 -> (-, 1, -, 6) / 7
    torch.testing.assert_close(exit_loss_weights([0.0, 1.0, 3.0, 6.0], on[0]), torch.tensor([0.0, 0, 0, 1]))
    recipe = build_recipe(FinetuneConfig(objective="layerskip"))
    torch.testing.assert_close(recipe.weights(4, Progress(0, 10)), torch.tensor([0.0, 0, 3, 6]) / 9)
    torch.testing.assert_close(recipe.weights(4, Progress(1, 10)), torch.tensor([0.0, 1, 0, 6]) / 7)
    gradual = build_recipe(FinetuneConfig(objective="layerskip", layerskip_curriculum="gradual"))
    torch.testing.assert_close(gradual.weights(4, Progress(4, 8)), torch.tensor([0.0, 1, 3, 6]) / 10)
    with pytest.raises(ValueError, match="rotational, gradual"):
        build_recipe(FinetuneConfig(objective="layerskip", layerskip_curriculum="sideways"))


def test_a_dropped_layer_is_the_identity_for_exactly_the_dropped_rows(tiny_bert):
    model, tok = _model(tiny_bert)
    _no_dropout(model).train()
    batch, _ = _batch(tok, 8)
    with torch.no_grad():
        ref = model(**batch).pooled
        always = model(**batch, layer_drop=[0.0, 1.0, 0.0]).pooled
        torch.testing.assert_close(always[:, 1], ref[:, 0])  # p = 1: layer 2 skipped for every row
        torch.manual_seed(3)
        half = model(**batch, layer_drop=[0.0, 0.5, 0.0]).pooled
        model.eval()
        torch.testing.assert_close(model(**batch, layer_drop=[1.0, 1.0, 1.0]).pooled, ref)  # never at eval time
    skipped = [torch.allclose(half[r, 1], ref[r, 0]) for r in range(8)]
    kept = [torch.allclose(half[r, 1], ref[r, 1]) for r in range(8)]
    assert all(s != k for s, k in zip(skipped, kept))  # every row is either skipped or untouched
    assert 0 < sum(skipped) < 8
    for r in range(8):
        if kept[r]:  # rows that ran every layer are unchanged by the others' skips
            torch.testing.assert_close(half[r], ref[r])


def test_shared_heads_survive_an_optimiser_step_and_save_load(tiny_bert, tmp_path):
    model, tok = _model(tiny_bert)
    recipe = build_recipe(FinetuneConfig(objective="layerskip"))
    recipe.prepare(model)
    assert model.shared_heads and all(head is model.heads[-1] for head in model.heads)
    assert len(list(model.heads.parameters())) == 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch, labels = _batch(tok)
    model.train()
    recipe.loss(model, batch, labels, Progress(0, 1)).backward()
    before = model.heads[0].weight.detach().clone()
    optimizer.step()
    assert model.shared_heads and not torch.equal(model.heads[0].weight, before)

    model.eval()
    model.save(tmp_path / "shared", tok)
    loaded, _, meta = MultiExitModel.load(tmp_path / "shared")
    assert meta["shared_heads"] is True and loaded.shared_heads
    assert all(head is loaded.heads[-1] for head in loaded.heads)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits)
    plain, _ = _model(tiny_bert)
    plain.save(tmp_path / "plain", tok)
    again, _, meta = MultiExitModel.load(tmp_path / "plain")
    assert meta["shared_heads"] is False and not again.shared_heads


# -- DeeBERT -----------------------------------------------------------------------------------------------------
def test_deebert_stage_two_trains_only_the_early_heads(tiny_bert, glue_dir, monkeypatch):
    model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
    snapshots = []

    def snap():
        return {"encoder": [p.detach().clone() for p in model.encoder.parameters()],
                "last": [p.detach().clone() for p in model.heads[-1].parameters()],
                "early": [p.detach().clone() for h in model.heads[:-1] for p in h.parameters()]}

    def snapshot_first_call(loss):
        called = []

        def wrapped(*args):
            if not called:
                snapshots.append(snap())
                called.append(True)
            return loss(*args)
        return wrapped

    stages = DeeBERT.stages

    def recording_stages(self, m):  # snapshot the weights when each stage computes its first loss
        out = stages(self, m)
        for stage in out:
            stage.loss = snapshot_first_call(stage.loss)
        return out

    monkeypatch.setattr(DeeBERT, "stages", recording_stages)
    cfg = FinetuneConfig(objective="deebert", epochs=1, head_epochs=1, lr=1e-3, head_lr=1e-2, batch_size=16,
                         max_length=32)
    info = finetune(model, tok, _rte(glue_dir), cfg, CPU)
    snapshots.append(snap())
    start, middle, end = snapshots

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert [s["name"] for s in info["stages"]] == ["backbone+last head", "early heads"]
    assert not same(start["encoder"], middle["encoder"]) and not same(start["last"], middle["last"])
    assert same(start["early"], middle["early"])  # stage 1: early heads untouched
    assert same(middle["encoder"], end["encoder"]) and same(middle["last"], end["last"])
    assert not same(middle["early"], end["early"])  # stage 2: only the early heads move
    assert all(p.requires_grad for p in model.parameters())  # handed back fully trainable
    assert len(info["dev_accuracy_per_epoch"]) == 2


# -- FREE --------------------------------------------------------------------------------------------------------
def test_free_shallow_layer_rounding():
    assert [default_shallow_layer(n) for n in (1, 2, 3, 6, 10, 12, 24)] == [1, 1, 1, 2, 3, 3, 6]
    model = torch.nn.Module()
    model.num_layers = 3
    with pytest.raises(ValueError, match="shallow_layer"):
        build_recipe(FinetuneConfig(objective="free", shallow_layer=3)).prepare(model)


def test_free_loss_equals_the_formula_and_probes_do_not_train_the_encoder(tiny_bert):
    model, tok = _model(tiny_bert, "mean")
    model.eval()  # no dropout: the hand computation sees the same numbers
    batch, labels = _batch(tok)
    recipe = build_recipe(FinetuneConfig(objective="free", shallow_layer=2, distill_weight=0.5))
    loss = recipe.loss(model, batch, labels, Progress(0, 1))
    with torch.no_grad():
        out = model(**batch)
        ce = [F.cross_entropy(out.logits[:, i], labels) for i in range(3)]
        mse = ((out.pooled[:, 1] - out.pooled[:, 2]) ** 2).mean()
        expected = (2 * ce[1] + 3 * ce[2]) / 5 + 0.5 * mse + ce[0]  # head 1 is a probe
    torch.testing.assert_close(loss.detach(), expected)

    loss.backward()
    body = [*model.embeddings.parameters(), *model.layers.parameters()]  # not the unused HF pooler
    with_probe = [p.grad.clone() for p in body]
    assert _grad_norm(model.heads[0]) > 0.0  # the probe head does learn
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    shallow_deep_loss(out.logits, out.pooled, labels, 2, 0.5).backward()
    for a, p in zip(with_probe, body, strict=True):
        torch.testing.assert_close(a, p.grad)  # the probe term added nothing to the encoder's gradient


# -- every recipe, end to end ------------------------------------------------------------------------------------
def test_every_objective_finetunes_trains_every_head_and_keys_its_cache_and_trace(tiny_bert, glue_dir, tmp_path):
    data = _rte(glue_dir)
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    initial, _ = load_multi_exit(str(tiny_bert), data.num_labels, "cls")
    keys, models = {}, {}
    for objective in RECIPES:
        cfg = FinetuneConfig(objective=objective, epochs=1, lr=1e-3, head_lr=1e-2, batch_size=16, max_length=32)
        model, tok, info = load_or_finetune(str(tiny_bert), data, cfg, cache, CPU)
        assert info["cached"] is False and math.isfinite(info["dev_accuracy_per_epoch"][-1][-1])
        for i in range(model.num_layers):  # any policy may exit anywhere: every head was trained
            assert not torch.equal(model.heads[i].weight, initial.heads[i].weight), (objective, i)
        keys[objective], models[objective] = info["key"], model
    assert len(set(keys.values())) == len(RECIPES)
    assert models["layerskip"].shared_heads and not models["sweet"].shared_heads

    # another recipe's option neither retrains nor changes the key; a cached LayerSkip model keeps its shared head
    cfg = FinetuneConfig(objective="weighted_ce", epochs=1, lr=1e-3, head_lr=1e-2, batch_size=16, layerskip_p_max=0.5,
                         max_length=32)
    _, _, info = load_or_finetune(str(tiny_bert), data, cfg, cache, CPU)
    assert info["cached"] is True and info["key"] == keys["weighted_ce"]
    cfg = FinetuneConfig(objective="layerskip", epochs=1, lr=1e-3, head_lr=1e-2, batch_size=16, max_length=32)
    cached, _, info = load_or_finetune(str(tiny_bert), data, cfg, cache, CPU)
    assert info["cached"] is True and cached.shared_heads

    model = models["sweet"]
    traces = [load_or_build_trace(model, tok, data, cache, CPU, objective=name) for name in ("weighted_ce", "sweet")]
    assert traces[0].meta["key"] != traces[1].meta["key"]
    assert [t.meta["objective"] for t in traces] == ["weighted_ce", "sweet"]


def test_unknown_objective_and_options_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="weighted_ce, sweet, layerskip, deebert, free"):
        build_recipe(FinetuneConfig(objective="nope"))
    with pytest.raises(ValueError, match="layerskip_p_max"):
        checked_options({"objective": "sweet", "layerskip_pmax": 0.1}, FinetuneConfig, "backbone.finetune")
    configs = Path(__file__).resolve().parents[1] / "src" / "exitrl" / "configs" / "backbone"
    for path in sorted(configs.glob("*.yaml")):  # every shipped backbone config names only known options
        options = checked_options(OmegaConf.load(path).finetune, FinetuneConfig, path.name)
        build_recipe(FinetuneConfig(**options))
