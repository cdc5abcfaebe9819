"""What a trained policy's early exit can save on a GPU, from what each step of the fast path costs: a cost model
of the encoder walk (issue 29), checked against the measured walks and then asked what-ifs.

Each captured step costs what the device measured (a ``runtime_profile`` reference: one layer's GPU time against
the tokens it runs on, interpolated; a decision; a compaction; an embedding). The run's policy walks the split on
this machine's CPU (its exit layers; the GPU's bfloat16 walk differs only on rows at a threshold), the batches are
grouped into windows exactly as `FastWalker` groups them, and each window's layers are charged launch by launch as
`FastWalker` launches them. The model prints, per batch size and window: the full model's and early exit's time
(also with windows of consecutive batches only, as the walks measured before 2026-12-07's change ran, to check the
model against them), their ratio, and the ratio with decisions and compactions free. The model has no host time
and no stall at a host read: it is a floor on both sides' time. It charges the plain schedule (each alive count
read before the next layer), not ``late_reads``'s (one more layer per window, compactions a layer late).

    python benchmarks/runtime_cost_model.py --run runs/gpu_sst2 --texts ../shared/data/glue/SST-2/dev.tsv \
        --text-columns sentence --profile benchmarks/reference/runtime_profile_lean_h100_{sst2,rte}_2026-12-07.json \
        --scaling benchmarks/reference/runtime_profile_scaling_lean_h100_sst2_2026-12-07.json --out out.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import numpy as np
from runtime_profile import save_record

from exitrl.agents.static import StaticPolicy
from exitrl.data import read_texts
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.fast_walk import FastWalker, launches
from exitrl.runtime.stream import TokenizedBatches


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """``points`` (x, y) interpolated at ``x``, extrapolated linearly past the last; one point: a constant."""
    xs, ys = np.array(sorted(points), dtype=float).T
    if len(xs) == 1:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1]))
    return float(np.interp(x, xs, ys))


class StepCosts:
    """Microseconds of each captured step on the device, from measured points (tokens a step runs on, µs)."""

    def __init__(self, layer: list[tuple[int, float]], compaction: list[tuple[int, float]], decision_us: float,
                 full_decision_us: float, embed_us: float):
        self.layer_points, self.compaction_points = layer, compaction
        self.decision_us, self.full_decision_us, self.embed_us = decision_us, full_decision_us, embed_us

    def layer(self, rows: int, seq: int) -> float:
        return interpolate(self.layer_points, rows * seq)

    def compaction(self, rows: int, seq: int) -> float:
        return interpolate(self.compaction_points, rows * seq)


def walk_cost(windows: list[tuple[int, list[int]]], walker: FastWalker, costs: StepCosts, exits: bool,
              decisions: bool = True, compactions: bool = True) -> float:
    """Microseconds of walking ``windows`` (``(sequence bucket, each row's exit layer)``) launch by launch, as
    `FastWalker._walk` launches them; ``exits`` False: the full model (every row to the last layer)."""
    total, layers = 0.0, walker.num_layers
    for seq, exit_layers in windows:
        rows_exit = np.array(exit_layers if exits else [layers] * len(exit_layers))
        spans = launches(len(rows_exit), walker.capacity, walker.buckets)
        extent = spans[-1][0] + spans[-1][1]
        total += costs.embed_us * len(spans)
        for layer in range(1, layers + 1):
            total += sum(costs.layer(size, seq) for _, size in spans)
            deciding = layer >= walker.first_exit if exits else layer == layers
            if not deciding:
                continue
            total += (costs.decision_us if exits else costs.full_decision_us) if decisions else 0.0
            alive = int((rows_exit > layer).sum())
            if alive == 0:
                break
            spans = launches(alive, walker.capacity, walker.buckets)
            if spans[-1][0] + spans[-1][1] < extent:
                total += costs.compaction(extent, seq) if compactions else 0.0
                extent = spans[-1][0] + spans[-1][1]
    return total


def bucketed(walker: FastWalker, batches: list, exits: list[list[int]],
             groups: list[list[int]]) -> list[tuple[int, list[int]]]:
    """``(sequence bucket, each row's exit layer)`` of each window, from the batch indices of each."""
    return [(walker.seq_bucket(max(int(batches[i][0].shape[1]) for i in indices)),
             [x for i in indices for x in exits[i]]) for indices in groups]


def consecutive_windows(walker: FastWalker, batches: list) -> list[list[int]]:
    """The batch indices of each window as the walker grouped them before windows took batches out of order
    (consecutive batches of one bucket): what the 2026-12-07 measured walks ran, to check the model against."""
    groups, rows, seq = [], 0, None
    for index, batch in enumerate(batches):
        count, bucket = int(batch[0].shape[0]), walker.seq_bucket(int(batch[0].shape[1]))
        if groups and bucket == seq and rows + count <= walker.window and len(groups[-1]) < walker.batches_per_window:
            groups[-1].append(index)
            rows += count
        else:
            groups.append([index])
            rows, seq = count, bucket
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--text-columns", nargs="+", required=True)
    parser.add_argument("--profile", nargs="+", required=True,
                        help="runtime_profile references: their measured steps (the first: the walks to check)")
    parser.add_argument("--scaling", nargs="+", required=True, help="runtime_profile --scaling references")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--windows", nargs="+", type=int, default=[0, 1024])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    profiles = [json.loads(Path(p).read_text()) for p in args.profile]
    sweeps = [json.loads(Path(p).read_text()) for p in args.scaling]
    # measured points: each sweep's layer against its rows, and each profiled batch's one-launch steps
    layer, compaction, embeds, full_decisions = [], [], [], []
    for sweep in sweeps:
        layer += [(s["rows"] * (-(-s["seq"] // 16) * 16), s["layer_us"]) for s in sweep["scaling"]]
    for profile in profiles:
        for row in profile["batches"]:
            full, exit_steps, seq = row.get("full_steps_us", {}), row.get("early_exit_steps_us", {}), None
            seq = full.get("seq")
            layers = [v for k, v in full.items() if k.startswith("layer ") and k.endswith(f" 0 {row['batch']}")]
            if layers:
                layer.append((row["batch"] * seq, float(np.median(layers))))
                last = next(v for k, v in full.items() if k.startswith("layer+decide"))
                full_decisions.append(last - float(np.median(layers)))
            embeds += [v for k, v in full.items() if k.startswith("embed")]
            compaction += [(int(k.split()[1]) * exit_steps["seq"], v) for k, v in exit_steps.items()
                           if k.startswith("compact")]
    # a decision: what it adds to a layer at the sweeps' largest row count, eager and compiled
    top = max((s for sweep in sweeps for s in sweep["scaling"]), key=lambda s: s["rows"])
    variants = {"eager": top["with_exit_us"] - top["layer_us"]}
    if "with_exit_compiled_us" in top:  # measured where the sweep compiled the decision (--compile-sizes)
        variants["compiled"] = top["with_exit_compiled_us"] - top["layer_us"]
    else:
        print(f"no compiled decision measured at {top['rows']} rows: the model charges eager decisions only")
    classifier = EarlyExitClassifier.from_run(args.run, "cpu")
    first, second = read_texts(args.texts, args.text_columns)
    types = "token_type_ids" in classifier.tokenizer.model_input_names
    record = {"date": date.today().isoformat(), "machine": platform.processor() or "cpu", "run": args.run,
              "texts": args.texts, "profiles": args.profile, "scalings": args.scaling,
              "layer_points": sorted(layer), "compaction_points": sorted(compaction), "decision_us": variants,
              "full_decision_us": float(np.median(full_decisions)), "embed_us": float(np.median(embeds)),
              "batches": []}
    for batch in args.batches:
        stream = TokenizedBatches(classifier.tokenizer, first, second, batch, classifier.max_length, workers=1)
        padded = [(b.input_ids, b.attention_mask, b.token_type_ids) for b in stream]
        walker = FastWalker(classifier.model, classifier.policy, batch, graphs=False, token_types=types)
        exits = [e.layers.tolist() for e in walker.run_batches(padded)]
        row: dict = {"batch": batch, "mean_exit_layer": float(np.mean([x for e in exits for x in e]))}
        row["ideal_speedup"] = walker.num_layers / row["mean_exit_layer"]
        measured = next((r for r in profiles[0]["batches"] if r["batch"] == batch), {})
        for window in sorted({max(batch, w) for w in args.windows}):
            grouping = FastWalker(classifier.model, classifier.policy, batch, graphs=False, token_types=types,
                                  window=window)
            windows = bucketed(walker, padded, exits, [indices for indices, _ in grouping._windows(padded)])
            before = bucketed(walker, padded, exits, consecutive_windows(grouping, padded))
            full_walker = FastWalker(classifier.model, StaticPolicy(walker.num_layers), batch, graphs=False,
                                     token_types=types, window=window)
            for label, decision_us in variants.items():
                costs = StepCosts(layer, compaction, decision_us, record["full_decision_us"], record["embed_us"])
                full = walk_cost(windows, full_walker, costs, exits=False)
                entry = {"windows": len(windows), "full_ms": full / 1000,
                         "consecutive_windows": len(before),
                         "consecutive_early_exit_ms": walk_cost(before, grouping, costs, True) / 1000,
                         "early_exit_ms": walk_cost(windows, grouping, costs, True) / 1000,
                         "free_decisions_and_compactions_ms": walk_cost(windows, grouping, costs, True, False,
                                                                        False) / 1000}
                for key in ("early_exit", "consecutive_early_exit", "free_decisions_and_compactions"):
                    entry[f"{key}_speedup"] = entry["full_ms"] / entry[f"{key}_ms"]
                entry["measured_full_ms"] = measured.get(f"full_w{window}_lanes2_ms")
                entry["measured_early_exit_ms"] = measured.get(  # the measured walk with the same decisions
                    f"early_exit_w{window}_lanes2_ms" if label == "eager" else f"early_exit_compiled_w{window}_ms")
                row[f"w{window}_{label}"] = entry
                print(f"batch {batch}, window {window}, {label} decisions ({decision_us:.0f} us): "
                      f"{len(windows)} windows; model full {entry['full_ms']:.2f} ms (measured "
                      f"{entry['measured_full_ms'] or float('nan'):.2f}), exit with consecutive windows "
                      f"{entry['consecutive_early_exit_ms']:.2f} ms (measured "
                      f"{entry['measured_early_exit_ms'] or float('nan'):.2f}); exit {entry['early_exit_ms']:.2f} ms = "
                      f"{entry['early_exit_speedup']:.2f}x; decisions and compactions free "
                      f"{entry['free_decisions_and_compactions_speedup']:.2f}x (ideal {row['ideal_speedup']:.2f}x)")
        record["batches"].append(row)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
