"""Cross-fitted training states (``data.crossfit=K``): agents learn from states of examples the backbone never saw,
over the whole training split, like the states they meet at inference.

Training-split states of the deployed backbone are overfit (RTE: heads right on 67–94 % of train but 54–61 % of
dev), so an agent learning on them learns that exiting early is almost free. Here train is cut into K folds; for
each fold a backbone is fine-tuned on the other K − 1 folds (same recipe, settings and seed) and traces that fold.
The folds' traces, put back in the training split's order, replace the train split of the run's trace; the deployed
backbone is still fine-tuned on all of train and traces the held-out split and dev, as without cross-fitting. The
fold backbones and traces are cached like any (their keys cover their data), so a second run costs nothing; a first
one costs K more fine-tunings on (K − 1)/K of the data each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.hashing import hash_json
from exitrl.data import TaskData, select_rows
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.trace import SplitTrace, Trace

log = logging.getLogger(__name__)
FOLD = "fold"  # the split name each fold backbone traces


def check_crossfit(folds: int, train_size: int | None = None) -> int:
    """``data.crossfit``: 0 (off) or K >= 2 folds, each with at least one row."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 0 or folds == 1:
        raise ValueError(f"data.crossfit={folds!r} must be 0 (off) or a number of folds >= 2, e.g. data.crossfit=3.")
    if folds and train_size is not None and train_size < folds:
        raise ValueError(f"data.crossfit={folds} needs at least {folds} training rows, train has {train_size}.")
    return folds


def crossfit_folds(size: int, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint sets of row indices (sorted) whose union is ``range(size)``, drawn with ``seed``."""
    check_crossfit(folds, size)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return [order[k::folds].sort().values for k in range(folds)]


@dataclass
class FoldPlan:
    """What fold ``k``'s backbone was fine-tuned on and what it traced (row indices of the training split)."""

    trained_on: torch.Tensor
    traced: torch.Tensor


def fold_data(data: TaskData, plan: FoldPlan) -> TaskData:
    """The task as fold backbone sees it: train = the other folds, and the fold itself as the one split it traces."""
    train = data.splits["train"]
    splits = {"train": select_rows(train, plan.trained_on.tolist()), FOLD: select_rows(train, plan.traced.tolist())}
    return TaskData(data.name, data.label_names, data.metric, splits, data.source)


def crossfit_plans(data: TaskData, folds: int, seed: int = 0) -> list[FoldPlan]:
    parts = crossfit_folds(len(data.splits["train"]), folds, seed)
    return [FoldPlan(torch.cat([p for j, p in enumerate(parts) if j != k]).sort().values, part)
            for k, part in enumerate(parts)]


def crossfit_train(trace: Trace, data: TaskData, backbone: str, finetune: FinetuneConfig, cache_dir: str | Path,
                   device: torch.device, folds: int, pooling: str = "mean", package: str | None = None,
                   checkpoint_seconds: float = 300.0) -> Trace:
    """``trace`` with its train split replaced by the cross-fitted one (see the module docstring); its meta
    records the folds and a key that covers them."""
    plans = crossfit_plans(data, folds, finetune.seed)
    n = len(data.splits["train"])
    states = logits = None
    keys = []
    for k, plan in enumerate(plans, 1):
        log.info("Cross-fitting fold %d/%d: fine-tune on %d rows, trace %d", k, folds, len(plan.trained_on),
                 len(plan.traced))
        part = fold_data(data, plan)
        model, tokenizer, info = load_or_finetune(backbone, part, finetune, cache_dir, device, pooling, package,
                                                  checkpoint_seconds=checkpoint_seconds)
        traced = load_or_build_trace(model, tokenizer, TaskData(part.name, part.label_names, part.metric,
                                                                {FOLD: part.splits[FOLD]}, part.source),
                                     cache_dir, device, finetune.max_length, objective=finetune.objective)[FOLD]
        if states is None:
            states = torch.empty((n, *traced.states.shape[1:]), dtype=traced.states.dtype)
            logits = torch.empty((n, *traced.logits.shape[1:]), dtype=traced.logits.dtype)
        states[plan.traced], logits[plan.traced] = traced.states, traced.logits
        keys.append(info["key"])
        del model
    labels = torch.tensor(data.splits["train"]["label"])
    splits = {**trace.splits, "train": SplitTrace.from_logits(states, logits, labels)}
    meta = {**trace.meta, "crossfit": folds, "crossfit_backbones": keys,
            "key": hash_json({"trace": trace.meta.get("key"), "crossfit": keys})}
    return Trace(splits, meta)
