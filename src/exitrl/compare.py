"""``python -m exitrl.compare RUNS_DIR``: which policy gives the best accuracy for a given speedup on my task?

Reads every ``metrics.json`` under RUNS_DIR (sweep points and ordinary ``exitrl.train`` runs alike), groups the
evaluated policies by task and family, and writes into RUNS_DIR:

* ``comparison.md`` and the terminal: per family its AUC (`exitrl.evaluation.tradeoff`), best task metric at >= 30 % and
  >= 50 % of layers saved, and the layer speedup within 1 point of the full model;
* ``comparison_<task>.png``: task metric against layer speedup, every point labelled with its knob value, each
  family's Pareto frontier, the oracle frontier and the consistency oracle, the full model's line;
* ``comparison.json``: the same numbers and frontiers;
* ``compare_tensorboard/``: the plot as an image and the table as text, for ``tensorboard --logdir RUNS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from exitrl.agents.declaration import LEARNED
from exitrl.agents.registry import agents
from exitrl.cli import add_threads_option, callable_module, fail, interrupted
from exitrl.core.threads import threads_for
from exitrl.evaluation.protocol import Point, SeedRun, SplitExits, difference_ci, family_row
from exitrl.evaluation.tradeoff import family_summary
from exitrl.experiments.record import EXITS_FILE, RunRecord, read_exits, read_records
from exitrl.traces.trace import HELD_OUT


def kind_of(name: str, kinds: dict) -> str | None:
    """A policy's kind as its run recorded it (records before schema 1: as the registry declares it)."""
    if name in kinds:
        return kinds[name]
    spec = agents().get(name.split("[")[0])
    return spec.kind if spec else None


def knob_setting(record: RunRecord) -> tuple[str | None, str]:
    """The run's trade-off knob and its value as a label (``alpha=0.02``): the sweep's, else the one the agent
    declares, read from the run's options or reward."""
    if record.knob:
        label = f"{record.knob['key'].split('.')[-1]}={record.knob['value']}"
        if record.knob.get("curve"):
            label += f",{record.knob['curve']['attribute']}={record.knob['curve']['value']}"
        return record.knob["key"], label
    spec = agents().get(record.agent)
    if spec is None:
        return None, ""
    section, option = spec.knob.key.split(".", 1)
    value = (record.reward if section == "reward" else record.options).get(option)
    return spec.knob.key, "" if value is None else f"{option}={value}"


def family_traits(record: RunRecord, knob_key: str | None) -> dict:
    """What makes two runs of one agent different curves: the reward (name, function and arguments other than
    the swept knob; rules use no reward), where learned agents learned, and the sweep label."""
    traits = {}
    if kind_of(record.agent, record.kinds) == LEARNED:
        reward = {k: v for k, v in record.reward.items() if v is not None and f"reward.{k}" != knob_key}
        traits["reward"] = ",".join(f"{k}={v}" if k not in ("name", "fn") else str(v) for k, v in reward.items())
        traits["learn_on"] = record.policy_trained_on or record.learn_on
    return traits


def group_of(record: RunRecord) -> str:
    """The runs' group: backbones differing only in their fine-tuning seed share one (see `read_runs`)."""
    return str(record.backbone.get("seed_group") or record.trace_key)


def read_runs(runs_dir: Path, with_baselines: bool = False) -> dict[str, dict]:
    """``{task: {"families": {family: [points]}, "learned": {families}, "oracle": ..., "num_layers": L,
    "metric": m, "traces": [trace keys]}}``. Runs of one task on backbones that differ only in their fine-tuning
    seed (the record's ``backbone.seed_group``) are seeds of one group; runs on other traces (another backbone,
    recipe or data) become separate groups, ``task@<key>``. Runs of one agent that differ in reward or in where they
    learned become separate families, labelled by what differs (``reinforce[reward=mypkg.rewards:fn]``). The
    baselines a train run evaluated beside its agent join their families only with ``with_baselines``."""
    tasks: dict[str, dict] = {}
    records = read_records(runs_dir)
    keys: dict[str, set] = defaultdict(set)
    for _, record in records:
        keys[record.task].add(group_of(record))
    points = []  # (task, agent, base family, traits, result, setting, run)
    baselines_seen = set()  # a baseline evaluated beside many runs of one trace is one point, not one per run
    seeds = {str(path.parent): (str(record.trace_key), record.seed) for path, record in records}
    for path, record in records:
        task = record.task
        if len(keys[task]) > 1:  # runs on different backbones or data: never mixed into one curve
            task = f"{task}@{group_of(record)[:8]}"
        tasks.setdefault(task, {"families": defaultdict(list), "learned": set(), "oracle": record.oracle,
                                "num_layers": record.num_layers, "metric": record.metric, "traces": []})
        if str(record.trace_key) not in tasks[task]["traces"]:
            tasks[task]["traces"].append(str(record.trace_key))
        knob_key, setting = knob_setting(record)
        for agent, result in record.results.items():
            if agent == "oracle" or not result.get("deployable", True):
                continue
            own = agent == record.agent
            if not own and not with_baselines:
                continue
            if not own:
                key = (task, agent, str(record.trace_key), json.dumps(result, sort_keys=True))
                if key in baselines_seen:
                    continue
                baselines_seen.add(key)
            traits = family_traits(record, knob_key) if own else {}
            points.append((task, agent, record.family if own else agent, traits, result,
                           setting if own else "baseline", str(path.parent), kind_of(agent, record.kinds)))
    variants: dict[tuple, list[dict]] = defaultdict(list)
    for task, _, base, traits, *_ in points:
        if traits not in variants[(task, base)]:
            variants[(task, base)].append(traits)
    for task, agent, base, traits, result, setting, run, kind in points:
        family = base
        others = variants[(task, base)]
        if len(others) > 1:  # name the family by the traits in which its runs differ from the others'
            differing = [k for k in traits if any(o.get(k) != traits[k] for o in others)]
            family = f"{base}[{','.join(f'{k}={traits[k]}' for k in differing)}]"
        tasks[task]["families"][family].append({**result, "setting": setting, "run": run, "agent": agent,
                                                "trace": seeds[run][0], "seed": seeds[run]})
        if kind == LEARNED:
            tasks[task]["learned"].add(family)
    if not tasks:
        raise ValueError(f"No metrics.json under {runs_dir}: run python -m exitrl.sweep (or exitrl.train) first.")
    return tasks


def settings(points: list[dict]) -> int:
    """How many knob settings a family's points cover: with one (a single train run, or its seeds) the family is a
    point, not a curve, and its AUC (`exitrl.evaluation.tradeoff`) says nothing about a trade-off."""
    return len({point.get("setting", "") for point in points})


ONE_SETTING = ("AUC –: a family of one setting (a single train run) is a point, not a curve, so it has no AUC; "
               "compare its row's numbers, or sweep it (exitrl sweep agent=NAME) for a curve.")


def first_backbone(task: dict) -> dict:
    """The task with only the points of its first trace: a dev frontier over several backbones' points would pick
    the luckiest backbone per point; the honest protocol averages the backbone seeds instead."""
    first = task["traces"][0]
    families = {name: [p for p in points if p["trace"] == first] for name, points in task["families"].items()}
    return {**task, "families": {name: points for name, points in families.items() if points}}


def summarize(task: dict) -> dict:
    """The dev-frontier summary (`exitrl.evaluation.tradeoff`) of the task's first backbone (see `first_backbone`)."""
    task = first_backbone(task)
    full = task["oracle"]["full_model"]
    layer_one = task["oracle"]["per_layer_score"][0]
    families = {name: {**family_summary(points, full, layer_one, task["num_layers"]), "settings": settings(points)}
                for name, points in sorted(task["families"].items())}
    return {"metric": task["metric"], "num_layers": task["num_layers"], "full_model": full,
            "learned": sorted(task["learned"] & set(families)), "backbones": len(task["traces"]),
            "consistency_oracle": task["oracle"]["consistency_oracle"],
            "oracle_frontier": task["oracle"].get("oracle_frontier", []), "families": families}


def protocol_points(task: dict) -> tuple[dict, dict] | str:
    """``({family: {(trace, seed): [Point]}}, {trace: (full model, layer 1)})`` from the runs' ``exits.pt``, or
    why there are none. Every backbone of a group must have evaluated the same dev and held-out rows."""
    loaded: dict[str, dict | None] = {}
    families: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    references: dict[str, tuple[Point, Point]] = {}
    rows: dict[str, torch.Tensor] = {}
    for family, points in sorted(task["families"].items()):
        for point in points:
            if point["run"] not in loaded:
                loaded[point["run"]] = read_exits(point["run"])
            exits = loaded[point["run"]]
            if exits is None:
                return f"{point['run']} has no {EXITS_FILE} (written by exitrl before the honest protocol)"
            if HELD_OUT not in exits["labels"]:
                return ("the runs have no held-out split, so knobs could only be read off dev: add "
                        "data.policy_split=0.2 (or sweep.trace= a trace with a held-out split)")
            labels = {k: v.long() for k, v in exits["labels"].items()}
            for name in (HELD_OUT, "dev"):
                if not torch.equal(rows.setdefault(name, labels[name]), labels[name]):
                    return (f"{point['run']} evaluated other {name} rows than the group's first run: backbone "
                            "seeds can only be averaged on the same data")

            def split(entry: dict, name: str, labels=labels) -> SplitExits:
                return SplitExits(entry[name]["layers"].long(), entry[name]["predictions"].long(), labels[name])

            mine = exits["policies"][point["agent"]]
            families[family][point["seed"]].append(Point(point["setting"], split(mine, HELD_OUT), split(mine, "dev")))
            if point["trace"] not in references:
                num_layers = task["num_layers"]

                def fixed(key: str, layer: int, exits=exits, labels=labels) -> Point:
                    made = {name: SplitExits(torch.full_like(labels[name], layer), exits["reference"][key][name].long(),
                                             labels[name]) for name in (HELD_OUT, "dev")}
                    return Point(key, made[HELD_OUT], made["dev"])

                references[point["trace"]] = (fixed("full", num_layers), fixed("layer_one", 1))
    return families, references


def protocol_summary(task: dict, resamples: int = 2000) -> dict:
    """The honest protocol (`exitrl.evaluation.protocol`): per family, mean ± std over seeds of the validated AUC, the
    validation AUC and the points chosen on validation; the best learned and best rule family by validation AUC and
    a paired bootstrap CI of their validated-AUC difference. ``{"unavailable": why}`` when the runs cannot."""
    found = protocol_points(task)
    if isinstance(found, str):
        return {"unavailable": found}
    families, references = found
    metric, num_layers = task["metric"], task["num_layers"]
    runs = {family: {seed: SeedRun(points, *references[seed[0]]) for seed, points in by_seed.items()}
            for family, by_seed in families.items()}
    rows = {family: {**family_row(list(by_seed.values()), metric, num_layers), "learned": family in task["learned"],
                     "settings": len({p.setting for run in by_seed.values() for p in run.points})}
            for family, by_seed in runs.items()}
    summary = {"families": rows, "metric": metric, "backbones": len(references)}
    curves = [f for f in rows if rows[f]["settings"] > 1]  # a one-setting family's AUC ranks nothing
    learned = [f for f in curves if f in task["learned"]]
    rules = [f for f in curves if f not in task["learned"]]
    if learned and rules:
        best_learned = max(learned, key=lambda f: rows[f]["validation_auc"]["mean"])
        best_rule = max(rules, key=lambda f: rows[f]["validation_auc"]["mean"])
        summary.update(best_learned=best_learned, best_rule=best_rule,
                       difference=difference_ci(runs[best_learned], runs[best_rule], metric, num_layers, resamples))
    return summary


def protocol_table(name: str, summary: dict) -> str:
    """The honest protocol's markdown: choices on the held-out split, numbers on dev."""
    if "unavailable" in summary:
        return f"### {name}: honest protocol unavailable: {summary['unavailable']}."

    def ms(value, scale=100, unit=""):
        return "–" if value is None else f"{scale * value['mean']:.2f} ± {scale * value['std']:.2f}{unit}"

    seeds = "seeds" if summary.get("backbones", 1) == 1 else f"seeds of {summary['backbones']} backbones"
    lines = [f"### {name}: honest protocol (every choice on the held-out split; dev numbers; mean ± std over {seeds})",
             ""]
    if "difference" in summary:
        d = summary["difference"]
        lines += [f"Best learned by validation AUC: {summary['best_learned']}; best rule: {summary['best_rule']}. "
                  f"Validated AUC difference {100 * d['estimate']:+.2f} points, paired bootstrap 95 % CI "
                  f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] over dev rows.", ""]
    lines += ["| family | validated AUC | validation AUC | speedup within 1 point | its dev score | dev score, ≥ 50 % "
              "saved | seeds | points |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    single = False
    for family, row in sorted(summary["families"].items(),
                              key=lambda kv: (kv[1].get("settings", 2) < 2, -kv[1]["validated_auc"]["mean"])):
        label = f"{family} (learned)" if row["learned"] else family
        curve = row.get("settings", 2) > 1
        single = single or not curve
        lines.append(f"| {label} | {ms(row['validated_auc']) if curve else '–'} | "
                     f"{ms(row['validation_auc']) if curve else '–'} | "
                     f"{ms(row['speedup_within_1pt'], 1, '×')} | {ms(row['score_within_1pt'])} | "
                     f"{ms(row['score_saved_50'])} | {row['seeds']} | {row['points']} |")
    return "\n".join(lines + (["", ONE_SETTING] if single else []))


def table(name: str, summary: dict) -> str:
    """A markdown table, best AUC first; learned families are marked."""
    metric = summary["metric"]
    full, oracle = summary["full_model"], summary["consistency_oracle"]

    def pct(value):
        return "–" if value is None else f"{100 * value:.2f}"

    backbones = summary.get("backbones", 1)
    first = "" if backbones == 1 else f" (dev frontiers of the first of {backbones} backbones)"
    lines = [f"### {name}{first}: full model {pct(full['score'])} {metric}; consistency oracle saves "
             f"{100 * oracle['saved_layers']:.1f} % ({oracle['speedup']:.2f}×) at {pct(oracle['score'])}", "",
             f"| family | AUC | best {metric}, ≥ 30 % saved | best {metric}, ≥ 50 % saved | speedup within 1 point "
             "| points |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    order = sorted(summary["families"].items(), key=lambda kv: (kv[1].get("settings", 2) < 2, -kv[1]["auc"]))
    single = False
    for family, row in order:
        label = f"{family} (learned)" if family in summary["learned"] else family
        curve = row.get("settings", 2) > 1
        single = single or not curve
        lines.append(f"| {label} | {pct(row['auc']) if curve else '–'} | {pct(row['best_score_saved_30'])} | "
                     f"{pct(row['best_score_saved_50'])} | {row['speedup_within_1pt']:.2f}× | {row['points']} |")
    return "\n".join(lines + (["", ONE_SETTING] if single else []))


def plot(name: str, task: dict, summary: dict, path: Path):
    """Task metric against layer speedup; returns the matplotlib figure (also saved as PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    colors = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    ys = [summary["full_model"]["score"]]
    for i, (family, points) in enumerate(sorted(task["families"].items())):
        color = colors[i % len(colors)]
        learned = family in summary["learned"]
        ax.scatter([p["speedup"] for p in points], [100 * p["score"] for p in points], s=18, color=color,
                   alpha=0.55, marker="o" if learned else "s")
        for point in points:  # each point names its knob value
            if point.get("setting"):
                ax.annotate(point["setting"].split("=")[-1], (point["speedup"], 100 * point["score"]), fontsize=5,
                            color=color, alpha=0.8, xytext=(2, 2), textcoords="offset points")
        frontier = sorted(summary["families"][family]["frontier"], key=lambda p: p["speedup"])
        row = summary["families"][family]
        ax.plot([p["speedup"] for p in frontier], [100 * p["score"] for p in frontier], color=color,
                label=f"{family} (AUC {100 * row['auc']:.1f})" if row.get("settings", 2) > 1 else
                f"{family} (one setting: no AUC)",
                linestyle="-" if learned else "--", linewidth=1.6)
        ys += [p["score"] for p in points]
    oracle_front = sorted(summary["oracle_frontier"], key=lambda p: p["speedup"])
    if oracle_front:
        ax.plot([p["speedup"] for p in oracle_front], [100 * p["score"] for p in oracle_front], color="0.45",
                linestyle=":", linewidth=1.4, label="oracle frontier (analysis only)")
    consistency = summary["consistency_oracle"]
    ax.scatter([consistency["speedup"]], [100 * consistency["score"]], marker="*", s=180, color="black",
               label="consistency oracle (no-loss bound)", zorder=5)
    ax.axhline(100 * summary["full_model"]["score"], color="black", linewidth=0.8, label="full model")
    low, high = 100 * min(ys), 100 * max(max(ys), consistency["score"])
    ax.set_ylim(low - 0.15 * (high - low + 1), high + 0.25 * (high - low + 1))
    ax.set_xlabel(f"layer speedup (L / mean exit layer, L = {summary['num_layers']})")
    ax.set_ylabel(f"dev {summary['metric']} (%)")
    ax.set_title(f"{name}: trade-off per policy family (solid: learned, dashed: rules)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return fig


def compare(runs_dir: str | Path, with_baselines: bool = False) -> dict:
    """Compare every run under ``runs_dir``; writes and returns the report (see the module docstring)."""
    runs_dir = Path(runs_dir)
    tasks = read_runs(runs_dir, with_baselines)
    report, texts = {}, []
    writer = SummaryWriter(str(runs_dir / "compare_tensorboard"))
    for name, task in sorted(tasks.items()):
        summary = summarize(task)
        summary["protocol"] = protocol_summary(task)
        report[name] = summary
        text = protocol_table(name, summary["protocol"]) + "\n\n" + table(name, summary)
        texts.append(text)
        figure = plot(name, first_backbone(task), summary, runs_dir / f"comparison_{name}.png")
        writer.add_figure(f"compare/{name}/tradeoff", figure, 0)
        writer.add_text(f"compare/{name}/table", text, 0)
    writer.close()
    (runs_dir / "comparison.json").write_text(json.dumps(report, indent=2))
    (runs_dir / "comparison.md").write_text("\n\n".join(texts) + "\n")
    print("\n\n".join(texts))
    written = [runs_dir / "comparison.md", runs_dir / "comparison.json",
               *(runs_dir / f"comparison_{name}.png" for name in sorted(tasks)), runs_dir / "compare_tensorboard"]
    print("\nwrote " + ", ".join(str(path) for path in written))
    return report


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m exitrl.compare", description="Compare every run (metrics.json) under RUNS_DIR: a table per "
        "task with each family's AUC, best task metric at >= 30 % and >= 50 % saved layers and speedup within 1 "
        "point; trade-off plots with each family's Pareto frontier and the oracle frontier; comparison.json; "
        "TensorBoard images. In Python: exitrl.compare(runs_dir).",
        epilog="Runs on different traces are never mixed; runs of one agent that differ in reward or in where they "
               "learned become separate families. Bad input exits with status 2.")
    parse.add_argument("runs_dir", metavar="RUNS_DIR", help="a folder of runs (a sweep, or exitrl.train runs)")
    parse.add_argument("--with-baselines", action="store_true",
                       help="also count the baselines that train runs evaluated beside their agent")
    add_threads_option(parse, "policy")
    return parse


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with threads_for("policy", args.threads):
            compare(args.runs_dir, args.with_baselines)
    except ValueError as err:
        fail(err, "exitrl.compare")
    except KeyboardInterrupt:  # the runs are only read
        interrupted("the runs are untouched; run it again", "exitrl.compare")


callable_module(__name__, compare)

if __name__ == "__main__":
    main()
