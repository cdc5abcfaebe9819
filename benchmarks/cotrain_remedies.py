"""ConsistentEE's iterative co-training and two remedies, over several seeds (issue 14, item 8).

For each seed: ``python -m exitrl.train agent=reinforce backbone.mode=cotrain`` plain, with
``cotrain.keep_weighted_ce=1`` and with ``cotrain.freeze_layers=3`` (one round each, from the same seed's backbone).
Per variant and seed it reads the run record (dev accuracy of every exit head before and after the round, the
retrained REINFORCE policy on dev) and traces dev with the co-trained backbone to get the dev-frontier AUC of a
10-threshold confidence rule (`exitrl.evaluation.tradeoff`); the "before" row is the same seed's backbone before the
round. Prints a table (mean ± std over seeds, and each variant's paired change against "before") and saves JSON and
markdown.

    EXITRL_DATA_DIR=../shared/data/glue python benchmarks/cotrain_remedies.py --task rte --seeds 0 1 2 \\
        --out benchmarks/reference/cotrain_remedies_cpu_$(date +%F)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.data import load_task
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds
from exitrl.evaluation.tradeoff import auc
from exitrl.traces.build import build_trace

VARIANTS = {"plain": [], "keep_weighted_ce=1": ["cotrain.keep_weighted_ce=1.0"],
            "freeze_layers=3": ["cotrain.freeze_layers=3"]}
THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def confidence_auc(backbone: Path, task: str, data_dir: str | None, device: torch.device) -> float:
    """Dev-frontier AUC of the max-prob rule over ``THRESHOLDS`` on a saved backbone's dev states."""
    model, tokenizer, meta = MultiExitModel.load(backbone, device)
    data = load_task(task, data_dir, splits=("dev",))
    dev = build_trace(model, tokenizer, data, 128, device)["dev"]
    points = [evaluate_policy(ConfidencePolicy(t), dev) for t in THRESHOLDS]
    bounds = oracle_bounds(dev)
    return auc(points, bounds["full_model"], bounds["per_layer_score"][0], dev.num_layers)


def run_variant(task: str, seed: int, name: str, extra: list[str], out: Path, overrides: list[str]) -> Path:
    run_dir = out / f"seed{seed}" / name.replace("=", "_")
    if not (run_dir / "metrics.json").is_file():
        command = [sys.executable, "-m", "exitrl.train", "agent=reinforce", f"env={task}", "backbone.mode=cotrain",
                   "cotrain.rounds=1", f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides, *extra]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        print(f"seed {seed} {name}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.2f} ± {t.std() if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/cotrain_remedies", help="where the train runs go")
    parser.add_argument("--out", required=True, help="output prefix for .json and .md")
    parser.add_argument("overrides", nargs="*", help="extra exitrl.train overrides (e.g. backbone.name=...)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = os.environ.get("EXITRL_DATA_DIR")
    rows: dict[str, list[dict]] = {"before": [], **{name: [] for name in VARIANTS}}
    for seed in args.seeds:
        for name, extra in VARIANTS.items():
            run_dir = run_variant(args.task, seed, name, extra, Path(args.runs), args.overrides)
            record = json.loads((run_dir / "metrics.json").read_text())
            rounds = record["cotrain"]["rounds"]
            after = {"dev_per_layer": [100 * a for a in rounds[-1]["dev_per_layer"]],
                     "reinforce_dev": 100 * rounds[-1]["policy_dev"]["score"],
                     "reinforce_speedup": rounds[-1]["policy_dev"]["speedup"],
                     "confidence_auc": 100 * confidence_auc(run_dir / "backbone", args.task, data_dir, device)}
            rows[name].append({"seed": seed, **after})
            if name == "plain":  # the seed's backbone before any round: round 0 of the record, its cached backbone
                rows["before"].append({"seed": seed, "dev_per_layer": [100 * a for a in rounds[0]["dev_per_layer"]],
                                       "reinforce_dev": 100 * rounds[0]["policy_dev"]["score"],
                                       "reinforce_speedup": rounds[0]["policy_dev"]["speedup"],
                                       "confidence_auc": 100 * confidence_auc(Path(record["backbone"]["path"]),
                                                                              args.task, data_dir, device)})
    num_layers = len(rows["before"][0]["dev_per_layer"])
    lines = [f"Co-training, one round, {args.task}, seeds {args.seeds} ({platform.node()}, {device}, "
             f"{time.strftime('%Y-%m-%d')}); mean ± std over seeds, and the paired change against before.", "",
             "| variant | dev accuracy, layers 1.." + str(num_layers) + " | mean over layers | change | REINFORCE dev "
             "| change | confidence AUC | change |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in rows.items():
        per_layer = " / ".join(mean_std([r["dev_per_layer"][i] for r in runs]).split(" ±")[0]
                               for i in range(num_layers))
        mean_layer = [sum(r["dev_per_layer"]) / num_layers for r in runs]
        base = rows["before"]

        def change(key, runs=runs, base=base):
            if runs is base:
                return "–"
            return mean_std([r[key] - b[key] for r, b in zip(runs, base)])

        base_mean = [sum(b["dev_per_layer"]) / num_layers for b in base]
        layer_change = "–" if runs is base else mean_std([m - b for m, b in zip(mean_layer, base_mean)])
        lines.append(f"| {name} | {per_layer} | {mean_std(mean_layer)} | {layer_change} | "
                     f"{mean_std([r['reinforce_dev'] for r in runs])} | {change('reinforce_dev')} | "
                     f"{mean_std([r['confidence_auc'] for r in runs])} | {change('confidence_auc')} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"task": args.task, "seeds": args.seeds, "device": str(device),
                                                    "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
                                                    "thresholds": THRESHOLDS, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
