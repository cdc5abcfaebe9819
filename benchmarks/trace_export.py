"""Fine-tune and trace a task, then export the trace in files small enough to copy off a lent GPU machine.

The GPU machine's results come back in at most 8 files of 16 MiB, so the dev split travels whole and the train
split as a random subset in chunks; `load_exported_trace` puts them back together as one `Trace`. Also writes
the fine-tuning record (time, per-layer dev accuracy) as JSON:

    python benchmarks/trace_export.py --task sst2 --backbone PATH --data-dir DIR --out OUT \
        --epochs 2 --batch-size 32 --train-rows 12000 --chunk-rows 3000 [--policy-split 0.1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.device import pick_device
from exitrl.data import load_task
from exitrl.evaluation.evaluate import oracle_bounds
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.trace import SplitTrace, Trace


def load_exported_trace(folder: str | Path) -> Trace:
    """Reassemble ``dev.pt``, ``train_*.pt`` and ``policy_*.pt`` (the held-out split, if any) written here."""
    folder = Path(folder)
    if not (folder / "dev.pt").is_file() or not list(folder.glob("train_*.pt")):
        raise FileNotFoundError(f"{folder} holds no exported trace (dev.pt and train_*.pt).")
    dev = Trace.load(folder / "dev.pt")
    splits = {}
    for split in ("train", "policy"):
        parts = [Trace.load(p)[split] for p in sorted(folder.glob(f"{split}_*.pt"))]
        if parts:
            splits[split] = SplitTrace(*(None if tables[0] is None else torch.cat(tables)
                                         for tables in zip(*(p.tables() for p in parts))))
    return Trace({**splits, "dev": dev["dev"]}, dev.meta)


def save_chunks(split: SplitTrace, name: str, rows: torch.Tensor, chunk_rows: int, meta: dict, out: Path) -> None:
    for i, first in enumerate(range(0, len(rows), chunk_rows)):
        take = rows[first:first + chunk_rows]
        part = split.select(take)
        Trace({name: part}, meta).save(out / f"{name}_{i}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train-rows", type=int, default=12_000, help="random train rows to export")
    parser.add_argument("--chunk-rows", type=int, default=3000)
    parser.add_argument("--policy-split", type=float, default=0.0, help="fraction of train held out (exported whole)")
    parser.add_argument("--cache", default="/tmp/exitrl_cache")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    data = load_task(args.task, args.data_dir, policy_split=args.policy_split)
    start = time.time()
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    model, tokenizer, info = load_or_finetune(args.backbone, data, cfg, args.cache, device, args.pooling)
    finetune_seconds = time.time() - start
    trace = load_or_build_trace(model, tokenizer, data, args.cache, device, cfg.max_length)
    trace_seconds = time.time() - start - finetune_seconds
    train = trace["train"]
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.train_rows].sort().values
    save_chunks(train, "train", rows, args.chunk_rows, trace.meta, out)
    if "policy" in trace.splits:
        save_chunks(trace["policy"], "policy", torch.arange(len(trace["policy"])), args.chunk_rows, trace.meta, out)
    Trace({"dev": trace["dev"]}, {**trace.meta, "exported_train_rows": len(rows), "train_rows": len(train)}).save(
        out / "dev.pt")
    summary = {"task": data.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "splits": {k: len(v) for k, v in data.splits.items()}, "finetune": info.get("finetune"),
               "finetune_seconds": round(finetune_seconds, 1), "trace_seconds": round(trace_seconds, 1),
               "dev_accuracy_per_epoch": info.get("dev_accuracy_per_epoch"),
               "train_per_layer": train.per_layer_accuracy(), "oracle_dev": oracle_bounds(trace["dev"], data.metric),
               "exported_train_rows": len(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
