"""Trace a frozen multi-exit backbone once per split, and cache the trace on disk under a content-hash key of the
backbone weights (heads included), the tokenizer, the data and the settings: unchanged inputs reuse the file, any
change rebuilds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from exitrl.backbones.batching import batch_order, by_length, padded_batch, tokenize_split
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.core.checkpoint import CorruptFile, write_atomic
from exitrl.core.device import autocast, varied_shape_attention
from exitrl.core.distributed import barrier, current_world, in_order
from exitrl.core.hashing import hash_json, hash_state_dict, hash_tokenizer
from exitrl.core.progress import progress
from exitrl.data import TaskData
from exitrl.traces.trace import STATE_DTYPE, TRACE_FORMAT, SplitTrace, Trace

log = logging.getLogger(__name__)


@torch.no_grad()
def build_trace(model: MultiExitModel, tokenizer, data: TaskData, max_length: int, device: torch.device,
                batch_size: int = 64, meta: dict | None = None) -> Trace:
    """Run the backbone once over every split of ``data``. Under several processes each runs every size-th batch
    and every process gets the merged trace: the same batches, so the same numbers, as one process makes."""
    device = torch.device(device)
    model.to(device).eval()
    world = current_world()
    splits = {}
    for name, ds in data.splits.items():
        examples = tokenize_split(tokenizer, ds, max_length)
        order = by_length(examples)  # run shortest first (little padding), then put rows back in split order
        examples = [examples[i] for i in order]
        batches = batch_order(examples, batch_size, False, None)
        mine = {}
        for number in progress(range(world.rank, len(batches), world.size), desc=f"trace {data.name}/{name}",
                               unit="batch"):
            batch = padded_batch(tokenizer, [examples[i] for i in batches[number]], device)
            batch.pop("labels")
            with autocast(device), varied_shape_attention():
                out = model(**batch)
            mine[number] = (out.pooled.to(STATE_DTYPE).cpu(), out.logits.float().cpu())
        parts = in_order(mine)
        states, logits = [p[0] for p in parts], [p[1] for p in parts]
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        splits[name] = SplitTrace.from_logits(torch.cat(states)[back], torch.cat(logits)[back],
                                              torch.tensor(ds["label"]))
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
    precision = "bf16-autocast" if device.type == "cuda" else "fp32"  # see exitrl.core.device.autocast
    settings = {"max_length": max_length, "pooling": model.pooling, "splits": sorted(data.splits),
                "precision": precision, "objective": objective}
    key = trace_key(model, tokenizer, data, settings)
    path = Path(cache_dir).expanduser() / "traces" / f"{data.name}-{key}.pt"
    if path.is_file():
        try:
            trace = Trace.load(path)
            log.info("Reusing trace %s", path)
            return trace
        except CorruptFile as err:
            log.warning("%s; rebuilding it.", err)
    meta = {"key": key, "task": data.name, "label_names": list(data.label_names), "metric": data.metric,
            **settings}
    trace = build_trace(model, tokenizer, data, max_length, device, meta=meta)
    if current_world().is_main:
        trace.save(path)
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        log.info("Saved trace %s", path)
    barrier()
    return trace
