"""Trade-off curves of the metric contract: a family's Pareto frontier, its AUC, the summary numbers a comparison
table shows, and the oracle frontier drawn beside every comparison.

A *point* is one evaluated setting: ``{"score": task metric in [0, 1], "saved_layers": 1 − mean exit / L,
"speedup": L / mean exit}``.

**AUC, defined once.** Let S be 16 evenly spaced saved-layer fractions from 0 to (L − 1)/L (the saving of exiting
every example at layer 1). F(s) is the best task metric among the family's points that save at least s; the full
model belongs to every family (any knob has a strict end that never exits early), and F(s) is never below the score
of exiting everything at layer 1, which any policy can fall back to (so where no point saves s, F(s) is that score).
AUC = mean of F(s) over S, in the task metric's units: 1.0 would be a perfect score at every saving.
"""

from __future__ import annotations

import torch

from exitrl.core.metrics import summarize_exits
from exitrl.traces.trace import SplitTrace

AUC_POINTS = 16


def saving_grid(num_layers: int) -> list[float]:
    top = (num_layers - 1) / num_layers
    return [top * i / (AUC_POINTS - 1) for i in range(AUC_POINTS)]


def pareto_frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both saved layers and score, from most saving to least."""
    frontier, best = [], -float("inf")
    for point in sorted(points, key=lambda p: (-p["saved_layers"], -p["score"])):
        if point["score"] > best:
            frontier.append(point)
            best = point["score"]
    return frontier


def best_score_saving_at_least(points: list[dict], saving: float) -> float | None:
    scores = [p["score"] for p in points if p["saved_layers"] >= saving - 1e-9]
    return max(scores) if scores else None


def auc(points: list[dict], full_model: dict, layer_one_score: float, num_layers: int) -> float:
    """The AUC of the module docstring."""
    pool = [*points, full_model]
    values = []
    for s in saving_grid(num_layers):
        best = best_score_saving_at_least(pool, s)
        values.append(layer_one_score if best is None else max(best, layer_one_score))
    return sum(values) / len(values)


def speedup_within(points: list[dict], full_model: dict, loss: float = 0.01) -> float:
    """The largest layer speedup among points that lose at most ``loss`` of the full model's score (1.0 at worst)."""
    ok = [p["speedup"] for p in [*points, full_model] if p["score"] >= full_model["score"] - loss - 1e-12]
    return max(ok)


def family_summary(points: list[dict], full_model: dict, layer_one_score: float, num_layers: int) -> dict:
    """One row of the comparison table."""
    return {
        "auc": auc(points, full_model, layer_one_score, num_layers),
        "best_score_saved_30": best_score_saving_at_least(points, 0.30),
        "best_score_saved_50": best_score_saving_at_least(points, 0.50),
        "speedup_within_1pt": speedup_within(points, full_model, 0.01),
        "points": len(points),
        "frontier": [{k: p[k] for k in ("score", "saved_layers", "speedup", "setting") if k in p}
                     for p in pareto_frontier([*points, {**full_model, "setting": "full model"}])],
    }


@torch.no_grad()
def oracle_frontier(trace: SplitTrace, metric: str = "accuracy", max_points: int = 40) -> list[dict]:
    """The best any exit policy could do on these heads at each cost (analysis only): start with every example at
    layer 1, then move the examples layer 1 gets wrong to their first correct layer, cheapest move first. Each move
    gains one correct example, so for accuracy this greedy order is the exact optimum at every budget."""
    preds, labels = trace.prediction_table().cpu(), trace.labels.cpu()
    correct = preds == labels[:, None]
    n, num_layers = correct.shape
    first_correct = torch.where(correct.any(1), correct.int().argmax(1) + 1, torch.zeros(n, dtype=torch.long))
    movable = (~correct[:, 0]) & (first_correct > 0)
    order = torch.nonzero(movable).squeeze(1)
    order = order[torch.argsort(first_correct[order], stable=True)]
    steps = sorted({0, len(order), *torch.linspace(0, len(order), max_points).round().long().tolist()})
    rows = torch.arange(n)
    points = []
    for k in steps:
        exit_layers = torch.ones(n, dtype=torch.long)
        exit_layers[order[:k]] = first_correct[order[:k]]
        summary = summarize_exits(exit_layers, preds[rows, exit_layers - 1], labels, num_layers, metric)
        points.append({key: summary[key] for key in ("score", "saved_layers", "speedup", "avg_exit_layer")})
    return points
