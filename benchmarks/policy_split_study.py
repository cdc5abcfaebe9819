"""Does holding out a policy split from backbone fine-tuning help learned exit policies generalise?

For each (policy_split, fine-tuning epochs): fine-tune the backbone, trace it, train REINFORCE over an alpha grid
with confidence and state features, and sweep the confidence rule's threshold; report dev accuracy and saved
layers. Prints a table and saves JSON. Meant for a GPU (fine-tuning MiniLM on RTE takes seconds there):

    python benchmarks/policy_split_study.py --backbone PATH --data-dir DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from exitrl.agents import ConfidencePolicy, ReinforceConfig, train_reinforce
from exitrl.agents.inputs import FitInputs
from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.device import pick_device
from exitrl.data import load_task
from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds
from exitrl.rewards import RewardSpec
from exitrl.traces.build import load_or_build_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--splits", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.03, 0.06, 0.09, 0.12])
    parser.add_argument("--features", nargs="+", default=["confidence", "state"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.65, 0.6, 0.55])
    parser.add_argument("--cache", default="/tmp/exitrl_study")
    parser.add_argument("--policy-device", default=None, help="where REINFORCE trains (default: the backbone's)")
    parser.add_argument("--out", default="benchmarks/results/policy_split_study.json")
    args = parser.parse_args()
    device = pick_device("auto")
    records = []
    for split in args.splits:
        data = load_task(args.task, args.data_dir, policy_split=split)
        for epochs in args.epochs:
            start = time.time()
            cfg = FinetuneConfig(epochs=epochs, lr=args.lr)
            model, tok, _ = load_or_finetune(args.backbone, data, cfg, args.cache, device, args.pooling)
            trace = load_or_build_trace(model, tok, data, args.cache, device)
            finetune_seconds = time.time() - start
            policy_device = torch.device(args.policy_device) if args.policy_device else device
            dev = trace["dev"].to(policy_device)
            policy_split = "policy" if "policy" in trace.splits else "train"
            train = trace[policy_split].to(policy_device)
            bounds = oracle_bounds(dev)
            base = {"policy_split": split, "epochs": epochs, "finetune": asdict(cfg),
                    "finetune_and_trace_seconds": round(finetune_seconds, 1),
                    "full_accuracy": bounds["full_model"]["accuracy"], "dev_per_layer": bounds["per_layer_score"],
                    "oracle_saved": bounds["consistency_oracle"]["saved_layers"],
                    "train_per_layer": trace[policy_split].per_layer_accuracy()}
            for threshold in args.thresholds:
                m = evaluate_policy(ConfidencePolicy(threshold), dev)
                records.append({**base, "policy": "confidence", "knob": threshold, "accuracy": m["accuracy"],
                                "saved": m["saved_layers"], "histogram": m["exit_histogram"]})
                print(f"split={split} ep={epochs} full={100 * base['full_accuracy']:.1f} confidence t={threshold}: "
                      f"acc={100 * m['accuracy']:.1f} saved={100 * m['saved_layers']:.1f}", flush=True)
            for features in args.features:
                for alpha in args.alphas:
                    t = time.time()
                    inputs = FitInputs.from_splits(train, reward=RewardSpec("hardness", kwargs={"alpha": alpha}),
                                                   device=policy_device)
                    policy, _ = train_reinforce(ReinforceConfig(features=features), inputs)
                    m = evaluate_policy(policy, dev)
                    records.append({**base, "policy": f"reinforce/{features}", "knob": alpha,
                                    "accuracy": m["accuracy"], "saved": m["saved_layers"],
                                    "histogram": m["exit_histogram"], "train_seconds": round(time.time() - t, 1)})
                    print(f"split={split} ep={epochs} full={100 * base['full_accuracy']:.1f} "
                          f"reinforce/{features} a={alpha}: acc={100 * m['accuracy']:.1f} "
                          f"saved={100 * m['saved_layers']:.1f}", flush=True)
            del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "records": records}, indent=2))
    print(f"{'split':>6}{'ep':>4}{'full':>7}  {'policy':<22}{'knob':>7}{'acc':>7}{'saved':>7}")
    for r in records:
        print(f"{r['policy_split']:>6}{r['epochs']:>4}{100 * r['full_accuracy']:>7.1f}  {r['policy']:<22}"
              f"{r['knob']:>7}{100 * r['accuracy']:>7.1f}{100 * r['saved']:>7.1f}")


if __name__ == "__main__":
    main()
