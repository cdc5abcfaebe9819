"""The multi-exit wrapper: layer-by-layer equals the encoder's own forward; save/load; fine-tuning learns."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_encoder

from exitrl.backbones import (
    BackboneError,
    FinetuneConfig,
    MultiExitModel,
    finetune,
    load_multi_exit,
    weighted_ce,
)
from exitrl.backbones.multi_exit import select_rows
from exitrl.data import load_task


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_layerwise_forward_equals_full_forward(tmp_path, model_type, pooling):
    model, tok = load_multi_exit(str(save_tiny_encoder(tmp_path / model_type, model_type)), 3, pooling)
    model.eval()
    batch = tok(["the film is great", "a story", "he said it was not good and the movie was bad"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.encoder(**batch, output_hidden_states=True).hidden_states[1:]
        out = model(**batch)
        mask = batch["attention_mask"]
        for layer, hidden in enumerate(ref):
            pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            torch.testing.assert_close(out.pooled[:, layer], pooled, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.logits[:, layer], model.heads[layer](pooled), atol=1e-5, rtol=1e-5)
    assert out.logits.shape == (3, 3, 3)


def test_early_exit_path_runs_fewer_layers_and_matches_the_full_forward(tiny_bert):
    """Walk a batch up the layers as inference does: half the rows leave after layer 1 (their rows are dropped from
    the hidden states and mask), the rest go on; every exit's logits equal the full forward's at that layer."""
    model, tok = load_multi_exit(str(tiny_bert), 2)
    model.eval()
    calls = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    batch = tok(["the film is great", "a story", "he said it was bad", "good movie"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        full = model(**batch).logits
        calls.clear()
        hidden, layer_inputs = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        rows, attention = torch.arange(4), batch["attention_mask"]
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, layer_inputs)
            logits = model.exit_logits(index, model.pool(hidden, attention))
            torch.testing.assert_close(logits, full[rows, index], atol=1e-5, rtol=1e-5)
            stay = rows % 2 == 1 if index == 0 else torch.zeros_like(rows, dtype=torch.bool)
            rows, hidden, attention = rows[stay], hidden[stay], attention[stay]
            layer_inputs = select_rows(layer_inputs, stay)
            if rows.numel() == 0:
                break
    assert calls == [4, 2]  # layer 1 saw 4 rows, layer 2 the 2 that stayed, layer 3 never ran


def test_save_and_load_roundtrip(tiny_bert, tmp_path):
    model, tok = load_multi_exit(str(tiny_bert), 2, "mean")
    model.eval()
    model.save(tmp_path / "saved", tok)
    loaded, tok2, meta = MultiExitModel.load(tmp_path / "saved")
    batch = tok(["the movie was good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded.eval()(**batch).logits)
    assert meta["pooling"] == "mean" and loaded.num_layers == 3


def test_missing_backbone_says_what_to_do(tmp_path):
    with pytest.raises(BackboneError, match="backbone.name="):
        load_multi_exit(str(tmp_path / "no_such_model"), 2)
    with pytest.raises(BackboneError, match="pooling"):
        MultiExitModel(torch.nn.Module(), 2, pooling="max")


def test_weighted_ce_weights_deeper_layers_more():
    labels = torch.tensor([0, 1])
    logits = torch.zeros(2, 3, 2)
    logits[:, 2] = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # only layer 3 right
    per_layer = [torch.nn.functional.cross_entropy(logits[:, i], labels) for i in range(3)]
    expected = (1 * per_layer[0] + 2 * per_layer[1] + 3 * per_layer[2]) / 6
    torch.testing.assert_close(weighted_ce(logits, labels), expected)


def test_finetuning_fits_a_small_task(tiny_bert, tmp_path):
    (tmp_path / "train.tsv").write_text("text\ty\n" + "".join(
        f"{'great good film' if i % 2 else 'awful bad movie'} {i % 5}\t{'pos' if i % 2 else 'neg'}\n"
        for i in range(64)))
    data = load_task("custom", custom={"files": {"train": tmp_path / "train.tsv", "dev": tmp_path / "train.tsv"},
                                       "text_columns": ["text"], "label_column": "y"})
    torch.manual_seed(0)
    model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
    history = finetune(model, tok, data, FinetuneConfig(epochs=4, lr=1e-3, head_lr=3e-3, batch_size=16),
                       torch.device("cpu"))
    assert history["dev_accuracy_per_epoch"][-1][-1] == 1.0


def test_backbone_cache_ignores_dev_but_not_train(tiny_bert, tmp_path):
    from exitrl.backbones import load_or_finetune

    (tmp_path / "train.tsv").write_text("text\ty\n" + "".join(f"the film {i}\t{i % 2}\n" for i in range(16)))
    (tmp_path / "dev.tsv").write_text("text\ty\n" + "".join(f"a movie {i}\t{i % 2}\n" for i in range(8)))

    def load(**limit):
        data = load_task("custom", custom={"files": {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"},
                                           "text_columns": ["text"], "label_column": "y"}, limit=limit)
        return load_or_finetune(str(tiny_bert), data, FinetuneConfig(epochs=1), tmp_path / "c", torch.device("cpu"))[2]

    first = load()
    assert first["cached"] is False
    assert load(dev=4)["cached"] is True and load(dev=4)["key"] == first["key"]
    assert load(train=12)["key"] != first["key"]
