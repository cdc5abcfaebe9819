"""Causal LMs: offline text split by document and packed into chunks, the exit recipes' LM losses (next-token CE at
every exit; LayerSkip with layer dropout and its curriculum), continued training through the shared stage loop, and
the per-layer report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from exitrl.backbones import FinetuneConfig
from exitrl.backbones.lm_layers import per_layer_report
from exitrl.backbones.lm_training import continue_training, lm_recipes
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.backbones.recipes import Progress, build_recipe
from exitrl.data import DataError
from exitrl.data.lm_text import glue_documents, pack, python_documents, split_documents
from exitrl.traces.lm_run import split_documents as lm_split

TEXT = ["the good film was great", "the bad movie was awful", "she said it was a good story",
        "they were not good and not bad", "he has a film", "we will see the movie"] * 8


def test_documents_are_split_by_their_text_and_packed_into_equal_chunks(tiny_llama, glue_dir):
    _, tokenizer = load_multi_exit_lm(str(tiny_llama))
    chunks = pack(tokenizer, TEXT, 16)
    stream = []
    for text in TEXT:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert [c["input_ids"] for c in chunks] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert all(c["labels"] == c["input_ids"] for c in chunks)
    assert len(pack(tokenizer, TEXT, 16, max_chunks=3)) == 3
    sentences = glue_documents("rte", glue_dir, ("dev",))
    assert len(sentences) == len(set(sentences)) > 400  # both sides of every pair, each distinct sentence once
    parts = split_documents(sentences, 0.2)
    assert 0.1 < len(parts["held_out"]) / len(sentences) < 0.3
    # the run's three-way split: by a hash of the text, so neither the order nor the other documents matter
    three = lm_split(sentences, 0.2, 0.25)
    assert sorted(sum(three.values(), [])) == sorted(sentences)
    assert {k: set(v) for k, v in lm_split(sentences[::-1], 0.2, 0.25).items()} == {k: set(v) for k, v in
                                                                                  three.items()}
    assert {k: set(v) for k, v in lm_split(sentences[: len(sentences) // 2], 0.2, 0.25).items()} == {
        k: set(v) & set(sentences[: len(sentences) // 2]) for k, v in three.items()}
    assert set(three["dev"]) == set(parts["held_out"])  # the same hash: dev is the held-out part above
    assert 0.15 < len(three["policy"]) / len(three["policy"] + three["train"]) < 0.35
    assert "policy" not in lm_split(sentences, 0.2, 0.0)
    code = python_documents(["exitrl"], max_files=3)
    assert len(code) == 3 and all("import" in c or '"""' in c for c in code)
    with pytest.raises(DataError, match="not installed"):
        python_documents(["no_such_package_here"])
    with pytest.raises(DataError, match="held_out"):
        split_documents(sentences, 1.0)


def test_next_token_ce_at_every_exit_trains_every_layer(tiny_llama):
    model, tokenizer = load_multi_exit_lm(str(tiny_llama))
    chunks = pack(tokenizer, TEXT, 12)
    before = per_layer_report(model, chunks)
    info = continue_training(model, tokenizer, chunks, FinetuneConfig(
        objective="weighted_ce", lr=3e-3, epochs=4, batch_size=4, warmup_ratio=None), "cpu")
    after = per_layer_report(model, chunks)
    assert info["steps"] == 4 * math.ceil(len(chunks) / 4) and info["tokens"] == 4 * len(chunks) * 12
    assert all(a < 0.5 * b for a, b in zip(after["perplexity"], before["perplexity"]))
    assert after["agreement"][-1] == 1.0


def test_the_report_is_the_exits_own_next_token_loss(tiny_llama):
    model, tokenizer = load_multi_exit_lm(str(tiny_llama))
    chunks = pack(tokenizer, TEXT, 10, max_chunks=5)
    report = per_layer_report(model, chunks, batch_size=2)
    ids = torch.tensor([c["input_ids"] for c in chunks])
    with torch.no_grad():
        states = model.layer_states(ids)
        for layer in range(model.num_layers):
            logits = model.exit_logits(layer, states[layer][:, :-1]).flatten(0, 1)
            expected = math.exp(F.cross_entropy(logits, ids[:, 1:].flatten()).item())
            assert report["perplexity"][layer] == pytest.approx(expected, rel=1e-5)
    assert report["positions"] == 5 * 9


def test_layerskip_builds_only_the_enabled_exits_and_drops_layers(tiny_llama):
    model, tokenizer = load_multi_exit_lm(str(tiny_llama), exits="per_layer")
    cfg = FinetuneConfig(objective="layerskip", layerskip_p_max=1.0, layerskip_rotation=2)
    recipe = build_recipe(cfg)
    recipe.prepare(model)
    assert model.shared_heads  # LayerSkip reads every layer through the model's own head
    built = []
    exit_logits = model.exit_logits
    model.exit_logits = lambda layer, hidden: built.append(layer) or exit_logits(layer, hidden)
    ids = torch.tensor([c["input_ids"] for c in pack(tokenizer, TEXT, 12, max_chunks=4)])
    model.train()
    loss = recipe.stages(model)[0].loss(model, {"attention_mask": torch.ones_like(ids)}, ids, Progress(0, 10))
    loss.backward()
    weights = recipe.weights(model.num_layers, Progress(0, 10))
    assert built == [i for i, w in enumerate(weights.tolist()) if w > 0] and len(built) < model.num_layers
    assert torch.isfinite(loss)


def test_a_recipe_for_encoders_only_is_refused_for_an_lm(tiny_llama):
    model, tokenizer = load_multi_exit_lm(str(tiny_llama))
    assert set(lm_recipes()) == {"weighted_ce", "layerskip"}
    with pytest.raises(ValueError, match="encoder classifiers only.*weighted_ce, layerskip"):
        continue_training(model, tokenizer, pack(tokenizer, TEXT, 12), FinetuneConfig(objective="sweet"), "cpu")
