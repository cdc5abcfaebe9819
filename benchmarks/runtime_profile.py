"""Where a trained policy's time goes on real text, and what each remedy buys: the profile behind the encoder
runtime's design (issue 29). For a run and a text file, at each batch size:

- whole-split time, pre-tokenized, of the full model and of early exit on the fast path, with 1, 2 and 3 batches in
  flight (``lanes``; 1 is a host read per layer with the GPU idle meanwhile);
- each captured step's GPU time, replayed back to back (no host reads): a layer alone (the full model's steps) and a
  layer with its exit head and decision (the policy's), on the largest bucket of the split; their difference is
  what a decision costs;
- tokenization: the whole split tokenized and padded in order (one thread) against the classifier's stream;
- end to end (text in, answers out) through ``EarlyExitClassifier.exits``, full and early exit.

    python benchmarks/runtime_profile.py --run runs/sst2_reinforce --texts ../shared/data/glue/SST-2/dev.tsv \
        --out benchmarks/reference/runtime_profile_h100_sst2_<date>.json

Prints a table and saves JSON (date, machine). Times are medians of ``--reps`` after ``--warmup`` (which capture
the graphs), CUDA synchronised around each.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from inference_speed import timed as timed_ms

from exitrl.agents.static import StaticPolicy
from exitrl.data import read_texts
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.fast_walk import FastWalker
from exitrl.runtime.stream import TokenizedBatches


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` (the speed benchmark's timer)."""
    return timed_ms(fn, device, warmup, reps) / 1000


def step_times(walker: FastWalker, device: torch.device, replays: int = 50) -> dict[int, float]:
    """Microseconds of GPU time per replay of each captured step of the walker's largest bucket (first lane)."""
    if device.type != "cuda":
        return {}
    bucket = max(walker.lanes[0].buckets.values(), key=lambda b: (b.size, b.seq))
    out = {}
    for index, step in sorted(bucket.steps.items()):
        if step.graph is None:
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            step.graph.replay()
        start.record()
        for _ in range(replays):
            step.graph.replay()
        end.record()
        torch.cuda.synchronize()
        out[index] = 1000 * start.elapsed_time(end) / replays
    out["bucket"] = [bucket.size, bucket.seq]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--text-columns", nargs="+")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--lanes", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile", action="store_true",
                        help="also the early-exit walk with torch.compile'd exit heads and decisions (largest batch)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.text_columns is None:
        from exitrl.predict import run_task

        args.text_columns = run_task(Path(args.run)).text_columns
    classifier = EarlyExitClassifier.from_run(args.run, str(device))
    first, second = read_texts(args.texts, args.text_columns)
    n, layers, policy = len(first), classifier.model.num_layers, classifier.policy
    full = StaticPolicy(layers)
    record = {"date": date.today().isoformat(), "device": str(device), "torch": torch.__version__,
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "run": args.run, "texts": args.texts, "examples": n, "num_layers": layers, "batches": []}
    for batch in args.batches:
        stream = TokenizedBatches(classifier.tokenizer, first, second, batch, classifier.max_length, workers=1)
        padded = [(b.input_ids, b.attention_mask, b.token_type_ids) for b in stream]
        row: dict = {"batch": batch, "padded_tokens": sum(int(b[0].numel()) for b in padded),
                     "real_tokens": sum(int(b[1].sum()) for b in padded)}
        types = "token_type_ids" in classifier.tokenizer.model_input_names
        walkers = {}
        for label, chosen in (("full", full), ("early_exit", policy)):
            for lanes in args.lanes:
                walker = FastWalker(classifier.model, chosen, batch, token_types=types, lanes=lanes)
                seconds = timed(lambda w=walker, p=padded: list(w.run_batches(p)), device, args.warmup,
                                args.reps)
                row[f"{label}_lanes{lanes}_ms"] = 1000 * seconds
                walkers[(label, lanes)] = walker
            found = list(walkers[(label, 1)].run_batches(padded))
            if label == "early_exit":
                mean_exit = float(torch.cat([f.layers for f in found]).float().mean())
                row["mean_exit_layer"], row["ideal_speedup"] = mean_exit, layers / mean_exit
            row[f"{label}_steps_us"] = step_times(walkers[(label, 1)], device)
        if args.compile and batch == max(args.batches):
            started = time.perf_counter()
            walker = FastWalker(classifier.model, policy, batch, token_types=types, lanes=max(args.lanes),
                                compile_decisions=True)
            list(walker.run_batches(padded))
            row["compile_warmup_s"] = time.perf_counter() - started
            row["early_exit_compiled_ms"] = 1000 * timed(lambda w=walker, p=padded: list(w.run_batches(p)), device,
                                                         args.warmup, args.reps)
            row["early_exit_compiled_steps_us"] = step_times(walker, device)
            print(f"  compiled decisions: {row['early_exit_compiled_ms']:.2f} ms (warm-up "
                  f"{row['compile_warmup_s']:.0f} s), steps {row['early_exit_compiled_steps_us']}")
        for lanes in args.lanes:
            speedup = row[f"full_lanes{lanes}_ms"] / row[f"early_exit_lanes{lanes}_ms"]
            row[f"speedup_lanes{lanes}"] = speedup
            row[f"achieved_over_ideal_lanes{lanes}"] = speedup / row["ideal_speedup"]
        row["tokenize_serial_ms"] = 1000 * timed(lambda: classifier.encode(first, second), device, 1, 3)
        row["tokenize_stream_ms"] = 1000 * timed(
            lambda b=batch: list(TokenizedBatches(classifier._tokenizers, first, second, b, classifier.max_length)),
            device, 1, 3)
        for label, chosen in (("full", full), ("early_exit", policy)):
            classifier.policy = chosen
            row[f"end_to_end_{label}_ms"] = 1000 * timed(lambda b=batch: classifier.exits(first, second, b), device,
                                                         args.warmup, args.reps)
        classifier.policy = policy
        row["end_to_end_speedup"] = row["end_to_end_full_ms"] / row["end_to_end_early_exit_ms"]
        record["batches"].append(row)
        full_steps, exit_steps = row["full_steps_us"], row["early_exit_steps_us"]
        print(f"batch {batch}: mean exit {row['mean_exit_layer']:.2f}/{layers} (ideal {row['ideal_speedup']:.2f}x); "
              + "; ".join(f"lanes {k}: full {row[f'full_lanes{k}_ms']:.2f} ms, exit "
                          f"{row[f'early_exit_lanes{k}_ms']:.2f} ms = {row[f'speedup_lanes{k}']:.2f}x "
                          f"({row[f'achieved_over_ideal_lanes{k}']:.2f} of ideal)" for k in args.lanes))
        if full_steps:
            print("  step GPU us (layer alone / with exit+decision): " + ", ".join(
                f"{i}: {full_steps.get(i, float('nan')):.1f}/{exit_steps.get(i, float('nan')):.1f}"
                for i in range(layers + 1)) + f" on bucket {exit_steps.get('bucket')}")
        print(f"  tokenize: serial {row['tokenize_serial_ms']:.1f} ms, stream {row['tokenize_stream_ms']:.1f} ms; "
              f"end to end: full {row['end_to_end_full_ms']:.1f} ms, exit {row['end_to_end_early_exit_ms']:.1f} ms "
              f"= {row['end_to_end_speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
