"""Tables and a plot from `generation_speed.py`'s points files: one JSON with every run, a markdown table per model
and batch size, and a plot of ROUGE-L against the full model's greedy output over speed (× the compiled full
model of the same run): every point, and a line per method through the points no other of its points beats.

    python benchmarks/generation_speed_report.py benchmarks/reference/generation_speed_h200_DATE.json \\
        RUN/points.json [RUN/points.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = {  # name: how the table calls it, and its knob's keys
    "selfspec": "exitrl self-speculative",
    "calm": "exitrl CALM (decaying λ)",
    "calm_ltt": "exitrl CALM, λ by Learn-then-Test",
    "free": "exitrl FREE (fixed threshold)",
    "free_adaptive": "exitrl FREE (adaptive threshold)",
    "reinforce": "exitrl REINFORCE policy",
    "hf_assistant_early_exit": "transformers assistant_early_exit",
    "economize_early_exit": "economize early_exit",
    "economize_calm": "economize calm",
}


def knob_text(knob: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knob.items())


def extra_text(point: dict) -> str:
    if "acceptance" in point:
        return f"acceptance {point['acceptance']:.3f}"
    if "mean_exit_layer" in point:
        return f"mean exit layer {point['mean_exit_layer']:.1f}"
    return ""


def table(run: dict) -> str:
    lines = [f"## {run['label']}: {run['model']} SmolLM2-135M — {run['machine']}, {run['date']}, torch {run['torch']}, "
             f"transformers {run['transformers']}, {run['args'].get('dtype', 'bfloat16')}, "
             f"{run['args']['new_tokens']} new tokens"]
    if run.get("draft_agreement"):
        agreement = run["draft_agreement"]
        shown = ", ".join(f"{layer}: {agreement[layer - 1]}" for layer in (4, 8, 12, 16, 20, 24, 28))
        lines.append(f"\nPer layer, % of the full model's greedy tokens the exit predicts too (teacher-forced on "
                     f"that output; the acceptance a draft there can reach): {shown}.")
    checks = [p for p in run["points"] if p.get("method") == "graph_check"]
    if checks:
        shown = "; ".join(f"{p['of']} batch {p['batch']}: {min(p['token_match']):.3f}" for p in checks)
        lines.append(f"\nCaptured vs eager tokens (fraction equal, worst of two runs): {shown}.")
    for batch in sorted({p["batch"] for p in run["points"] if "batch" in p}):
        points = [p for p in run["points"] if p.get("batch") == batch and "tokens_per_s" in p]
        lines += [f"\n### batch {batch}\n", "| method | knob | tokens/s | × compiled full | ROUGE-L | exact | "
                  "perplexity | |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for p in points:
            name = METHODS.get(p["method"], p["method"])
            if p["method"] == "full":
                name = f"full model ({p['knob']['engine']})"
            speed = p.get("speedup_vs_compiled")
            lines.append(f"| {name} | {knob_text(p['knob']) if p['method'] != 'full' else ''} | "
                         f"{p['tokens_per_s']:.1f} | {'' if speed is None else f'{speed:.2f}×'} | "
                         f"{p['rouge_l']:.3f} | {p['exact']:.2f} | {p['perplexity']:.2f} | {extra_text(p)} |")
        for p in run["points"]:
            if p.get("method") == "calm_ltt" and p.get("batch") == batch and not p.get("certified", True):
                c = p["calibration"]
                measure = (p.get("knob") or {}).get("measure", "margin")
                lines.append(f"\nCALM ({measure}) by Learn-then-Test (δ = {c['delta']}, ε = {c['epsilon']}, n = "
                             f"{c['n']} calibration prompts): nothing certified; the strictest candidate λ = "
                             f"{c['candidates'][0]:.6g} had risk (1 − ROUGE-L) {c['risks'][0]:.3f}, p = "
                             f"{c['pvalues'][0]:.3g}.")
    return "\n".join(lines)


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both speed and ROUGE-L, fastest last: the curve a user can pick from."""
    best, front = -1.0, []
    for p in sorted(points, key=lambda p: -p["speedup_vs_compiled"]):
        if p["rouge_l"] > best:
            best = p["rouge_l"]
            front.append(p)
    return front[::-1]


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    models = list(dict.fromkeys(run["model"] for run in runs))  # runs of one model share its panels
    batches = sorted({p["batch"] for run in runs for p in run["points"] if "speedup_vs_compiled" in p})
    fig, axes = plt.subplots(len(models), len(batches), figsize=(9.5 * len(batches), 4.8 * len(models)),
                             squeeze=False)
    for row, model in enumerate(models):
        for column, batch in enumerate(batches):
            ax = axes[row][column]
            curves: dict[tuple[str, str], list[dict]] = {}
            for run in (r for r in runs if r["model"] == model):
                for p in run["points"]:
                    if p.get("batch") != batch or "speedup_vs_compiled" not in p:
                        continue
                    label = METHODS.get(p["method"], p["method"])
                    if p["method"] == "calm":
                        label += f", {p['knob'].get('measure', 'margin')}"
                    if p["knob"].get("exit_stride", 1) > 1:
                        label += f", exits every {p['knob']['exit_stride']} layers"
                    curves.setdefault((label, run["label"]), []).append(p)
            names = [label for label, _ in curves]
            for (label, source), chosen in curves.items():
                if names.count(label) > 1:  # a method measured in several calls: a curve per call
                    label += f" [{source}]"
                color, marker = colors(len(ax.lines) % 10), "osD^v<>"[len(ax.lines) // 10 % 7]
                ax.scatter([p["speedup_vs_compiled"] for p in chosen], [p["rouge_l"] for p in chosen], s=12,
                           color=color, marker=marker, alpha=0.45)
                front = frontier(chosen)
                ax.plot([p["speedup_vs_compiled"] for p in front], [p["rouge_l"] for p in front], "-",
                        marker=marker, color=color, label=label, markersize=4)
            ax.axvline(1.0, color="grey", linestyle=":")
            ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
            machine = next(r["machine"] for r in runs if r["model"] == model)
            ax.set(title=f"{model} SmolLM2-135M, batch {batch} ({machine})",
                   xlabel="tokens/s ÷ compiled full model (dotted: 1×)", ylabel="ROUGE-L vs full greedy",
                   ylim=(0, 1.05))
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def assemble(out: Path, inputs: list[Path]) -> None:
    runs = [json.loads(Path(path).read_text()) for path in inputs]
    for run, path in zip(runs, inputs):
        run["label"] = Path(path).parent.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1))
    out.with_suffix(".md").write_text("\n\n".join(table(run) for run in runs) + "\n")
    plot([run for run in runs if any("speedup_vs_compiled" in p for p in run["points"])], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    assemble(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
