"""The honest comparison protocol: choices on validation, and a bootstrap CI that matches a known answer."""

from __future__ import annotations

import math

import torch

from exitrl.evaluation.protocol import Point, SplitExits, chosen_saving, chosen_within, paired_bootstrap, validated_auc

L = 4


def exits(correct: torch.Tensor, layer: int) -> SplitExits:
    labels = torch.zeros(len(correct), dtype=torch.long)
    return SplitExits(torch.full_like(labels, layer), (~correct.bool()).long(), labels)


def test_bootstrap_ci_of_a_mean_difference_matches_the_normal_interval():
    g = torch.Generator().manual_seed(0)
    n = 4000
    a = torch.rand(n, generator=g) < 0.80
    b = a.clone()
    flip = torch.rand(n, generator=g)
    b[flip < 0.06] = ~b[flip < 0.06]  # b differs from a on about 6 % of rows
    full = Point("full", exits(torch.zeros(n), L), exits(torch.zeros(n), L))  # never the validation pick
    one = Point("layer 1", exits(torch.zeros(n), 1), exits(torch.zeros(n), 1))
    family_a = [Point("a", exits(a, 1), exits(a, 1))]  # exits at layer 1: qualifies at every saving level
    family_b = [Point("b", exits(b, 1), exits(b, 1))]

    def difference(rows):
        return (validated_auc(family_a, full, one, "accuracy", L, rows)
                - validated_auc(family_b, full, one, "accuracy", L, rows))

    result = paired_bootstrap(difference, n, resamples=3000)
    d = a.double() - b.double()
    expected = float(d.mean())
    half = 1.96 * float(d.std()) / math.sqrt(n)
    assert abs(result["estimate"] - expected) < 1e-12
    low, high = result["ci95"]
    assert abs(low - (expected - half)) < 0.25 * half and abs(high - (expected + half)) < 0.25 * half
    same = paired_bootstrap(lambda rows: validated_auc(family_a, full, one, "accuracy", L, rows)
                            - validated_auc(family_a, full, one, "accuracy", L, rows), n, resamples=200)
    assert same["estimate"] == 0 and same["ci95"] == [0.0, 0.0]


def test_choices_are_made_on_validation_not_dev():
    n = 100
    ones, zeros = torch.ones(n), torch.zeros(n)
    good_val_bad_dev = Point("x", exits(ones, 2), exits(zeros, 2))
    bad_val_good_dev = Point("y", exits(zeros, 2), exits(ones, 2))
    full = Point("full", exits(ones, L), exits(ones, L))
    one = Point("one", exits(zeros, 1), exits(zeros, 1))
    auc = float(validated_auc([good_val_bad_dev, bad_val_good_dev], full, one, "accuracy", L))
    # levels up to 50 % saved pick x (validation 1.0, tie with full broken by order, x first), read dev 0
    assert auc < 0.5
    assert chosen_saving([good_val_bad_dev, bad_val_good_dev], "accuracy", L) is good_val_bad_dev
    assert chosen_within([good_val_bad_dev, bad_val_good_dev], full, "accuracy", L) is good_val_bad_dev
