"""Cross-fitting: K folds whose union is train, each traced by a backbone that never saw it (checked by example
ids), assembled in the training split's order; bad values are refused before any work."""

from __future__ import annotations

import pytest
import torch

from exitrl.backbones import FinetuneConfig
from exitrl.backbones.loading import load_multi_exit
from exitrl.data import load_task
from exitrl.traces.build import build_trace
from exitrl.traces.crossfit import check_crossfit, crossfit_folds, crossfit_plans, crossfit_train, fold_data


def test_folds_partition_the_rows():
    folds = crossfit_folds(103, 4, seed=1)
    joined = torch.cat(folds)
    assert sorted(joined.tolist()) == list(range(103)) and all(len(f) in (25, 26) for f in folds)
    assert torch.equal(torch.cat(crossfit_folds(103, 4, seed=1)), joined)  # the same seed, the same folds


@pytest.mark.parametrize("bad", [1, -2, "3", 2.5, True])
def test_bad_fold_counts_are_refused(bad):
    with pytest.raises(ValueError, match="data.crossfit"):
        check_crossfit(bad)


def test_crossfit_train_trace(tiny_bert, tmp_path):
    lines = ["text\ty", *(f"{'good fine' if i % 2 else 'bad poor'} row{i}\t{'pos' if i % 2 else 'neg'}"
                          for i in range(48))]
    (tmp_path / "train.tsv").write_text("\n".join(lines[:37]) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join([lines[0], *lines[37:]]) + "\n")
    data = load_task("custom", custom={"files": {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"},
                                       "text_columns": ["text"], "label_column": "y"})
    train_texts = list(data.splits["train"]["text_a"])
    plans = crossfit_plans(data, 3, seed=0)
    for plan in plans:  # each fold backbone trains on the other folds only: no example id in both
        part = fold_data(data, plan)
        seen, traced = set(part.splits["train"]["text_a"]), set(part.splits["fold"]["text_a"])
        assert not seen & traced and seen | traced == set(train_texts)
        assert traced == {train_texts[i] for i in plan.traced.tolist()}
    assert sorted(torch.cat([p.traced for p in plans]).tolist()) == list(range(len(train_texts)))

    settings = FinetuneConfig(epochs=1, batch_size=8, max_length=16, lr=1e-3, head_lr=1e-2)
    model, tokenizer = load_multi_exit(str(tiny_bert), 2, "mean")
    deployed = build_trace(model, tokenizer, data, 16, torch.device("cpu"), meta={"key": "deployed"})
    crossed = crossfit_train(deployed, data, str(tiny_bert), settings, tmp_path / "cache", torch.device("cpu"), 3)
    train = crossed["train"]
    assert len(train) == len(train_texts) and torch.equal(train.labels, deployed["train"].labels)
    assert torch.equal(crossed["dev"].logits, deployed["dev"].logits)  # dev stays the deployed backbone's
    assert not torch.allclose(train.logits, deployed["train"].logits)  # other backbones traced train
    assert crossed.meta["crossfit"] == 3 and len(set(crossed.meta["crossfit_backbones"])) == 3
    assert crossed.meta["key"] != "deployed"
    # each fold's rows carry exactly what its own backbone computes (order restored), and a rerun reuses the cache
    again = crossfit_train(deployed, data, str(tiny_bert), settings, tmp_path / "cache", torch.device("cpu"), 3)
    assert torch.equal(again["train"].logits, train.logits)
