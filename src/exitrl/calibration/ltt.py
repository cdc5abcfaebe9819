"""Learn-then-Test (Angelopoulos et al.; CALM, Schuster et al. 2022): pick the loosest exit threshold whose risk is
certified to stay under δ with probability at least 1 − ε.

Thresholds are tested in a fixed order from strict to loose (fixed-sequence testing, so no multiple-testing
correction is needed); each one's null hypothesis "risk > δ" is rejected when its Hoeffding–Bentkus p-value is at
most ε, and the walk stops at the first threshold it cannot reject. The risk must be a mean of per-example losses in
[0, 1]; exitrl uses 0/1 losses (disagreement with the full model, or an error the full model did not make).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space in float64 (exact enough for n up to millions)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    ks = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(ks + 1) - torch.lgamma(n - ks + 1)
               + ks * math.log(p) + (n - ks) * math.log1p(-p))
    return float(torch.logsumexp(log_pmf, 0).exp().clamp(max=1.0))


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence a·log(a/b) + (1 − a)·log((1 − a)/(1 − b)), with 0·log 0 = 0."""
    first = 0.0 if a == 0 else a * math.log(a / b)
    second = 0.0 if a == 1 else (1 - a) * math.log((1 - a) / (1 - b))
    return first + second


def hoeffding_bentkus_pvalue(risk: float, n: int, delta: float) -> float:
    """p-value of the null "true risk > δ" given the empirical risk of ``n`` examples:
    min(exp(−n·h1(min(R̂, δ), δ)), e·P(Binomial(n, δ) <= ⌈n·R̂⌉)), capped at 1."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    if n <= 0:
        return 1.0
    hoeffding = math.exp(-n * _h1(min(risk, delta), delta))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, delta)
    return min(1.0, hoeffding, bentkus)


@dataclass
class LTTResult:
    """Index of the loosest certified threshold (−1: none, the rule must not exit early) and the walk's numbers."""

    index: int
    pvalues: list[float]
    risks: list[float]

    @property
    def certified(self) -> bool:
        return self.index >= 0


def learn_then_test(risks: torch.Tensor | list[float], n: int, delta: float, epsilon: float) -> LTTResult:
    """``risks[k]``: empirical risk of the k-th threshold, ordered from strict to loose. Walk while the p-value is
    at most ``epsilon``; return the last threshold accepted."""
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}.")
    risks = [float(r) for r in risks]
    pvalues, index = [], -1
    for k, risk in enumerate(risks):
        p = hoeffding_bentkus_pvalue(risk, n, delta)
        pvalues.append(p)
        if p > epsilon:
            break
        index = k
    return LTTResult(index, pvalues, risks)
