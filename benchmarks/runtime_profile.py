"""Where a trained policy's time goes on real text, and what each remedy buys: the profile behind the encoder
runtime's design (issue 29). For a run and a text file, at each batch size:

- whole-split time, pre-tokenized, of the full model and of early exit on the fast path, for each window (rows
  walked up the layers together in launches of at most the batch size; a window of one batch is a plain batched
  walk) and each number of windows in flight (``lanes``; 1 is a host read per layer with the GPU idle meanwhile);
  the speedup at each setting and the honest one, each side at its own fastest setting;
- each captured step's GPU time, replayed back to back (no host reads), one batch per window: a layer alone (the
  full model's steps) and a layer with its exit head and decision (the policy's); their difference is what a
  decision costs;
- ``--scaling``: one layer step's GPU time against the rows it runs on (why exits inside one small batch save little);
- tokenization: the whole split tokenized and padded in order (one thread) against the classifier's stream;
- end to end (text in, answers out) through ``EarlyExitClassifier.exits``, full and early exit, each at its fastest
  window from text (a wide window waits for its rows while the stream tokenizes).

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
from itertools import product
from pathlib import Path

import torch
from inference_speed import timed as timed_ms

from exitrl.agents.static import StaticPolicy
from exitrl.data import read_texts
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.fast_walk import FastWalker
from exitrl.runtime.stream import TokenizedBatches


def save_record(record: dict, path: str) -> None:
    """Write a benchmark's record as JSON (its folder made if needed) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` (the speed benchmark's timer)."""
    return timed_ms(fn, device, warmup, reps) / 1000


def replay_us(step, device: torch.device, replays: int = 50) -> float:
    """Microseconds of GPU time per replay of one captured step (eager off CUDA)."""
    replay = step.graph.replay if step.graph is not None else step.fn
    return 1e6 * timed(lambda: [replay() for _ in range(replays)], device, 1, 3) / replays


def settle(walker: FastWalker, batches: list, most: int = 12) -> int:
    """Walk ``batches`` until a walk makes no new step (which lane takes which window can change between walks, and
    a step is captured, or compiled, when first needed): timings then hold replays only. Returns the walks run."""
    def made() -> int:
        return sum(len(window.steps) for lane in walker.lanes for window in lane.windows.values())

    for walks in range(1, most + 1):
        before = made()
        list(walker.run_batches(batches))
        if made() == before and walks > 1:
            return walks
    print(f"  warning: still making steps after {most} walks; the timing below includes some")
    return most


def step_times(walker: FastWalker, device: torch.device) -> dict[str, float]:
    """GPU time of each captured step of the first lane's longest window that runs a whole batch in one launch:
    the embedding, each layer alone or with its exit heads and decision (``layer+decide``), compactions."""
    if device.type != "cuda":
        return {}
    window = max(walker.lanes[0].windows.values(), key=lambda w: w.seq)
    top = walker.capacity
    out: dict = {" ".join(map(str, key)): replay_us(step, device) for key, step in sorted(window.steps.items())
                 if step.graph is not None and key[-1] == top and (key[0] != "layer" or key[2] == 0)}
    out["seq"] = window.seq
    return out


KERNEL_KINDS = [("counted layer", ("_linear_kernel", "_attention_kernel", "_layer_norm_kernel")),
                ("matrix products", ("gemm", "nvjet", "cutlass", "sm90_xmma")),
                ("attention", ("sdpa", "flash", "fmha")),
                ("layer norm", ("layer_norm",)), ("scan / sort", ("scan", "cumsum", "sort")),
                ("gather / scatter / copy", ("index", "gather", "scatter", "copy", "memcpy", "memset")),
                ("reductions", ("reduce",)), ("compiled (inductor)", ("triton_",))]


def kernel_breakdown(walker: FastWalker, batches: list, device: torch.device, top: int = 20) -> dict:
    """Device time of one settled walk of ``batches`` by kernel kind (torch.profiler), and the costliest kernels:
    where a walk's GPU time goes, the layers' work against the bookkeeping around them."""
    from torch.profiler import ProfilerActivity, profile

    settle(walker, batches)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        list(walker.run_batches(batches))
        torch.cuda.synchronize(device)
    kinds: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name, us = event.name, event.device_time
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name.lower() for m in marks)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + us
        entry = per_kernel.setdefault(name[:100], [0, 0.0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + us
    costliest = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    return {"total_us": sum(kinds.values()), "kinds_us": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "kernels": sum(n for n, _ in per_kernel.values()),
            "costliest": [{"name": n, "count": c, "us": us} for n, (c, us) in costliest]}


def fastest(row: dict, prefix: str) -> tuple[str, float]:
    """The fastest timing of ``row`` under ``prefix``, as (its setting, ms). A setting's name holds its window
    (``w1024_lanes2_dw``, ``compiled_dw_w1024``), which the totals and bests already taken do not."""
    key = min((k for k in row if k.startswith(prefix) and k.endswith("_ms") and "_w" in f"_{k[len(prefix):]}"),
              key=row.get)
    return key[len(prefix):-3], row[key]


def row_scaling(classifier: EarlyExitClassifier, policy, tokens: tuple, types: bool, device: torch.device,
                sizes: list[int], compile_sizes: list[int]) -> list[dict]:
    """GPU time of the policy's first deciding layer's step against the rows it runs on (the first ``size`` rows of
    one batch): the layer alone (full model), with the exit head and decision eager, and with them through
    torch.compile. A launch-bound layer costs about as much on 16 rows as on 32, so exits inside one small batch
    save little time."""
    out = []
    layer = FastWalker(classifier.model, policy, 1, token_types=types).first_exit  # the policy's first decision
    for size in sizes:
        part = [t[:size] if t is not None else None for t in tokens]
        entry = {"rows": size, "seq": int(part[0].shape[1])}
        variants = [("layer", StaticPolicy(classifier.model.num_layers), False), ("with_exit", policy, False)]
        if size in compile_sizes:
            variants.append(("with_exit_compiled", policy, True))
        for label, chosen, compiled in variants:
            walker = FastWalker(classifier.model, chosen, size, token_types=types, lanes=1,
                                compile_decisions=compiled)
            for _ in range(3):
                list(walker.run_batches([part]))
            window = walker.lanes[0].windows[walker.seq_bucket(entry["seq"])]
            step = next(step for key, step in window.steps.items() if key[0].startswith("layer") and key[1] == layer)
            entry[f"{label}_us"] = replay_us(step, device, 100)
        print(f"  rows {size:4d}: " + ", ".join(f"{k} {v:.1f}" for k, v in entry.items() if k.endswith("_us")))
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--text-columns", nargs="+")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--lanes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--windows", nargs="+", type=int, default=[0, 256, 1024],
                        help="rows walked up the layers together (0 or less than the batch: one batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile'd decisions, and layers (full and early exit), at the largest batch")
    parser.add_argument("--scaling", nargs="*", type=int,
                        help="only the GPU time of one layer step against its rows, at these row counts")
    parser.add_argument("--compile-sizes", nargs="*", type=int, default=[32, 256])
    parser.add_argument("--late-reads", action="store_true",
                        help="early exit reads each layer's alive count a layer late (FastWalker(late_reads=True))")
    parser.add_argument("--device-walk", action="store_true",
                        help="also every setting with each window walked as one step, launches chosen on the "
                             "device (FastWalker(device_walk=True)), both sides")
    parser.add_argument("--kernels", action="store_true",
                        help="at the largest batch and window, GPU time by kernel kind of one walk, full and early "
                             "exit, host walk and device walk (torch.profiler)")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="only the pre-tokenized walks (no tokenizer timing, no walk from text)")
    parser.add_argument("--seq-multiple", type=int, default=16,
                        help="the walks' sequence buckets (FastWalker's seq_multiple): fewer, wider buckets mean "
                             "fewer windows and more padding")
    parser.add_argument("--no-compiled-layers", dest="compiled_layers", action="store_false",
                        help="with --compile: skip the variants whose layers go through torch.compile")
    parser.add_argument("--counted-launches", nargs="*", default=[],
                        help="with --compile --device-walk: the counted walk again with looping launches, each "
                             "PROGRAMS_PER_SM:HEADS_PER_PROGRAM (e.g. 4:1 2:4), full model and early exit")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.text_columns is None:
        from exitrl.predict import run_task

        args.text_columns = run_task(Path(args.run)).text_columns
    classifier = EarlyExitClassifier.from_run(args.run, str(device), late_reads=args.late_reads)
    first, second = read_texts(args.texts, args.text_columns)
    n, layers, policy = len(first), classifier.model.num_layers, classifier.policy
    full = StaticPolicy(layers)
    record = {"date": date.today().isoformat(), "device": str(device), "torch": torch.__version__,
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "run": args.run, "texts": args.texts, "examples": n, "num_layers": layers,
              "late_reads": args.late_reads, "device_walk": args.device_walk, "seq_multiple": args.seq_multiple,
              "batches": []}
    if args.scaling:
        types = "token_type_ids" in classifier.tokenizer.model_input_names
        stream = TokenizedBatches(classifier.tokenizer, first, second, max(args.scaling), classifier.max_length,
                                  workers=1)
        batch = next(iter(stream))
        record["scaling"] = row_scaling(classifier, policy, (batch.input_ids, batch.attention_mask,
                                        batch.token_type_ids), types, device, args.scaling, args.compile_sizes)
        args.batches = []
    seq = args.seq_multiple
    for batch in args.batches:
        stream = TokenizedBatches(classifier.tokenizer, first, second, batch, classifier.max_length, workers=1)
        padded = [(b.input_ids, b.attention_mask, b.token_type_ids) for b in stream]
        row: dict = {"batch": batch, "padded_tokens": sum(int(b[0].numel()) for b in padded),
                     "real_tokens": sum(int(b[1].sum()) for b in padded)}
        types = "token_type_ids" in classifier.tokenizer.model_input_names
        windows = sorted({max(batch, w) for w in args.windows})
        walks = [False, True] if args.device_walk else [False]  # host-read walks, and device walks beside them
        row["windows"] = windows
        for label, chosen in (("full", full), ("early_exit", policy)):
            row[f"{label}_steps_us"] = {}  # the steps of a window of one batch, where one was walked
            for window, lanes, on_device in product(windows, args.lanes, walks):
                walker = FastWalker(classifier.model, chosen, batch, token_types=types, seq_multiple=seq, lanes=lanes,
                                    window=window, late_reads=args.late_reads, device_walk=on_device)
                settle(walker, padded)
                seconds = timed(lambda w=walker, p=padded: list(w.run_batches(p)), device, args.warmup, args.reps)
                row[f"{label}_w{window}_lanes{lanes}{'_dw' if on_device else ''}_ms"] = 1000 * seconds
                if window == batch and lanes == min(args.lanes) and not on_device:
                    row[f"{label}_steps_us"] = step_times(walker, device)
            if label == "early_exit":  # the exits of the last setting walked (settings differ by rounding at most)
                found = list(walker.run_batches(padded))
                mean_exit = float(torch.cat([f.layers for f in found]).float().mean())
                row["mean_exit_layer"], row["ideal_speedup"] = mean_exit, layers / mean_exit
        for window, lanes, on_device in product(windows, args.lanes, walks):
            setting = f"w{window}_lanes{lanes}{'_dw' if on_device else ''}"
            speedup = row[f"full_{setting}_ms"] / row[f"early_exit_{setting}_ms"]
            row[f"speedup_{setting}"] = speedup
            row[f"achieved_over_ideal_{setting}"] = speedup / row["ideal_speedup"]
        # the honest ratio: each side at its own fastest setting
        for label in ("full", "early_exit"):
            row[f"{label}_best"], row[f"{label}_best_ms"] = fastest(row, f"{label}_")
        row["speedup_best"] = row["full_best_ms"] / row["early_exit_best_ms"]
        row["achieved_over_ideal_best"] = row["speedup_best"] / row["ideal_speedup"]
        best_window = int(row["early_exit_best"].split("_")[0][1:])
        if args.kernels and device.type == "cuda" and batch == max(args.batches):
            row["kernels"] = {}
            settings = [(label, chosen, on_device, False) for (label, chosen), on_device
                        in product((("full", full), ("early_exit", policy)), walks)]
            if args.compile:  # compiled decisions on each walk
                settings += [("early_exit_compiled", policy, on_device, True) for on_device in walks]
            for label, chosen, on_device, compiled in settings:
                walker = FastWalker(classifier.model, chosen, batch, token_types=types, seq_multiple=seq, lanes=1,
                                    window=max(windows), device_walk=on_device, compile_decisions=compiled)
                breakdown = kernel_breakdown(walker, padded, device)
                row["kernels"][f"{label}_w{max(windows)}{'_dw' if on_device else ''}"] = breakdown
                print(f"  kernels, {label}, window {max(windows)}{', device walk' if on_device else ''}: "
                      f"{breakdown['total_us'] / 1000:.2f} ms in {breakdown['kernels']} kernels; " + ", ".join(
                          f"{k} {v / 1000:.2f}" for k, v in breakdown["kinds_us"].items()))
        if args.compile:
            # torch.compile'd decisions (early exit), then compiled layers too (both sides: the full model's steps
            # are layers only)
            variants = [("early_exit_compiled", policy, {"compile_decisions": True})]
            if args.compiled_layers:
                variants += [("full_compiled_layers", full, {"compile_layers": True}),
                             ("early_exit_compiled_layers", policy, {"compile_decisions": True,
                                                                     "compile_layers": True})]
            if args.device_walk:  # the device walk with compiled decisions (its layers are its own kernels)
                variants.append(("early_exit_compiled_dw", policy, {"compile_decisions": True, "device_walk": True}))
                sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
                for launch in args.counted_launches:  # fewer programs, each looping over its tiles
                    per_sm, heads = (int(part) for part in launch.split(":"))
                    looping = {"device_walk": True, "counted_programs": per_sm * sms, "counted_heads": heads}
                    variants += [(f"full_dw_p{per_sm}h{heads}", full, looping),
                                 (f"early_exit_compiled_dw_p{per_sm}h{heads}", policy,
                                  {**looping, "compile_decisions": True})]
            for label, chosen, options in variants:
                # the device walk is fastest on its widest window: the compiled variants run there alone
                for window in [max(windows)] if args.device_walk else sorted({batch, best_window}):
                    started = time.perf_counter()
                    walker = FastWalker(classifier.model, chosen, batch, token_types=types, seq_multiple=seq,
                                        lanes=max(args.lanes), window=window, late_reads=args.late_reads, **options)
                    settle(walker, padded)
                    row[f"{label}_w{window}_warmup_s"] = time.perf_counter() - started  # first walks, until settled
                    row[f"{label}_w{window}_ms"] = 1000 * timed(
                        lambda w=walker, p=padded: list(w.run_batches(p)), device, args.warmup, args.reps)
                    print(f"  {label.replace('_', ' ')}, window {window}: {row[f'{label}_w{window}_ms']:.2f} ms "
                          f"(warm-up {row[f'{label}_w{window}_warmup_s']:.0f} s)")
            # each side at its fastest setting, compile and looping launches allowed
            for label in ("full", "early_exit"):
                row[f"{label}_best_compiled"], row[f"{label}_best_compiled_ms"] = fastest(row, f"{label}_")
            row["speedup_best_compiled"] = row["full_best_compiled_ms"] / row["early_exit_best_compiled_ms"]
            row["achieved_over_ideal_best_compiled"] = row["speedup_best_compiled"] / row["ideal_speedup"]
            print(f"  best with compile allowed: full {row['full_best_compiled_ms']:.2f} ms "
                  f"({row['full_best_compiled']}), exit {row['early_exit_best_compiled_ms']:.2f} ms "
                  f"({row['early_exit_best_compiled']}) = {row['speedup_best_compiled']:.2f}x "
                  f"({row['achieved_over_ideal_best_compiled']:.2f} of ideal)")
        if args.end_to_end:
            row["tokenize_serial_ms"] = 1000 * timed(lambda: classifier.encode(first, second), device, 1, 3)
            row["tokenize_stream_ms"] = 1000 * timed(
                lambda b=batch: list(TokenizedBatches(classifier._tokenizers, first, second, b, classifier.max_length)),
                device, 1, 3)
            for label, chosen in (("full", full), ("early_exit", policy)):
                classifier.policy = chosen
                # each side at its fastest window (and walk) from text (a wide window waits for its rows)
                compiles = [False, True] if args.compile and args.device_walk else [False]
                for window, on_device, compiled in product(windows, walks, compiles):
                    if compiled and not on_device:  # compiled decisions measured on the device walk only
                        continue
                    classifier.window, classifier.device_walk = window, on_device
                    classifier.compile_decisions = compiled
                    tag = f"w{window}{'_dw' if on_device else ''}{'_compiled' if compiled else ''}"
                    row[f"end_to_end_{label}_{tag}_ms"] = 1000 * timed(
                        lambda b=batch: classifier.exits(first, second, b), device, args.warmup, args.reps)
                row[f"end_to_end_{label}_best"], row[f"end_to_end_{label}_ms"] = fastest(row, f"end_to_end_{label}_")
            classifier.policy, classifier.window, classifier.device_walk = policy, None, False
            classifier.compile_decisions = False
            row["end_to_end_speedup"] = row["end_to_end_full_ms"] / row["end_to_end_early_exit_ms"]
            row["end_to_end_over_ideal"] = row["end_to_end_speedup"] / row["ideal_speedup"]
        record["batches"].append(row)
        print(f"batch {batch}: mean exit {row['mean_exit_layer']:.2f}/{layers} (ideal {row['ideal_speedup']:.2f}x)")
        for window, on_device in product(windows, walks):
            tail = "_dw" if on_device else ""
            print(f"  window {window}{', device walk' if on_device else ''}: " + "; ".join(
                f"lanes {k}: full {row[f'full_w{window}_lanes{k}{tail}_ms']:.2f} ms, exit "
                f"{row[f'early_exit_w{window}_lanes{k}{tail}_ms']:.2f} ms = "
                f"{row[f'speedup_w{window}_lanes{k}{tail}']:.2f}x "
                f"({row[f'achieved_over_ideal_w{window}_lanes{k}{tail}']:.2f} of ideal)" for k in args.lanes))
        print(f"  best: full {row['full_best_ms']:.2f} ms ({row['full_best']}), exit {row['early_exit_best_ms']:.2f} "
              f"ms ({row['early_exit_best']}) = {row['speedup_best']:.2f}x ({row['achieved_over_ideal_best']:.2f} "
              "of ideal)")
        if row["full_steps_us"]:
            print(f"  step GPU us, one batch per window: full {row['full_steps_us']}; "
                  f"exit {row['early_exit_steps_us']}")
        if args.end_to_end:
            print(f"  tokenize: serial {row['tokenize_serial_ms']:.1f} ms, stream {row['tokenize_stream_ms']:.1f} "
                  f"ms; end to end (each at its best window from text): full {row['end_to_end_full_ms']:.1f} ms, "
                  f"exit {row['end_to_end_early_exit_ms']:.1f} ms = {row['end_to_end_speedup']:.2f}x "
                  f"({row['end_to_end_over_ideal']:.2f} of ideal)")
    save_record(record, args.out)


if __name__ == "__main__":
    main()
