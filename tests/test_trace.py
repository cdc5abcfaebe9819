"""Memorized layer on hand-made cases; trace reuse and invalidation by content."""

from __future__ import annotations

import torch

from exitrl.backbones import load_multi_exit
from exitrl.data import load_task
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.trace import Trace, memorized_layers


def _logits_from_predictions(preds):
    preds = torch.tensor(preds)
    return torch.nn.functional.one_hot(preds, 2).float() * 4 - 2


def test_memorized_layer_hand_cases():
    # label 1 everywhere; rows are per-layer predictions of a 4-layer model
    preds = [
        [1, 1, 1, 1],  # right from layer 1 on -> 1
        [0, 1, 1, 1],  # -> 2
        [1, 0, 1, 1],  # wrong at 2, right after -> 3
        [1, 1, 1, 0],  # last head wrong -> L
        [0, 0, 0, 0],  # never right -> L
        [0, 0, 0, 1],  # only the last -> 4
    ]
    labels = torch.ones(6, dtype=torch.long)
    assert memorized_layers(_logits_from_predictions(preds), labels).tolist() == [1, 2, 3, 4, 4, 4]


def _tiny_data(tmp_path, n=24, suffix=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = "".join(f"the film is {'good' if i % 2 else 'bad'} {suffix}\t{i % 2}\n" for i in range(n))
    (tmp_path / "train.tsv").write_text("text\ty\n" + text)
    (tmp_path / "dev.tsv").write_text("text\ty\n" + text[: len(text) // 2])
    return load_task("custom", custom={"files": {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"},
                                       "text_columns": ["text"], "label_column": "y"})


def test_trace_is_reused_and_rebuilt_on_any_change(tiny_bert, tmp_path):
    cache = tmp_path / "cache"
    data = _tiny_data(tmp_path / "d1")
    model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
    first = load_or_build_trace(model, tok, data, cache, torch.device("cpu"))
    files = sorted((cache / "traces").glob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = load_or_build_trace(model, tok, data, cache, torch.device("cpu"))
    assert files[0].stat().st_mtime_ns == stamp and again.meta["key"] == first.meta["key"]
    torch.testing.assert_close(again["train"].logits, first["train"].logits)

    keys = {first.meta["key"]}
    keys.add(load_or_build_trace(model, tok, _tiny_data(tmp_path / "d2", suffix="x"), cache, "cpu").meta["key"])
    keys.add(load_or_build_trace(model, tok, data, cache, "cpu", max_length=8).meta["key"])
    with torch.no_grad():
        model.heads[0].bias.add_(0.1)
    keys.add(load_or_build_trace(model, tok, data, cache, "cpu").meta["key"])
    assert len(keys) == 4 and len(list((cache / "traces").glob("*.pt"))) == 4


def test_trace_contents_match_the_model(tiny_bert, tmp_path):
    data = _tiny_data(tmp_path)
    model, tok = load_multi_exit(str(tiny_bert), 2, "mean")
    trace = load_or_build_trace(model, tok, data, tmp_path / "cache", "cpu")
    split = trace["train"]
    assert split.states.shape == (24, 3, 32) and split.logits.shape == (24, 3, 2)
    batch = tok([data.splits["train"]["text_a"][0]], return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**batch)
    torch.testing.assert_close(split.logits[0], out.logits[0], atol=1e-4, rtol=1e-4)
    assert split.memorized.tolist() == memorized_layers(split.logits, split.labels).tolist()
    loaded = Trace.load(next((tmp_path / "cache" / "traces").glob("*.pt")))
    torch.testing.assert_close(loaded["dev"].states, trace["dev"].states)


def test_trace_key_survives_saving_the_backbone(tiny_bert, tmp_path):
    """The first run traces the freshly fine-tuned model; later runs load it from the cache folder. Both must map
    to the same trace, or every second run would trace again."""
    from exitrl.backbones import MultiExitModel
    from exitrl.core.hashing import hash_tokenizer
    from exitrl.traces.build import trace_key

    data = _tiny_data(tmp_path / "d")
    model, tok = load_multi_exit(str(tiny_bert), 2, "mean")
    model.save(tmp_path / "saved", tok)
    loaded, loaded_tok, _ = MultiExitModel.load(tmp_path / "saved")
    assert hash_tokenizer(loaded_tok) == hash_tokenizer(tok)
    from transformers import AutoTokenizer

    cased = AutoTokenizer.from_pretrained(str(tiny_bert), do_lower_case=False)
    assert hash_tokenizer(cased) != hash_tokenizer(tok)  # changes the ids, so it must change the keys
    assert trace_key(loaded, loaded_tok, data, {}) == trace_key(model, tok, data, {})
