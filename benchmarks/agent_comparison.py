"""Train several agents (each at chosen settings) on one trace and compare them on dev with the common metric
contract, beside a sweep of the confidence rule's threshold. Prints a table and saves JSON; each run also leaves
an ordinary run folder (policy.pt, metrics.json, tensorboard/) written by `exitrl.experiments.pipeline`, so
``python -m exitrl.compare`` reads them.

A run is ``AGENT key=value ...``; ``reward=`` and ``alpha=`` set the reward, other keys are agent options:

    python benchmarks/agent_comparison.py --trace ~/.cache/exitrl/traces/rte-KEY.pt \
        --run "reinforce alpha=0.04" --run "ppo alpha=0.15" --run "linucb alpha=0.1 features=state" \
        --out benchmarks/results/rte_agents.json

``--trace-dir`` reads a trace exported by ``trace_export.py`` (e.g. SST-2 traced on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
from pathlib import Path

import torch
import yaml
from trace_export import load_exported_trace

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.core.report import results_table
from exitrl.evaluation.evaluate import evaluate_policy
from exitrl.experiments.pipeline import AgentRun, Prepared, open_run, record_run
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import Trace

REWARD_KEYS = ("reward", "alpha", "depth", "fn")


def parse_run(spec: str) -> tuple[str, dict, dict]:
    """``"ppo alpha=0.15 features=confidence"`` -> (agent, agent options, reward settings)."""
    agent, *pairs = shlex.split(spec)
    options = {key: yaml.safe_load(value) for key, value in (p.split("=", 1) for p in pairs)}
    reward = {k: options.pop(k) for k in REWARD_KEYS if k in options}
    return agent, options, reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a trace file (the cache's traces/<task>-<key>.pt)")
    source.add_argument("--trace-dir", help="a folder written by trace_export.py")
    parser.add_argument("--run", action="append", required=True, help='"AGENT key=value ..." (repeatable)')
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cpu")
    trace = load_exported_trace(args.trace_dir) if args.trace_dir else Trace.load(Path(args.trace).expanduser())
    prepared = Prepared(trace.meta.get("task", "task"), trace.meta.get("metric", "accuracy"), trace,
                        {"trace": args.trace or args.trace_dir}, device)
    trace, metric = prepared.trace, prepared.metric
    dev = trace["dev"]
    out = Path(args.out)
    record = {"trace": args.trace or args.trace_dir, "task": prepared.task, "machine": platform.processor()
              or platform.machine(), "torch_threads": torch.get_num_threads(),
              "train_rows": len(trace["train"]), "dev_rows": len(dev), "oracle": prepared.bounds,
              "runs": [], "confidence_sweep": []}
    rows = {"full model": record["oracle"]["full_model"]}
    for spec in args.run:
        agent, options, reward = parse_run(spec)
        name = reward.pop("reward", "hardness")
        fn = reward.pop("fn", None)
        run = AgentRun.create(agent, options, RewardSpec(None if fn else name, fn, reward), seed=args.seed)
        run_dir = out.with_suffix("") / "runs" / spec.replace(" ", "_").replace("=", "")
        writer = open_run(run_dir)
        fitted = run.fit(trace, device, writer, Path(writer.log_dir), metric)
        result = record_run(run, fitted, prepared, run_dir, writer, seed=args.seed).results[agent]
        seconds = fitted.seconds
        record["runs"].append({"run": spec, "agent": agent, "options": options, "reward": {"name": name, **reward},
                               "train_seconds": round(seconds, 2), "dev": result, "run_dir": str(run_dir)})
        rows[spec] = result
        print(f"{spec}: {100 * result['score']:.2f} at {100 * result['saved_layers']:.1f}% saved ({seconds:.1f} s)",
              flush=True)
    for threshold in args.thresholds:
        result = evaluate_policy(ConfidencePolicy(threshold), dev, metric)
        record["confidence_sweep"].append({"threshold": threshold, "dev": result})
        rows[f"confidence {threshold}"] = result
    print(results_table(rows, metric, trace["dev"].num_layers))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
