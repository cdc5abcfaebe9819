"""Tokenise a split once and serve dynamically padded batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import datasets


def tokenize_split(tokenizer, split: datasets.Dataset, max_length: int) -> list[dict]:
    """One dict of token ids per example (unpadded), with its label."""
    text_b = split["text_b"]
    pairs = text_b is not None and any(t is not None for t in text_b)
    enc = tokenizer(list(split["text_a"]), list(text_b) if pairs else None, truncation=True, max_length=max_length)
    labels = list(split["label"])
    cut = sum(len(ids) >= max_length for ids in enc["input_ids"])
    if cut:
        log.warning("%d of %d rows reach max_length=%d tokens; longer ones are cut there "
                    "(backbone.finetune.max_length= to change it).", cut, len(labels), max_length)
    return [{**{k: enc[k][i] for k in enc.keys()}, "labels": labels[i]} for i in range(len(labels))]


def by_length(examples: list[dict]) -> list[int]:
    """Indices of ``examples`` from shortest to longest: batches in this order pad almost nothing (inference,
    where the order does not matter or is undone)."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))


def batch_order(examples: list[dict], batch_size: int, shuffle: bool, generator) -> list[list[int]]:
    """Index lists of batches. Shuffled batches group similar lengths (within windows of 50 batches) so that
    dynamic padding wastes little compute on the CPU, and the order of batches is then shuffled again."""
    n = len(examples)
    if not shuffle:
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator).tolist()
    window = 50 * batch_size
    batches = []
    for w in range(0, n, window):
        part = sorted(order[w:w + window], key=lambda i: len(examples[i]["input_ids"]))
        batches += [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def iterate_batches(tokenizer, examples: list[dict], batch_size: int, device: torch.device,
                    shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0) -> Iterator[dict]:
    """Padded batches on ``device``; padding only to the longest example of each batch. ``skip`` leaves out the
    first batches of the order (a resumed epoch), drawing the same order as a whole epoch would."""
    for chunk_ids in batch_order(examples, batch_size, shuffle, generator)[skip:]:
        yield padded_batch(tokenizer, [examples[i] for i in chunk_ids], device)


def padded_batch(tokenizer, chunk: list[dict], device: torch.device) -> dict:
    """One batch of examples padded to its longest, with ``labels``, on ``device``."""
    labels = torch.tensor([c["labels"] for c in chunk])
    padded = tokenizer.pad([{k: v for k, v in c.items() if k != "labels"} for c in chunk], return_tensors="pt")
    batch = {k: v.to(device) for k, v in padded.items()}
    batch["labels"] = labels.to(device)
    return batch
