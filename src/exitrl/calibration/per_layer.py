"""Per-layer exit thresholds: exit at the first layer l whose score reaches τ_l, with τ_1..τ_{L−1} chosen on held-out
rows to maximise mean gain − cost_weight · exit layer / L.

One threshold for all layers (the usual max-prob rule) is a special case, so per-layer thresholds are the stronger
baseline a learned policy must beat; the same search also turns any learned score into a policy. The search is
coordinate ascent, exact in each coordinate: for layer l, with the other thresholds fixed, every row that reaches l
either exits there (its gain at l, minus the cost) or goes on to where the later thresholds send it; sorting those
rows by score, the best threshold is the cut with the largest cumulative difference (none, τ_l = +∞, if no cut
helps). Sweeps repeat over the layers until nothing changes. The ascent starts twice, from "never exit early" and
from the best single threshold for all layers, and keeps the better end: so on the rows it is fitted on it never
does worse than one global threshold. A larger ``cost_weight`` gives a cheaper point, so a grid of cost weights
traces a whole trade-off curve.
"""

from __future__ import annotations

import torch

NEVER = float("inf")


def exit_layers(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1-indexed exit layer of each row of ``scores [N, L]`` under ``thresholds [L]`` (the last layer always exits)."""
    exits = scores >= thresholds
    exits[:, -1] = True
    return exits.int().argmax(1) + 1


def fit_per_layer_thresholds(scores: torch.Tensor, gains: torch.Tensor, cost_weight: float,
                             max_sweeps: int = 8, global_candidates: int = 200) -> tuple[torch.Tensor, float]:
    """Thresholds ``[L]`` (last +∞, never read) maximising mean(gains[row, exit] − cost_weight · exit / L), and that
    objective. ``gains [N, L]``: what exiting there is worth (1 where the head is right, say)."""
    if cost_weight < 0:
        raise ValueError(f"cost_weight must be >= 0, got {cost_weight}.")
    scores, gains = scores.double().cpu(), gains.double().cpu()
    n, num_layers = scores.shape
    rows = torch.arange(n)
    cost = cost_weight * torch.arange(1, num_layers + 1, dtype=torch.float64) / num_layers
    utility = gains - cost  # [N, L]: the value of exiting at each layer

    def value(thresholds: torch.Tensor) -> float:
        return float(utility[rows, exit_layers(scores, thresholds) - 1].mean())

    never = torch.full((num_layers,), NEVER, dtype=torch.float64)
    levels = torch.quantile(scores[:, :-1].reshape(-1), torch.linspace(0, 1, global_candidates, dtype=torch.float64))
    one = max((torch.cat([level.repeat(num_layers - 1), never[-1:]]) for level in levels.unique()), key=value)
    ends = [ascend(start, scores, utility, max_sweeps) for start in (never, one)]
    best = max(ends, key=value)
    return best.float(), value(best)


def ascend(thresholds: torch.Tensor, scores: torch.Tensor, utility: torch.Tensor, max_sweeps: int) -> torch.Tensor:
    """Coordinate ascent from ``thresholds`` (see the module docstring)."""
    rows = torch.arange(scores.shape[0])
    num_layers = scores.shape[1]
    for _ in range(max_sweeps):
        changed = False
        for layer in range(num_layers - 1):
            current = exit_layers(scores, thresholds)
            reach = current > layer  # rows that get to this layer (0-based) without exiting before it
            if not bool(reach.any()):
                continue
            later = thresholds.clone()
            later[layer] = NEVER
            onward = utility[rows, exit_layers(scores, later) - 1]  # where a row goes if it does not exit here
            delta = (utility[:, layer] - onward)[reach]
            score = scores[reach, layer]
            order = torch.argsort(score, descending=True)
            score, gain = score[order], torch.cumsum(delta[order], 0)
            cut_ok = torch.ones_like(score, dtype=torch.bool)  # a cut must not split rows of equal score
            cut_ok[:-1] = score[:-1] > score[1:]
            gain = torch.where(cut_ok, gain, torch.full_like(gain, -float("inf")))
            best = int(torch.argmax(gain))
            new = float(score[best]) if float(gain[best]) > 1e-12 else NEVER
            if new != float(thresholds[layer]):
                # accept only a strict improvement, so the ascent cannot cycle between equal optima
                trial = thresholds.clone()
                trial[layer] = new
                before = float(utility[rows, current - 1].mean())
                after = float(utility[rows, exit_layers(scores, trial) - 1].mean())
                if after > before + 1e-12:
                    thresholds, changed = trial, True
        if not changed:
            break
    return thresholds


# The trade-off knob of every family fitted by this search: from "as accurate as possible" (0) to "one layer costs
# more than any gain" (the last values exit almost everything at layer 1), dense where curves bend.
COST_WEIGHT_GRID = (0.0, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 2.0, 4.0)
GAINS = ("correct", "consistency")


def exit_gains(predictions: torch.Tensor, labels: torch.Tensor, gain: str = "correct") -> torch.Tensor:
    """What exiting at each layer is worth, ``[N, L]``, from what each exit emits (``predictions [N, L]``): 1 where
    it is right (``correct``) or agrees with the last layer (``consistency``, CALM's target, which needs no
    labels)."""
    if gain == "correct":
        return (predictions == labels[:, None]).double()
    if gain == "consistency":
        return (predictions == predictions[:, -1:]).double()
    raise ValueError(f"Unknown gain {gain!r}; valid: {', '.join(GAINS)}.")
