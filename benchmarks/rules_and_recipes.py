"""Every classic rule at two settings of its knob, on backbones trained by each recipe (issue 4's measurements).

For each objective: fine-tune the backbone with a held-out policy/calibration split (``--policy-split``), trace
it, record per-layer dev accuracy, then fit and evaluate every rule (static, confidence, temperature-scaled
confidence, PABEE, CALM with three measures at δ = 0.05 and 0.1, FREE, BERxiT learn-to-exit, the oracles) on dev
with the common metric contract. CALM's rows carry the calibration risk and the dev risk next to δ. Writes one
JSON per objective as it goes (a cut-off run keeps what it finished) and prints a table per objective. Optionally
exports trace splits of each objective for CPU work (``--export dev policy``):

    python benchmarks/rules_and_recipes.py --task rte --backbone PATH --data-dir DIR --out OUT \
        --objectives weighted_ce sweet layerskip deebert free --epochs 5 --batch-size 16 --policy-split 0.2 \
        --export dev policy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exitrl.agents.calm import CalmConfig, fit_calm
from exitrl.agents.inputs import FitInputs
from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.device import pick_device
from exitrl.core.report import results_table
from exitrl.data import load_task
from exitrl.data.loading import _select
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds
from exitrl.experiments.pipeline import AgentRun
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.trace import SplitTrace, Trace

# (label, agent, options): two settings of each rule's knob
RULES = [
    ("static 3", "static", {"layer": 3}),
    ("static 4", "static", {"layer": 4}),
    ("maxprob 0.9", "confidence", {"threshold": 0.9}),
    ("maxprob 0.8", "confidence", {"threshold": 0.8}),
    ("maxprob 0.9, temperature", "confidence", {"threshold": 0.9, "temperature": True}),
    ("maxprob 0.8, temperature", "confidence", {"threshold": 0.8, "temperature": True}),
    ("entropy 0.3", "confidence", {"threshold": 0.3, "measure": "entropy"}),
    ("entropy 0.5", "confidence", {"threshold": 0.5, "measure": "entropy"}),
    ("patience 1", "patience", {"patience": 1}),
    ("patience 2", "patience", {"patience": 2}),
    ("calm margin d0.05", "calm", {"measure": "margin", "delta": 0.05}),
    ("calm margin d0.1", "calm", {"measure": "margin", "delta": 0.1}),
    ("calm saturation d0.05", "calm", {"measure": "saturation", "delta": 0.05}),
    ("calm saturation d0.1", "calm", {"measure": "saturation", "delta": 0.1}),
    ("calm meta d0.05", "calm", {"measure": "meta", "delta": 0.05}),
    ("calm meta d0.1", "calm", {"measure": "meta", "delta": 0.1}),
    ("calm margin loss d0.05", "calm", {"measure": "margin", "delta": 0.05, "risk": "loss"}),
    ("free (L/4)", "free", {}),
    ("free shallow 3", "free", {"shallow_layer": 3}),
    ("free (L/4) zeta 0.8", "free", {"zeta": 0.8}),
    ("lte 0.2", "lte", {"threshold": 0.2}),
    ("lte 0.4", "lte", {"threshold": 0.4}),
    ("oracle consistency", "oracle", {"kind": "consistency"}),
    ("oracle correctness", "oracle", {"kind": "correctness"}),
]


def evaluate_rules(trace: Trace, metric: str, device: torch.device, seed: int) -> dict:
    out = {}
    for label, agent, options in RULES:
        start = time.time()
        fitted = AgentRun.create(agent, dict(options), seed=seed).fit(trace, device, metric=metric)
        policy, info = fitted.policy, fitted.info
        result = evaluate_policy(policy, trace["dev"], metric)
        out[label] = {"agent": agent, "options": options, "info": info, "fit_seconds": round(time.time() - start, 2),
                      "dev": result}
    return out


def calm_exchangeable_check(dev: SplitTrace, device: torch.device, repeats: int = 100, seed: int = 0) -> dict:
    """LTT's promise needs calibration and test rows from one distribution. Split dev in random halves, certify
    CALM on one half, measure the disagreement on the other: the risk should stay <= δ in >= 1 − ε of the splits."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for measure in ("margin", "saturation"):
        for delta in (0.05, 0.1):
            risks, saved = [], []
            for _ in range(repeats):
                order = torch.randperm(len(dev), generator=g)
                half = len(dev) // 2
                cal, test = (dev.select(rows) for rows in (order[:half], order[half:]))
                policy, _ = fit_calm(CalmConfig(measure=measure, delta=delta),
                                     FitInputs.from_splits(cal, held_out=cal, device=device))
                result = evaluate_policy(policy, test)
                risks.append(result["disagreement"])
                saved.append(result["saved_layers"])
            risks_t = torch.tensor(risks)
            out[f"{measure} d{delta}"] = {"mean_risk": float(risks_t.mean()), "max_risk": float(risks_t.max()),
                                          "fraction_within_delta": float((risks_t <= delta).float().mean()),
                                          "mean_saved": float(torch.tensor(saved).mean()), "repeats": repeats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--objectives", nargs="+", default=["weighted_ce", "sweet", "layerskip"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--policy-split", type=float, default=0.2)
    parser.add_argument("--trace-train-rows", type=int, default=20_000, help="train rows traced (meta classifier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/exitrl_cache")
    parser.add_argument("--export", nargs="*", default=[], help="trace splits to save per objective (dev, policy)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    data = load_task(args.task, args.data_dir, policy_split=args.policy_split)
    for objective in args.objectives:
        start = time.time()
        cfg = FinetuneConfig(objective=objective, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed)
        model, tokenizer, info = load_or_finetune(args.backbone, data, cfg, args.cache, device, args.pooling)
        finetune_seconds = time.time() - start
        traced = data
        if len(data.splits["train"]) > args.trace_train_rows:  # the meta classifier needs no more than this
            traced = type(data)(data.name, data.label_names, data.metric,
                                {**data.splits, "train": _select(data.splits["train"],
                                                                 list(range(args.trace_train_rows)))}, data.source)
        trace = load_or_build_trace(model, tokenizer, traced, args.cache, device, cfg.max_length, objective=objective)
        trace_seconds = time.time() - start - finetune_seconds
        bounds = oracle_bounds(trace["dev"], data.metric)
        rules = evaluate_rules(trace, data.metric, device, args.seed)
        exchangeable = calm_exchangeable_check(trace["dev"], device, seed=args.seed)
        record = {"task": data.name, "objective": objective, "finetune": info.get("finetune"),
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "splits": {k: len(v) for k, v in trace.splits.items()},
                  "finetune_seconds": round(finetune_seconds, 1), "trace_seconds": round(trace_seconds, 1),
                  "dev_per_layer": bounds["per_layer_score"], "train_per_layer": trace["train"].per_layer_accuracy(),
                  "policy_per_layer": trace["policy"].per_layer_accuracy() if "policy" in trace.splits else None,
                  "oracle": bounds, "rules": rules, "calm_on_dev_halves": exchangeable}
        (out / f"{data.name}_{objective}.json").write_text(json.dumps(record, indent=2))
        if args.export:
            keep = {k: v for k, v in trace.splits.items() if k in args.export}
            Trace(keep, trace.meta).save(out / f"{data.name}_{objective}_trace.pt")
        rows = {"full model": bounds["full_model"], **{k: v["dev"] for k, v in rules.items()}}
        print(f"\n== {data.name} / {objective}: fine-tune {finetune_seconds:.0f} s, trace {trace_seconds:.0f} s; "
              f"dev per layer {' '.join(f'{100 * s:.1f}' for s in bounds['per_layer_score'])}")
        print(results_table(rows, data.metric, trace["dev"].num_layers))
        for label, rule in rules.items():
            if "delta" in rule["info"]:
                i = rule["info"]
                risk = rule["dev"]["disagreement" if i["risk"] == "consistency" else "loss_increase"]
                print(f"  {label}: certified={i['certified']} threshold={i['threshold']} "
                      f"calibration risk={i['calibration_risk']} dev risk={risk:.4f} (delta {i['delta']})")
        for label, check in exchangeable.items():
            print(f"  calm {label}, calibrated on random dev halves, tested on the other half ({check['repeats']}x): "
                  f"mean risk {check['mean_risk']:.4f}, max {check['max_risk']:.4f}, within delta in "
                  f"{100 * check['fraction_within_delta']:.0f} %, saved {100 * check['mean_saved']:.1f} %")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
