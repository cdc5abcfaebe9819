"""``python -m exitrl.compare RUNS_DIR``: which policy gives the best accuracy for a given speedup on my task?

Reads every ``metrics.json`` under RUNS_DIR (sweep points and ordinary ``exitrl.train`` runs alike), groups the
evaluated policies by task and family, and writes into RUNS_DIR:

* ``comparison.md`` and the terminal: per family its AUC (`exitrl.tradeoff`), best task metric at >= 30 % and
  >= 50 % of layers saved, and the layer speedup within 1 point of the full model;
* ``comparison_<task>.png``: task metric against layer speedup, every point, each family's Pareto frontier, the
  oracle frontier and the consistency oracle, the full model's line;
* ``comparison.json``: the same numbers and frontiers;
* ``compare_tensorboard/``: the plot as an image and the table as text, for ``tensorboard --logdir RUNS_DIR``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from exitrl.agents.declaration import LEARNED
from exitrl.agents.registry import agents
from exitrl.record import read_records
from exitrl.tradeoff import family_summary


def kind_of(name: str, kinds: dict) -> str | None:
    """A policy's kind as its run recorded it (records before schema 1: as the registry declares it)."""
    if name in kinds:
        return kinds[name]
    spec = agents().get(name.split("[")[0])
    return spec.kind if spec else None


def read_runs(runs_dir: Path) -> dict[str, dict]:
    """``{task: {"families": {family: [points]}, "learned": {families}, "oracle": ..., "num_layers": L,
    "metric": m}}``. Runs of one task on different traces (another backbone, recipe or data) become separate
    groups, ``task@<trace key>``."""
    tasks: dict[str, dict] = {}
    records = read_records(runs_dir)
    keys: dict[str, set] = defaultdict(set)
    for _, record in records:
        keys[record.task].add(record.trace_key)
    for path, record in records:
        task = record.task
        if len(keys[task]) > 1:  # runs on different backbones or data: never mixed into one curve
            task = f"{task}@{str(record.trace_key)[:8]}"
        entry = tasks.setdefault(task, {"families": defaultdict(list), "learned": set(), "oracle": record.oracle,
                                        "num_layers": record.num_layers, "metric": record.metric})
        knob = record.knob
        for agent, result in record.results.items():
            if agent == "oracle" or not result.get("deployable", True):
                continue
            own = agent == record.agent
            family = record.family if own else agent
            setting = f"{knob['key'].split('.')[-1]}={knob['value']}" if knob and own else ""
            entry["families"][family].append({**result, "setting": setting, "run": str(path.parent)})
            if kind_of(agent, record.kinds) == LEARNED:
                entry["learned"].add(family)
    if not tasks:
        raise ValueError(f"No metrics.json under {runs_dir}: run python -m exitrl.sweep (or exitrl.train) first.")
    return tasks


def summarize(task: dict) -> dict:
    full = task["oracle"]["full_model"]
    layer_one = task["oracle"]["per_layer_score"][0]
    families = {name: family_summary(points, full, layer_one, task["num_layers"])
                for name, points in sorted(task["families"].items())}
    return {"metric": task["metric"], "num_layers": task["num_layers"], "full_model": full,
            "learned": sorted(task["learned"]),
            "consistency_oracle": task["oracle"]["consistency_oracle"],
            "oracle_frontier": task["oracle"].get("oracle_frontier", []), "families": families}


def table(name: str, summary: dict) -> str:
    """A markdown table, best AUC first; learned families are marked."""
    metric = summary["metric"]
    full, oracle = summary["full_model"], summary["consistency_oracle"]

    def pct(value):
        return "–" if value is None else f"{100 * value:.2f}"

    lines = [f"### {name}: full model {pct(full['score'])} {metric}; consistency oracle saves "
             f"{100 * oracle['saved_layers']:.1f} % ({oracle['speedup']:.2f}×) at {pct(oracle['score'])}", "",
             f"| family | AUC | best {metric}, ≥ 30 % saved | best {metric}, ≥ 50 % saved | speedup within 1 point "
             "| points |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    order = sorted(summary["families"].items(), key=lambda kv: -kv[1]["auc"])
    for family, row in order:
        label = f"{family} (learned)" if family in summary["learned"] else family
        lines.append(f"| {label} | {pct(row['auc'])} | {pct(row['best_score_saved_30'])} | "
                     f"{pct(row['best_score_saved_50'])} | {row['speedup_within_1pt']:.2f}× | {row['points']} |")
    return "\n".join(lines)


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
        frontier = sorted(summary["families"][family]["frontier"], key=lambda p: p["speedup"])
        ax.plot([p["speedup"] for p in frontier], [100 * p["score"] for p in frontier], color=color,
                label=f"{family} (AUC {100 * summary['families'][family]['auc']:.1f})",
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


def compare(runs_dir: str | Path) -> dict:
    runs_dir = Path(runs_dir)
    tasks = read_runs(runs_dir)
    report, texts = {}, []
    writer = SummaryWriter(str(runs_dir / "compare_tensorboard"))
    for name, task in sorted(tasks.items()):
        summary = summarize(task)
        report[name] = summary
        text = table(name, summary)
        texts.append(text)
        figure = plot(name, task, summary, runs_dir / f"comparison_{name}.png")
        writer.add_figure(f"compare/{name}/tradeoff", figure, 0)
        writer.add_text(f"compare/{name}/table", text, 0)
    writer.close()
    (runs_dir / "comparison.json").write_text(json.dumps(report, indent=2))
    (runs_dir / "comparison.md").write_text("\n\n".join(texts) + "\n")
    print("\n\n".join(texts))
    print(f"\nwrote {runs_dir / 'comparison.md'}, comparison.json, comparison_<task>.png, compare_tensorboard/")
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m exitrl.compare RUNS_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        compare(argv[0])
    except ValueError as err:
        print(f"exitrl: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
