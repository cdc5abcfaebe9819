"""Wall-clock speed of early-exit inference: HF eager full forward, exitrl's full forward (the runtime with no
exits), a naive early-exit loop (every row computed until all have exited, one host read per layer) and the exitrl
runtime (compaction), for static exits at L/4, L/2, 3L/4 and, with ``--run``, a trained policy on real text.

    python benchmarks/inference_speed.py --device cpu --shapes minilm --batches 32 --reps 5 \
        --run runs/rte/reinforce/<time> --texts ../shared/data/glue/RTE/dev.tsv --out benchmarks/reference/x.json

Random weights for the shapes (speed does not depend on the values); ms per batch is the median of ``--reps`` timed
calls after ``--warmup`` calls, with CUDA synchronised around each. Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.data import read_texts
from exitrl.device import autocast
from exitrl.runtime import EarlyExitClassifier, LiveSource
from exitrl.walk import walk

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.no_grad()
def naive_loop(model: MultiExitModel, policy, ids, mask) -> None:
    """Research-code style: every row runs every layer until all rows have exited; one host read per layer."""
    hidden, layer_inputs = model.embed(ids, mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    memory = policy.init_memory(ids.shape[0], ids.device)
    from exitrl.policy import LayerBatch

    for i in range(model.num_layers):
        hidden = model.run_layer(i, hidden, layer_inputs)
        pooled = model.pool(hidden, mask)
        logits = model.exit_logits(i, pooled)
        done |= policy.decide(LayerBatch(i + 1, model.num_layers, pooled.float(), logits.float()), memory)
        if bool(done.all()):  # the host read that syncs every layer
            break


def rows_for(model, policy, ids, mask, device, warmup, reps) -> dict:
    with autocast(device):
        full = timed(lambda: walk(StaticPolicy(model.num_layers), LiveSource(model, ids, mask), ids.shape[0],
                                  device), device, warmup, reps)
        exits = walk(policy, LiveSource(model, ids, mask), ids.shape[0], device)
        runtime = timed(lambda: walk(policy, LiveSource(model, ids, mask), ids.shape[0], device), device, warmup,
                        reps)
        naive = timed(lambda: naive_loop(model, policy, ids, mask), device, warmup, reps)
    ideal = model.num_layers / float(exits.layers.float().mean())
    return {"exitrl_full_ms": full, "naive_ms": naive, "runtime_ms": runtime, "ideal_speedup": ideal,
            "speedup": full / runtime, "achieved_over_ideal": (full / runtime) / ideal,
            "mean_exit_layer": float(exits.layers.float().mean())}


def shape_benchmark(name: str, batch: int, seq: int, device: torch.device, warmup: int, reps: int) -> list[dict]:
    config = BertConfig(vocab_size=30522, **SHAPES[name])
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config)
    model = MultiExitModel(encoder, 2, "mean").to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    ids = torch.randint(1000, 30000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad(), autocast(device):
        hf = timed(lambda: encoder(input_ids=ids, attention_mask=mask), device, warmup, reps)
    out = []
    for fraction in (0.25, 0.5, 0.75):
        layer = max(1, round(fraction * model.num_layers))
        row = {"shape": name, "batch": batch, "seq": seq, "policy": f"static {layer}/{model.num_layers}",
               "hf_eager_ms": hf, **rows_for(model, StaticPolicy(layer), ids, mask, device, warmup, reps)}
        row["speedup_over_hf"] = hf / row["runtime_ms"]
        out.append(row)
    return out


def run_benchmark(run_dir: str, texts_path: str, batch: int, device: torch.device, warmup: int, reps: int) -> dict:
    """A trained run on real text: whole-split examples/s of the full model and of early exit."""
    classifier = EarlyExitClassifier.from_run(run_dir, str(device))
    from exitrl.predict import default_columns
    from exitrl.runs import Run

    first, second = read_texts(texts_path, default_columns(Path(run_dir), Run.load(run_dir).record.task))
    full_policy, policy = StaticPolicy(classifier.model.num_layers), classifier.policy
    timings = {}
    for label, chosen in (("full", full_policy), ("early_exit", policy)):
        classifier.policy = chosen
        seconds = timed(lambda: classifier.exits(first, second, batch_size=batch), device, warmup, reps) / 1000
        timings[label] = {"seconds": seconds, "examples_per_second": len(first) / seconds}
    classifier.policy = policy
    exits = classifier.exits(first, second, batch_size=batch)
    ideal = classifier.model.num_layers / float(exits.layers.float().mean())
    speedup = timings["full"]["seconds"] / timings["early_exit"]["seconds"]
    return {"run": str(run_dir), "texts": texts_path, "examples": len(first), "batch": batch, **timings,
            "mean_exit_layer": float(exits.layers.float().mean()), "ideal_speedup": ideal, "speedup": speedup,
            "achieved_over_ideal": speedup / ideal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["minilm", "bert-base"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--run", help="a trained run folder (exitrl.train) for the real-text row")
    parser.add_argument("--texts", help="a TSV/CSV/JSONL of texts for --run (e.g. the task's dev file)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [row for shape in args.shapes for batch in args.batches
            for row in shape_benchmark(shape, batch, args.seq, device, args.warmup, args.reps)]
    print(f"{'shape':<11}{'batch':>6}{'policy':>14}{'HF eager':>10}{'full':>9}{'naive':>9}{'exitrl':>9}"
          f"{'speedup':>9}{'ideal':>7}{'ratio':>7}{'vs HF':>7}   (ms per batch)")
    for r in rows:
        print(f"{r['shape']:<11}{r['batch']:>6}{r['policy']:>14}{r['hf_eager_ms']:>10.2f}{r['exitrl_full_ms']:>9.2f}"
              f"{r['naive_ms']:>9.2f}{r['runtime_ms']:>9.2f}{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x"
              f"{r['achieved_over_ideal']:>7.2f}{r['speedup_over_hf']:>6.2f}x")
    record = {"date": date.today().isoformat(), "device": str(device),
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch_threads": torch.get_num_threads(), "seq": args.seq, "warmup": args.warmup, "reps": args.reps,
              "rows": rows}
    if args.run:
        trained = run_benchmark(args.run, args.texts, args.batches[-1], device, min(args.warmup, 1),
                                max(1, min(args.reps, 3)))
        record["trained_run"] = trained
        print(f"trained run, {trained['examples']} texts at batch {trained['batch']}: full "
              f"{trained['full']['examples_per_second']:.1f}/s, early exit "
              f"{trained['early_exit']['examples_per_second']:.1f}/s ({trained['speedup']:.2f}x; ideal "
              f"{trained['ideal_speedup']:.2f}x, ratio {trained['achieved_over_ideal']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
