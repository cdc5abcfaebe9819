"""Fine-tuning throughput on 1 and N processes (issue 18), launched with torchrun, through exitrl's own loop
(`train_stages`: each global batch shared out row by row, DDP or FSDP2):

- ``--model encoder``: a BERT-base-shaped multi-exit encoder (12 layers, width 768, random weights) trained with
  weighted CE on SST-2 (examples/s);
- ``--model lm``: a SmolLM2-135M-shaped causal LM (30 layers, width 576, tied head, random weights) continued with
  LayerSkip on SST-2 sentences packed into chunks of ``--max-length`` tokens (tokens/s).

Prints and saves throughput per process count and the scaling efficiency (throughput on N ÷ N × throughput on 1).
``--dev`` also measures the encoder's last-exit dev accuracy after training, for each of ``--seeds``, so that 1 and N
processes can be compared at equal quality (mean ± std over seeds).

    python benchmarks/scale.py --processes 1 2 --out benchmarks/reference/scale_h200_DATE.json   # GPUs (NCCL)
    python benchmarks/scale.py --model lm --batch-size 32 --max-length 256 --processes 1 2       # SmolLM2 shape
    python benchmarks/scale.py --device cpu --shape small --processes 1 2 --steps 12 --out /tmp/scale_cpu.json
    python benchmarks/scale.py --device cpu --shape small --dev --seeds 0 1 2 --steps 1000 --lr 5e-4   # quality
    python benchmarks/scale.py --sweep --processes 1 2 --out OUT.json    # a 16+-point sweep on 1 and 2 workers

``--sweep`` times ``python -m exitrl.sweep`` with ``sweep.workers=N`` (one worker per GPU, or per CPU process) on a
backbone and trace that a first, untimed sweep put in the cache: the wall time is the points'.

The global batch is the same for every process count (``--batch-size`` rows, shared out), so N processes take the
optimiser steps one process takes: throughput is the only thing that changes. Timing: CUDA-synchronised wall time
over the steps after ``--warmup`` steps, measured on process 0. Weights are random because throughput does not
depend on them (and the GPU machine cannot reach the hub); tokenizers are built from the data's own words.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

SHAPES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "small": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)}
LM_SHAPES = {"smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=8192, rope_theta=100000.0),
             "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True,
                           max_position_embeddings=1024)}


def word_tokenizer(texts: list[str], size: int, folder: Path):
    """A WordPiece tokenizer over the data's own most frequent words (no hub access needed on the GPU machine)."""
    from transformers import BertTokenizerFast

    counts = Counter(word for text in texts for word in text.lower().split())
    words = [w for w, _ in counts.most_common(size - 5)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                     *words])}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def encoder_job(args, data, tokenizer):
    """The multi-exit encoder, its recipe and the tokenized training rows; items per row: 1 (examples/s)."""
    from transformers import BertConfig, BertModel

    from exitrl.backbones import FinetuneConfig
    from exitrl.backbones.batching import tokenize_split
    from exitrl.backbones.multi_exit import MultiExitModel

    config = BertConfig(vocab_size=len(tokenizer), **SHAPES[args.shape], max_position_embeddings=512)
    model = MultiExitModel(BertModel(config), data.num_labels)
    cfg = FinetuneConfig(batch_size=args.batch_size, epochs=1, lr=args.lr, seed=args.seed)
    return model, cfg, tokenize_split(tokenizer, data.splits["train"], args.max_length), 1


def lm_job(args, data, tokenizer):
    """The multi-exit causal LM, LayerSkip and packed chunks of ``max_length`` tokens; items per row: the chunk's
    tokens (tokens/s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from exitrl.backbones import FinetuneConfig
    from exitrl.backbones.multi_exit_lm import MultiExitLM
    from exitrl.data.lm_text import pack

    shape = dict(LM_SHAPES[args.shape])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    model = MultiExitLM(LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=0, bos_token_id=2, eos_token_id=3)))
    cfg = FinetuneConfig(objective="layerskip", batch_size=args.batch_size, epochs=1, lr=args.lr, seed=args.seed,
                         layerskip_p_max=0.1, layerskip_rotation=4)
    texts = list(data.splits["train"]["text_a"])
    return model, cfg, pack(tokenizer, texts, args.max_length, args.steps * args.batch_size), args.max_length


def worker(args) -> None:
    from exitrl.backbones.batching import tokenize_split
    from exitrl.backbones.finetune import per_layer_accuracy
    from exitrl.backbones.recipes import build_recipe
    from exitrl.backbones.training import train_stages
    from exitrl.core.distributed import start, stop
    from exitrl.data import load_task

    world, device = start(torch.device(args.device), args.sharding)
    rows = None if args.model == "lm" else args.steps * args.batch_size  # lm: pack from every sentence
    data = load_task("sst2", os.environ.get("EXITRL_DATA_DIR"), limit={"train": rows})
    tokenizer = word_tokenizer(list(data.splits["train"]["text_a"]), 30522,
                               Path(args.scratch) / f"tokenizer{world.rank}")
    torch.manual_seed(args.seed)
    model, cfg, examples, items_per_row = (lm_job if args.model == "lm" else encoder_job)(args, data, tokenizer)
    recipe = build_recipe(cfg)
    recipe.prepare(model)
    model.to(device)
    stamps: list[float] = []

    def on_step(step: int, loss: torch.Tensor, last: bool) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_stages(model, tokenizer, examples, recipe.stages(model), batch_size=cfg.batch_size, device=device,
                 generator=torch.Generator().manual_seed(args.seed), clip_norm=1.0, weight_decay=0.01,
                 warmup_ratio=0.1, desc="scale", on_step=on_step)
    if world.is_main:
        timed = stamps[args.warmup:]
        seconds = timed[-1] - timed[0]
        items = (len(timed) - 1) * args.batch_size * items_per_row
        tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
        result = {"processes": world.size, "sharding": args.sharding, "seed": args.seed,
                  "per_s": round(items / seconds, 1), "steps": len(stamps), "steps_timed": len(timed) - 1,
                  "seconds": round(seconds, 3), "mean_tokens_per_row": round(tokens, 1),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if device.type == "cuda":
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if args.dev and args.model == "encoder":
            dev = tokenize_split(tokenizer, data.splits["dev"], args.max_length)
            result["dev_accuracy"] = round(per_layer_accuracy(model, tokenizer, dev, device)[-1], 4)
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
    parser.add_argument("--model", choices=["encoder", "lm"], default="encoder")
    parser.add_argument("--shape", default=None, help="encoder: base | small; lm: smollm2 | small")
    parser.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dev", action="store_true", help="the encoder's last-exit dev accuracy after training")
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
    args.shape = args.shape or ("smollm2" if args.model == "lm" else "base")
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
    if args.shape not in (LM_SHAPES if args.model == "lm" else SHAPES):
        raise SystemExit(f"--shape {args.shape} is not a {args.model} shape: "
                         f"{', '.join(LM_SHAPES if args.model == 'lm' else SHAPES)}.")
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count()
    runs = []
    for count in args.processes:
        if count > available:
            print(f"{count} processes: skipped, this machine has {available} {args.device} device(s)", flush=True)
            continue
        for seed in args.seeds:
            Path(args.scratch).mkdir(parents=True, exist_ok=True)
            result = Path(args.scratch) / f"result_{count}_{seed}.json"
            result.unlink(missing_ok=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
                       __file__, "--worker", "--result", str(result), "--scratch", args.scratch, "--seed", str(seed),
                       *forwarded(args)]
            env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(command, check=True, env=env)
            runs.append(json.loads(result.read_text()))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs)
    unit = "tokens/s" if args.model == "lm" else "examples/s"
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "model": args.model,
              "shape": args.shape, "sharding": args.sharding, "global_batch": args.batch_size,
              "max_length": args.max_length, "lr": args.lr, "task": "SST-2", "unit": unit, "summary": summary,
              "runs": runs}
    print(f"| processes | {unit} | speedup | efficiency | dev accuracy | vs 1 process |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in summary:
        print(f"| {row['processes']} | {row['per_s']} | {row.get('speedup', '')} | {row.get('efficiency', '')} | "
              f"{row.get('dev_accuracy', '')} | {row.get('dev_accuracy_difference', '')} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


def forwarded(args) -> list[str]:
    """The worker's copy of the settings that shape a run."""
    return ["--device", args.device, "--model", args.model, "--shape", args.shape, "--sharding", args.sharding,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--max-length", str(args.max_length), "--lr", str(args.lr), *(["--dev"] if args.dev else [])]


def summarise(runs: list[dict]) -> list[dict]:
    """Per process count: mean throughput over seeds, speedup and efficiency against 1 process, dev accuracy as
    mean ± std (sample std; a single seed has none)."""
    rows = []
    for count in sorted({run["processes"] for run in runs}):
        mine = [run for run in runs if run["processes"] == count]
        row = {"processes": count, "seeds": len(mine), "per_s": round(statistics.mean(r["per_s"] for r in mine), 1)}
        accuracies = [r["dev_accuracy"] for r in mine if "dev_accuracy" in r]
        if accuracies:
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            row["dev_accuracy"] = f"{100 * statistics.mean(accuracies):.2f} ± {100 * spread:.2f}"
        rows.append(row)
    single = next((row for row in rows if row["processes"] == 1), None)
    for row in rows if single else []:
        row["speedup"] = round(row["per_s"] / single["per_s"], 3)
        row["efficiency"] = round(row["speedup"] / row["processes"], 3)
        one = [r["dev_accuracy"] for r in runs if r["processes"] == 1 and "dev_accuracy" in r]
        mine = [r["dev_accuracy"] for r in runs if r["processes"] == row["processes"] and "dev_accuracy" in r]
        if row["processes"] > 1 and min(len(one), len(mine)) > 1:
            row["dev_accuracy_difference"] = welch_interval(mine, one)
    return rows


def welch_interval(a: list[float], b: list[float]) -> str:
    """mean(a) − mean(b) in points with Welch's 95% interval (unequal variances, t with Welch–Satterthwaite df)."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff, half = statistics.mean(a) - statistics.mean(b), stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    return f"{100 * diff:+.2f} (95% CI {100 * (diff - half):+.2f} to {100 * (diff + half):+.2f})"


if __name__ == "__main__":
    main()
