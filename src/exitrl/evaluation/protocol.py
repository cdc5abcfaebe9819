"""The honest comparison: every choice on a validation split, numbers reported on dev, and a paired bootstrap CI.

A family is a list of *points* (one per knob value), each evaluated on both splits with per-example results
(`SplitExits`). Nothing is chosen by dev:

* **validated AUC**: for each saved-layer level s of `exitrl.evaluation.tradeoff`'s grid, take the point with the best
  *validation* score among those saving at least s *on validation* (the full model always qualifies), and read its
  *dev* score; F(s) is never below the dev score of exiting everything at layer 1. The AUC is the mean of F(s).
  (The dev-frontier AUC of `exitrl.evaluation.tradeoff` picks points by dev: optimistic for every family alike.)
* **within 1 point** / **at ≥ 50 % saved**: the point chosen on validation (the fastest within 1 point of the
  validation full model / the best scoring among those saving ≥ 50 % on validation), reported on dev.
* **best family**: by validation AUC.
* **paired bootstrap**: dev rows are resampled (the same rows for both families and every seed); with the points
  fixed as chosen on validation, the difference of validated AUCs is recomputed per resample; the 2.5 and 97.5
  percentiles bound it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.evaluation.tradeoff import saving_grid


@dataclass
class SplitExits:
    """Per example of one split: exit layer (1-indexed), prediction, label."""

    layers: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor

    def score(self, metric: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The task metric, on ``rows`` (``[B, n]`` resampled indices) when given: then one value per resample."""
        predictions = self.predictions if rows is None else self.predictions[rows]
        labels = self.labels if rows is None else self.labels[rows]
        if metric == "accuracy":
            return (predictions == labels).double().mean(-1)
        if metric == "f1":
            tp = ((predictions == 1) & (labels == 1)).double().sum(-1)
            wrong = (predictions != labels).double().sum(-1)
            return torch.where(tp > 0, 2 * tp / (2 * tp + wrong).clamp_min(1), torch.zeros_like(tp))
        raise ValueError(f"Unknown metric {metric!r}.")

    def saved(self, num_layers: int) -> float:
        return 1.0 - float(self.layers.double().mean()) / num_layers


@dataclass
class Point:
    setting: str
    validation: SplitExits
    dev: SplitExits


def picks(points: list[Point], full: Point, metric: str, num_layers: int) -> list[Point]:
    """For each level of the saving grid, the point chosen on validation (see the module docstring)."""
    pool = [*points, full]
    val_score = {id(p): float(p.validation.score(metric)) for p in pool}
    chosen = []
    for level in saving_grid(num_layers):
        eligible = [p for p in pool if p.validation.saved(num_layers) >= level - 1e-9]
        chosen.append(max(eligible, key=lambda p: val_score[id(p)]) if eligible else None)
    return chosen


def validated_auc(points: list[Point], full: Point, layer_one: Point, metric: str, num_layers: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """The validated AUC (one value, or one per resample of dev ``rows [B, n]``)."""
    floor = layer_one.dev.score(metric, rows)
    values = [floor if p is None else torch.maximum(p.dev.score(metric, rows), floor)
              for p in picks(points, full, metric, num_layers)]
    return torch.stack(values).mean(0)


def validation_auc(points: list[Point], full: Point, layer_one: Point, metric: str, num_layers: int) -> float:
    """The AUC read on validation alone (how families are ranked)."""
    swapped = [Point(p.setting, p.validation, p.validation) for p in points]
    return float(validated_auc(swapped, Point("", full.validation, full.validation),
                               Point("", layer_one.validation, layer_one.validation), metric, num_layers))


def chosen_within(points: list[Point], full: Point, metric: str, num_layers: int, loss: float = 0.01) -> Point:
    """The fastest point (on validation) within ``loss`` of the full model's validation score."""
    target = float(full.validation.score(metric)) - loss - 1e-12
    ok = [p for p in [*points, full] if float(p.validation.score(metric)) >= target]
    return max(ok, key=lambda p: p.validation.saved(num_layers))


def chosen_saving(points: list[Point], metric: str, num_layers: int, saving: float = 0.5) -> Point | None:
    """The best point (on validation) among those saving at least ``saving`` of the layers on validation."""
    ok = [p for p in points if p.validation.saved(num_layers) >= saving - 1e-9]
    return max(ok, key=lambda p: float(p.validation.score(metric))) if ok else None


def paired_bootstrap(differences, dev_size: int, resamples: int = 2000, seed: int = 0) -> dict:
    """``differences(rows) -> [B]``: the statistic on resampled dev rows; returns the point estimate (all rows)
    and the 95 % percentile interval."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(dev_size, (resamples, dev_size), generator=generator)
    everything = torch.arange(dev_size).unsqueeze(0)
    values = differences(rows)
    low, high = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"estimate": float(differences(everything)[0]), "ci95": [low, high], "resamples": resamples}


@dataclass
class SeedRun:
    """One seed of a family: its points, and that seed's full model and layer-1 references (the seed's backbone's)."""

    points: list[Point]
    full: Point
    layer_one: Point


def mean_std(values: list) -> dict | None:
    """``{"mean", "std", "n"}`` over the values that are not None (std 0 for one value), or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


def seed_numbers(run: SeedRun, metric: str, num_layers: int) -> dict:
    """One seed's row: validated and validation AUC, the point within 1 point (its dev speedup and score) and the
    dev score of the point at ≥ 50 % saved, all chosen on validation."""
    within = chosen_within(run.points, run.full, metric, num_layers)
    half = chosen_saving(run.points, metric, num_layers)
    return {"validated_auc": float(validated_auc(run.points, run.full, run.layer_one, metric, num_layers)),
            "validation_auc": validation_auc(run.points, run.full, run.layer_one, metric, num_layers),
            "speedup_within_1pt": num_layers / float(within.dev.layers.double().mean()),
            "score_within_1pt": float(within.dev.score(metric)),
            "score_saved_50": None if half is None else float(half.dev.score(metric))}


def family_row(runs: list[SeedRun], metric: str, num_layers: int) -> dict:
    """A family's row over its seeds: mean ± std of each of `seed_numbers`, the seed count and the point count."""
    numbers = [seed_numbers(run, metric, num_layers) for run in runs]
    row = {key: mean_std([n[key] for n in numbers]) for key in numbers[0]}
    row.update(seeds=len(runs), points=sum(len(run.points) for run in runs))
    return row


def difference_ci(learned: dict, rule: dict, metric: str, num_layers: int, resamples: int = 2000) -> dict:
    """Paired bootstrap of validated AUC(learned) − AUC(rule) over dev rows, averaged over the seeds both families
    have (``{seed: SeedRun}`` each; a seed's two runs share its dev rows)."""
    common = sorted(set(learned) & set(rule), key=str)
    if not common:
        raise ValueError("the two families share no seed: nothing to pair.")

    def difference(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            validated_auc(learned[s].points, learned[s].full, learned[s].layer_one, metric, num_layers, rows)
            - validated_auc(rule[s].points, rule[s].full, rule[s].layer_one, metric, num_layers, rows)
            for s in common]).mean(0)

    return paired_bootstrap(difference, len(learned[common[0]].full.dev.labels), resamples)
