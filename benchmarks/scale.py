"""Fine-tuning throughput on 1 and N processes (issue 18): a BERT-base-shaped multi-exit encoder (12 layers, width
768, random weights) trained with weighted CE on SST-2 through exitrl's own loop (`train_stages`, DDP over row shares
of each global batch), launched with torchrun. Prints and saves examples/s per process count and the scaling
efficiency (throughput on N ÷ N × throughput on 1).

    python benchmarks/scale.py --processes 1 2 --out benchmarks/reference/scale_h200_DATE.json   # GPUs (NCCL)
    python benchmarks/scale.py --device cpu --shape small --processes 1 2 --steps 12 --out /tmp/scale_cpu.json
    python benchmarks/scale.py --sweep --processes 1 2 --out OUT.json    # a 16+-point sweep on 1 and 2 workers

``--sweep`` times ``python -m exitrl.sweep`` with ``sweep.workers=N`` (one worker per GPU, or per CPU process) on a
backbone and trace that a first, untimed sweep put in the cache: the wall time is the points'.

The global batch is the same for every process count (``--batch-size`` rows, shared out), so N processes take the
optimiser steps one process takes: throughput is the only thing that changes. Timing: CUDA-synchronised wall time
over the steps after ``--warmup`` steps, measured on process 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

SHAPES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "small": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)}


def word_tokenizer(texts: list[str], size: int, folder: Path):
    """A WordPiece tokenizer over the data's own most frequent words (no hub access needed on the GPU machine)."""
    from transformers import BertTokenizerFast

    counts = Counter(word for text in texts for word in text.lower().split())
    words = [w for w, _ in counts.most_common(size - 5)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                     *words])}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def worker(args) -> None:
    from transformers import BertConfig, BertModel

    from exitrl.backbones import FinetuneConfig
    from exitrl.backbones.batching import tokenize_split
    from exitrl.backbones.multi_exit import MultiExitModel
    from exitrl.backbones.recipes import build_recipe
    from exitrl.backbones.training import train_stages
    from exitrl.data import load_task
    from exitrl.distributed import start, stop

    requested = torch.device(args.device)
    world, device = start(requested)
    data = load_task("sst2", os.environ.get("EXITRL_DATA_DIR"), limit={"train": args.steps * args.batch_size})
    texts = list(data.splits["train"]["text_a"])
    tokenizer = word_tokenizer(texts, 30522, Path(args.scratch) / f"tokenizer{world.rank}")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), **SHAPES[args.shape], max_position_embeddings=512)
    model = MultiExitModel(BertModel(config), data.num_labels)
    cfg = FinetuneConfig(batch_size=args.batch_size, epochs=1, lr=2e-5, seed=0)
    recipe = build_recipe(cfg)
    recipe.prepare(model)
    model.to(device)
    examples = tokenize_split(tokenizer, data.splits["train"], args.max_length)
    stamps: list[float] = []

    def on_step(step: int, loss: torch.Tensor, last: bool) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    train_stages(model, tokenizer, examples, recipe.stages(model), batch_size=cfg.batch_size, device=device,
                 generator=torch.Generator().manual_seed(0), clip_norm=1.0, weight_decay=0.01, warmup_ratio=0.1,
                 desc="scale", on_step=on_step)
    if world.is_main:
        timed = stamps[args.warmup:]
        seconds = timed[-1] - timed[0]
        rows = (len(timed) - 1) * args.batch_size
        tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
        result = {"processes": world.size, "examples_per_s": round(rows / seconds, 1), "steps_timed": len(timed) - 1,
                  "seconds": round(seconds, 3), "mean_tokens_per_example": round(tokens, 1),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        Path(args.result).write_text(json.dumps(result))
    stop()


SWEEP = ["agent=reinforce,confidence,patience,static", "env=rte", "data.limit.train=800", "data.limit.dev=277",
         "backbone.finetune.epochs=1", "data.policy_split=0.25", "sweep.grids.reinforce=[0.005,0.01,0.02,0.05]",
         "sweep.grids.confidence=[0.95,0.9,0.8,0.7,0.6]", "sweep.curve=false", "sweep.adaptive=false"]


def time_sweeps(args) -> list[dict]:
    """Wall time of the same sweep on each worker count, after an untimed run that fills the cache."""
    import shutil

    scratch = Path(args.scratch) / "sweep"
    shutil.rmtree(scratch, ignore_errors=True)
    device = [f"device={args.device}"]
    env = {**os.environ, "EXITRL_CACHE_DIR": str(scratch / "cache"), "TQDM_DISABLE": "1"}
    base = [sys.executable, "-m", "exitrl.sweep", *SWEEP, *device, *args.sweep_overrides]
    subprocess.run([*base, f"sweep.out={scratch / 'warm'}", "sweep.grids.reinforce=[0.01]",
                    "sweep.grids.confidence=[0.9]"], check=True, env=env)
    runs = []
    for workers in args.processes:
        started = time.perf_counter()
        subprocess.run([*base, f"sweep.out={scratch / f'workers{workers}'}", f"sweep.workers={workers}"], check=True,
                       env=env)
        points = len(list((scratch / f"workers{workers}").rglob("metrics.json")))
        runs.append({"workers": workers, "seconds": round(time.perf_counter() - started, 1), "points": points})
        print(json.dumps(runs[-1]), flush=True)
    for run in runs:
        run["speedup"] = round(runs[0]["seconds"] / run["seconds"], 3)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="time a sweep on each worker count instead")
    parser.add_argument("--sweep-overrides", nargs="*", default=[], help="extra exitrl.sweep overrides")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="/tmp/exitrl-scale", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.sweep:
        runs = time_sweeps(args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                            "sweep": SWEEP + args.sweep_overrides, "runs": runs}, indent=1))
        return
    if args.warmup + 2 > args.steps:
        raise SystemExit(f"--steps must exceed --warmup + 1 ({args.warmup + 1}).")
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count()
    runs = []
    for count in args.processes:
        if count > available:
            print(f"{count} processes: skipped, this machine has {available} {args.device} device(s)", flush=True)
            continue
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        result = Path(args.scratch) / f"result_{count}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
                   __file__, "--worker", "--result", str(result), "--scratch", args.scratch, "--device", args.device,
                   "--shape", args.shape, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--max-length", str(args.max_length)]
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(command, check=True, env=env)
        runs.append(json.loads(result.read_text()))
        print(json.dumps(runs[-1]), flush=True)
    single = next((r for r in runs if r["processes"] == 1), None)
    for run in runs:
        if single:
            run["speedup"] = round(run["examples_per_s"] / single["examples_per_s"], 3)
            run["efficiency"] = round(run["speedup"] / run["processes"], 3)
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "shape": args.shape,
              "global_batch": args.batch_size, "max_length": args.max_length, "task": "SST-2", "runs": runs}
    print("| processes | examples/s | speedup | efficiency |\n| ---: | ---: | ---: | ---: |")
    for run in runs:
        print(f"| {run['processes']} | {run['examples_per_s']} | {run.get('speedup', '')} | "
              f"{run.get('efficiency', '')} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
