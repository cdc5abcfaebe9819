"""Whether the GPU is busy or waiting during a whole-split walk (issue 29): for the full model and early exit at
several settings, the walk's median time, then one walk under torch.profiler: the kernels, the time the GPU was
busy (the union of kernel intervals) against the span from the first kernel to the last, and the host's time in
graph launches and event waits. A span much longer than the busy time is the GPU waiting on the host (a read of
the alive count, then the launches after it); then the next layer's time goes to the host, not the device.

    python benchmarks/runtime_timeline.py --run runs/gpu_sst2 --texts ../shared/data/glue/SST-2/dev.tsv \
        --text-columns sentence --out benchmarks/reference/runtime_timeline_h200_sst2_<date>.json

One layer's GPU time against its rows, plain and through torch.compile, follows. CUDA only.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch
from runtime_profile import replay_us, save_record, settle, timed
from torch.profiler import ProfilerActivity, profile

from exitrl.agents.static import StaticPolicy
from exitrl.data import read_texts
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.fast_walk import FastWalker
from exitrl.runtime.stream import TokenizedBatches

HOST_CALLS = ("cudaGraphLaunch", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaStreamSynchronize")


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """Microseconds covered by at least one of ``intervals`` (start, end), and from the first start to the last end."""
    busy, start, end = 0.0, None, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            busy += 0.0 if end is None else end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is None:
        return 0.0, 0.0
    return busy + end - start, max(b for _, b in intervals) - min(a for a, _ in intervals)


def profiled_walk(walker: FastWalker, batches: list) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(walker.run_batches(batches))
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, span = busy_and_span(kernels)
    host: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name in HOST_CALLS:
            calls = host.setdefault(e.name, [0, 0.0])
            calls[0] += 1
            calls[1] += e.cpu_time_total
    return {"kernels": len(kernels), "gpu_busy_us": busy, "gpu_span_us": span,
            "host_calls": {k: {"calls": v[0], "us": v[1]} for k, v in host.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--text-columns", nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=1024, help="early exit's window (the full model's: the batch)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    classifier = EarlyExitClassifier.from_run(args.run, "cuda")
    first, second = read_texts(args.texts, args.text_columns)
    types = "token_type_ids" in classifier.tokenizer.model_input_names
    stream = TokenizedBatches(classifier.tokenizer, first, second, args.batch, classifier.max_length, workers=1)
    batches = [(b.input_ids, b.attention_mask, b.token_type_ids) for b in stream]
    full = StaticPolicy(classifier.model.num_layers)
    settings = {
        "full": (full, {"window": args.batch}),
        "full_compiled_layers": (full, {"window": args.batch, "compile_layers": True}),
        "early_exit": (classifier.policy, {"window": args.window}),
        "early_exit_compiled_decisions": (classifier.policy, {"window": args.window, "compile_decisions": True}),
        "early_exit_compiled": (classifier.policy, {"window": args.window, "compile_decisions": True,
                                                   "compile_layers": True}),
        "full_device_walk": (full, {"window": args.window, "device_walk": True}),
        "early_exit_device_walk": (classifier.policy, {"window": args.window, "device_walk": True}),
        "full_compiled_device_walk": (full, {"window": args.window, "compile_layers": True, "device_walk": True}),
        "early_exit_compiled_device_walk": (classifier.policy, {"window": args.window, "compile_decisions": True,
                                                               "compile_layers": True, "device_walk": True}),
    }
    record: dict = {"date": date.today().isoformat(), "machine": torch.cuda.get_device_name(), "run": args.run,
                    "texts": args.texts, "batch": args.batch, "settings": {}, "layer_vs_rows": []}
    for name, (policy, options) in settings.items():
        started = time.perf_counter()
        walker = FastWalker(classifier.model, policy, args.batch, token_types=types, lanes=2, **options)
        settle(walker, batches, 16)
        found = {"options": options, "warm_up_s": time.perf_counter() - started,
                 "ms": 1000 * timed(lambda w=walker: list(w.run_batches(batches)), device, 3, args.reps)}
        found.update(profiled_walk(walker, batches))
        record["settings"][name] = found
        print(f"{name}: {found['ms']:.2f} ms; GPU busy {found['gpu_busy_us'] / 1000:.2f} of a "
              f"{found['gpu_span_us'] / 1000:.2f}-ms span, {found['kernels']} kernels; host "
              + ", ".join(f"{k} {v['calls']}x {v['us']:.0f} us" for k, v in found["host_calls"].items()))
    tokens = max(batches, key=lambda b: (int(b[0].shape[0]), int(b[0].shape[1])))  # a full batch, the longest
    for rows in sorted({1, 32, int(tokens[0].shape[0])}):
        part = [t[:rows] if t is not None else None for t in tokens]
        entry: dict = {"rows": int(part[0].shape[0]), "seq": int(part[0].shape[1])}
        for label, options in (("layer_us", {}), ("layer_compiled_us", {"compile_layers": True})):
            walker = FastWalker(classifier.model, full, rows, token_types=types, lanes=1, **options)
            for _ in range(3):
                list(walker.run_batches([part]))
            window = walker.lanes[0].windows[walker.seq_bucket(entry["seq"])]
            step = next(s for key, s in window.steps.items() if key[0].startswith("layer"))  # the first layer
            entry[label] = replay_us(step, device, 100)
        print(f"layer on {rows} rows: {entry['layer_us']:.1f} us, compiled {entry['layer_compiled_us']:.1f} us")
        record["layer_vs_rows"].append(entry)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
