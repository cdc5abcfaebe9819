"""Trace a frozen multi-exit backbone once per split, so envs replay it as tensor lookups.

Per example: every layer's pooled state and exit logits, the label and the memorized layer (ConsistentEE Eq. 7).
Traces live on disk under a content-hash key of the backbone weights (heads included), the data and the
settings: unchanged inputs reuse the file, any change rebuilds it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from exitrl.backbones.batching import iterate_batches, tokenize_split
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.device import autocast
from exitrl.hashing import hash_json, hash_state_dict, hash_tokenizer

if TYPE_CHECKING:
    from exitrl.data import TaskData

log = logging.getLogger(__name__)
TRACE_FORMAT = 1


def memorized_layers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Smallest 1-indexed layer l such that heads l..L all predict the label; L when head L is wrong."""
    correct = logits.argmax(-1) == labels[:, None]  # [N, L]
    num_layers = correct.shape[1]
    suffix_all = correct.flip(1).int().cumprod(1).flip(1).bool()  # suffix_all[:, l] = all(correct[:, l:])
    first = torch.where(suffix_all.any(1), suffix_all.int().argmax(1) + 1, torch.full_like(labels, num_layers))
    return first.long()


@dataclass
class SplitTrace:
    """One split: ``states [N, L, H]``, ``logits [N, L, C]``, ``labels [N]``, ``memorized [N]`` (1-indexed)."""

    states: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    memorized: torch.Tensor

    def __post_init__(self):
        n, layers = self.logits.shape[:2]
        if self.states.shape[:2] != (n, layers) or self.labels.shape != (n,) or self.memorized.shape != (n,):
            raise ValueError("Inconsistent trace shapes: states, logits, labels and memorized must share N and L.")

    @classmethod
    def from_logits(cls, states: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> SplitTrace:
        return cls(states, logits.float(), labels.long(), memorized_layers(logits, labels.long()))

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    def to(self, device) -> SplitTrace:
        return SplitTrace(*(t.to(device) for t in (self.states, self.logits, self.labels, self.memorized)))

    def per_layer_accuracy(self) -> list[float]:
        return (self.logits.argmax(-1) == self.labels[:, None]).float().mean(0).tolist()


@dataclass
class Trace:
    splits: dict[str, SplitTrace]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitTrace:
        if split not in self.splits:
            raise KeyError(f"Trace has no split {split!r}; it has {sorted(self.splits)}.")
        return self.splits[split]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": TRACE_FORMAT, "meta": self.meta,
                   "splits": {k: vars(v) for k, v in self.splits.items()}}
        tmp = path.with_suffix(".partial")
        torch.save(payload, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path} was written by another trace format; delete it to rebuild.")
        return cls({k: SplitTrace(**v) for k, v in payload["splits"].items()}, payload["meta"])


@torch.no_grad()
def build_trace(model: MultiExitModel, tokenizer, data: TaskData, max_length: int, device: torch.device,
                batch_size: int = 64, meta: dict | None = None) -> Trace:
    """Run the backbone once over every split of ``data``."""
    device = torch.device(device)
    model.to(device).eval()
    splits = {}
    for name, ds in data.splits.items():
        examples = tokenize_split(tokenizer, ds, max_length)
        states, logits = [], []
        for batch in tqdm(iterate_batches(tokenizer, examples, batch_size, device),
                          total=(len(examples) + batch_size - 1) // batch_size, desc=f"trace {data.name}/{name}",
                          unit="batch"):
            batch.pop("labels")
            with autocast(device):
                out = model(**batch)
            states.append(out.pooled.to(torch.float16).cpu())
            logits.append(out.logits.float().cpu())
        splits[name] = SplitTrace.from_logits(torch.cat(states), torch.cat(logits), torch.tensor(ds["label"]))
    return Trace(splits, dict(meta or {}))


def trace_key(model: MultiExitModel, tokenizer, data: TaskData, settings: dict) -> str:
    return hash_json({"weights": hash_state_dict(model), "tokenizer": hash_tokenizer(tokenizer),
                      "data": data.fingerprint(), "settings": settings, "format": TRACE_FORMAT})


def load_or_build_trace(model: MultiExitModel, tokenizer, data: TaskData, cache_dir: str | Path,
                        device: torch.device, max_length: int = 128, objective: str = "weighted_ce") -> Trace:
    """The cached trace for exactly these weights, data and settings, building it when absent. ``objective`` names
    the recipe the backbone was trained with; it is part of the key and the meta, so traces say where they came
    from."""
    device = torch.device(device)
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"  # see exitrl.device.autocast
    settings = {"max_length": max_length, "pooling": model.pooling, "splits": sorted(data.splits),
                "precision": precision, "objective": objective}
    key = trace_key(model, tokenizer, data, settings)
    path = Path(cache_dir).expanduser() / "traces" / f"{data.name}-{key}.pt"
    if path.is_file():
        log.info("Reusing trace %s", path)
        return Trace.load(path)
    meta = {"key": key, "task": data.name, "label_names": list(data.label_names), "metric": data.metric,
            **settings}
    trace = build_trace(model, tokenizer, data, max_length, device, meta=meta)
    trace.save(path)
    (path.with_suffix(".json")).write_text(json.dumps(meta, indent=2))
    log.info("Saved trace %s", path)
    return trace
