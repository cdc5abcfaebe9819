"""FREE's adaptive threshold (Bae et al., EMNLP 2023): model the shallow exit's confidence with a two-component Beta
mixture, one component for examples whose shallow prediction agrees with the deep one and one for the rest, and
exit at the lowest confidence where "agrees" is probable enough.

Each component is fitted by the method of moments on its own class's confidences (the labels are known: the deep
model's prediction is seen for every example that went deep), the mixing weight is the agreeing fraction. On the
grid linspace(0.3, 0.9, 10), count the points whose posterior for the agreeing component exceeds ζ;
threshold = grid[clip(10 − count, 0, 9)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRID = torch.linspace(0.3, 0.9, 10, dtype=torch.float64)


@dataclass
class BetaFit:
    a: float
    b: float

    def log_pdf(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double().clamp(1e-6, 1 - 1e-6)
        log_norm = torch.lgamma(torch.tensor(self.a + self.b, dtype=torch.float64)) - torch.lgamma(
            torch.tensor(self.a, dtype=torch.float64)) - torch.lgamma(torch.tensor(self.b, dtype=torch.float64))
        return log_norm + (self.a - 1) * x.log() + (self.b - 1) * torch.log1p(-x)


def fit_beta_moments(x: torch.Tensor) -> BetaFit:
    """Beta(a, b) with the sample's mean m and variance v: a = m·c, b = (1 − m)·c, c = m(1 − m)/v − 1.
    A sample of fewer than two distinct values (v = 0) or an impossible variance gets c = 100 (a narrow Beta)."""
    x = x.double().clamp(1e-6, 1 - 1e-6)
    mean = float(x.mean())
    var = float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
    common = mean * (1 - mean) / var - 1 if var > 0 else 100.0
    if common <= 0:
        common = 100.0
    return BetaFit(mean * common, (1 - mean) * common)


def beta_mixture_threshold(confidence: torch.Tensor, agrees: torch.Tensor, zeta: float = 0.4,
                           grid: torch.Tensor = GRID) -> float:
    """The threshold from (shallow confidence, 1[shallow prediction = deep prediction]) pairs. With no example of
    one class, the mixture is one component: all agree -> the loosest grid point, none agree -> the strictest."""
    agrees = agrees.bool()
    n_agree, n = int(agrees.sum()), agrees.numel()
    if n == 0:
        raise ValueError("FREE's threshold needs at least one (confidence, agreement) pair.")
    if n_agree in (0, n):
        return float(grid[0] if n_agree == n else grid[-1])
    weight = n_agree / n
    agree_fit, disagree_fit = fit_beta_moments(confidence[agrees]), fit_beta_moments(confidence[~agrees])
    log_agree = agree_fit.log_pdf(grid) + torch.log(torch.tensor(weight, dtype=torch.float64))
    log_disagree = disagree_fit.log_pdf(grid) + torch.log(torch.tensor(1 - weight, dtype=torch.float64))
    posterior = torch.sigmoid(log_agree - log_disagree)
    count = int((posterior > zeta).sum())
    return float(grid[min(max(len(grid) - count, 0), len(grid) - 1)])
