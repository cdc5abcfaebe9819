"""Exiting as optimal stopping: at layer l, exit when what exiting now is worth beats what going on is worth.

A rule only asks "is this layer sure?". The stopping policy also asks "will a later layer fix it?": at layer l it
compares the expected gain of exiting now, G_l(x) − λ·l/L, with the continuation value C_l(x, λ), the expected
value of acting well from layer l + 1 on. Both are fitted on the trace (Longstaff–Schwartz / fitted Q-iteration):

* G_l(x) = P(the exit at l is right | what layer l shows), a per-layer classifier on the observation (history
  included by default), or the head's own max-prob (``gain_model=max_prob``);
* backward induction from the last layer down: V_L = gain_L − λ; for l = L−1 … 1, C_l is regressed on layer l's
  observation (and λ) against the realised V_{l+1}, the policy stops where G_l − λ·l/L ≥ C_l, and V_l is the
  realised value of that choice (the gain at l, or V_{l+1}).

gain = correct (labels) or agrees with the last layer (``consistency``, label-free); cost λ per layer as a fraction
of L (``cost_weight``, the knob). C is conditioned on λ (an input, trained over ``agent.train_costs``), so one
fitted model gives the whole trade-off curve. Cross-fitted as `exit_scorer` is: the learn split is cut into
``agent.folds`` parts and every row's G and C during the induction come from networks that never saw it, so a value
that only memorised its rows does not steer the decisions at earlier layers; the deployed policy averages the parts.

Read top to bottom: the deployable policy, the options, then fitting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from exitrl.agents.declaration import LEARNED, AgentSpec, Knob, register
from exitrl.agents.exit_scorer import train_net
from exitrl.agents.inputs import FitInputs
from exitrl.agents.reinforce import PerLayerExitNet
from exitrl.agents.standardize import STD_FLOOR
from exitrl.calibration.per_layer import COST_WEIGHT_GRID, GAINS, exit_gains
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy

GAIN_MODELS = ("learned", "max_prob")


class ContinuationNet(nn.Module):
    """C_l(x, λ) = E[gain where the row will exit] − λ · E[that exit layer / L], each predicted (as a probability
    and a fraction) by one MLP per layer from the standardised features and λ. Why two parts: for a fixed future
    policy C is exactly linear in λ with these two coefficients, and both are bounded, so the fit cannot promise
    more than any exit can pay."""

    def __init__(self, num_layers: int, input_dim: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_layers, input_dim))
        self.register_buffer("std", torch.ones(num_layers, input_dim))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2)) for _ in range(num_layers))

    def parts(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits ``[B, 2]``: of the future gain, and of the future exit layer as a fraction of L."""
        return self.mlps[layer]((features - self.mean[layer]) / self.std[layer])

    def forward(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        gain, depth = torch.sigmoid(self.parts(features, layer)).unbind(-1)
        return gain - features[..., -1] * depth  # the last feature is λ (unstandardised here)


class StoppingNets(nn.Module):
    """One part's networks: G_l (a logit per layer) and C_l."""

    def __init__(self, num_layers: int, features: int, hidden: int):
        super().__init__()
        self.gain = PerLayerExitNet(num_layers, features, hidden)
        self.value = ContinuationNet(num_layers, features + 1, hidden)


class StoppingPolicy(ModuleExitPolicy):
    """Exit at the first layer l where G_l(x) − λ·l/L ≥ C_l(x, λ) (the last layer always exits)."""

    name = "stopping"
    graph_safe = True

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, features: str = "history",
                 hidden: int = 64, folds: int = 2, gain_model: str = "learned", cost_weight: float = 0.1):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = check_features(features)
        self.uses_history = view_reads_history(features)
        self.num_layers, self.gain_model, self.cost_weight = num_layers, gain_model, float(cost_weight)
        self._config = {"num_layers": num_layers, "hidden_size": hidden_size, "num_classes": num_classes,
                        "features": features, "hidden": hidden, "folds": folds, "gain_model": gain_model}
        self.module = nn.ModuleList(StoppingNets(num_layers, self.layout.feature_size(features), hidden)
                                    for _ in range(folds))

    def gain(self, observations: torch.Tensor, layer: int, nets=None) -> torch.Tensor:
        """G at 0-based ``layer``: the probability that exiting there gains (mean over ``nets``, all by default)."""
        if self.gain_model == "max_prob":
            return observations[..., self.layout.max_prob]
        x = self.layout.select(observations, self.features)
        nets = self.module if nets is None else nets
        return torch.stack([torch.sigmoid(n.gain(x, layer)) for n in nets]).mean(0)

    def continuation(self, observations: torch.Tensor, layer: int, cost_weight: float | torch.Tensor,
                     nets=None) -> torch.Tensor:
        """C at 0-based ``layer`` for cost weight λ (a number, or one per row)."""
        x = self.layout.select(observations, self.features)
        lam = torch.as_tensor(cost_weight, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        x = torch.cat([x, lam[..., None]], -1)
        nets = self.module if nets is None else nets
        return torch.stack([n.value(x, layer) for n in nets]).mean(0)

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        if batch.layer >= self.num_layers:
            return torch.ones(batch.observations.shape[0], dtype=torch.bool, device=batch.observations.device)
        index, obs = batch.layer - 1, batch.observations
        now = self.gain(obs, index) - self.cost_weight * batch.layer / self.num_layers
        return now >= self.continuation(obs, index, self.cost_weight)

    def config(self) -> dict:
        return {**self._config, "cost_weight": self.cost_weight}


@dataclass
class StoppingConfig:
    cost_weight: float = 0.1  # the knob λ: what one layer (as a fraction of L) costs in units of the gain
    gain: str = "correct"  # what exiting is worth: correct (labels) | consistency (agrees with the last layer)
    gain_model: str = "learned"  # G: learned (a classifier per layer) | max_prob (the head's own confidence)
    features: str = "history"  # state | confidence | observation | history | full (exitrl.core.observation)
    hidden: int = 64
    folds: int = 2  # parts of the learn split; each row's G and C in the induction come from nets that never saw it
    train_costs: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8])  # λ for C
    steps: int = 300  # full-batch Adam steps per network
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)
        if self.gain not in GAINS:
            raise ValueError(f"Unknown agent.gain {self.gain!r}; valid: {', '.join(GAINS)}.")
        if self.gain_model not in GAIN_MODELS:
            raise ValueError(f"Unknown agent.gain_model {self.gain_model!r}; valid: {', '.join(GAIN_MODELS)}.")
        if not self.cost_weight >= 0:
            raise ValueError(f"agent.cost_weight must be >= 0, got {self.cost_weight}.")
        if int(self.folds) < 1:
            raise ValueError(f"agent.folds must be >= 1, got {self.folds}.")
        if int(self.steps) < 1:
            raise ValueError(f"agent.steps must be >= 1, got {self.steps}.")
        self.train_costs = sorted({float(c) for c in self.train_costs} | {float(self.cost_weight)})
        if any(not c >= 0 for c in self.train_costs):
            raise ValueError(f"agent.train_costs must be values >= 0, got {self.train_costs}.")


def fit_value(net: ContinuationNet, layer: int, x: torch.Tensor, future_gain: torch.Tensor,
              future_depth: torch.Tensor, cfg: StoppingConfig) -> None:
    """Full-batch Adam on layer ``layer``'s continuation network: ``x [M, F + 1]`` (λ last) against the realised
    gain at the row's eventual exit and that exit's depth (fraction of L), both by cross-entropy."""
    with torch.no_grad():  # this layer's standardisation, from its own training features
        net.mean[layer], net.std[layer] = x.mean(0), x.std(0).clamp_min(STD_FLOOR)
    target = torch.stack([future_gain, future_depth], -1)
    optimizer = torch.optim.Adam(net.mlps[layer].parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(int(cfg.steps)):
        loss = nn.functional.binary_cross_entropy_with_logits(net.parts(x, layer), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fit_stopping(cfg: StoppingConfig, inputs: FitInputs) -> tuple[StoppingPolicy, dict]:
    """Fit G by classification and C by backward induction (see the module docstring), cross-fitted."""
    torch.manual_seed(cfg.seed)
    started = time.time()
    learn = inputs.learn.to(inputs.device)
    n, num_layers, device = len(learn), learn.num_layers, inputs.device
    folds = int(cfg.folds)
    if n < 2 * folds:
        raise ValueError(f"stopping needs at least {2 * folds} rows to learn on, the split has {n}.")
    policy = StoppingPolicy(num_layers, learn.hidden_size, learn.num_classes, cfg.features, cfg.hidden, folds,
                            cfg.gain_model, cfg.cost_weight).to(device)
    table = learn.observations()  # [N, L, D]
    x = policy.layout.select(table, cfg.features)
    gains = exit_gains(learn.prediction_table(), learn.labels, cfg.gain).float().to(device)  # [N, L]
    part = (torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)) % folds).to(device)
    seen = [part != k if folds > 1 else torch.ones(n, dtype=torch.bool, device=device) for k in range(folds)]
    bar = progress(total=folds * num_layers, desc="stopping", unit="fit")
    # G, out of part: P(exiting at l gains | layer l's observation)
    gain_hat = torch.zeros(n, num_layers, device=device)
    for k, nets in enumerate(policy.module):
        if cfg.gain_model == "learned":
            train_net(nets.gain, x[seen[k]], gains[seen[k]], cfg)
        with torch.no_grad():
            held = part == k
            gain_hat[held] = torch.stack([policy.gain(table[held, layer], layer, [nets])
                                          for layer in range(num_layers)], 1)
        bar.update(1)
    # C, by backward induction, for every λ at once: for each λ and row, the gain at the exit that acting well
    # from layer l + 1 on reaches, and that exit's layer ([Λ, N] each)
    lams = torch.tensor(cfg.train_costs, device=device)
    cost = lams[:, None] * torch.arange(1, num_layers + 1, device=device)[None, :] / num_layers  # [Λ, L]
    future_gain = gains[None, :, -1].expand(len(lams), -1).clone()
    future_exit = torch.full((len(lams), n), float(num_layers), device=device)
    stop_share = {}
    for layer in range(num_layers - 2, -1, -1):
        inputs_l = torch.cat([x[:, layer][None].expand(len(lams), -1, -1),
                              lams[:, None, None].expand(-1, n, 1)], -1)  # [Λ, N, F + 1]
        cont = torch.zeros(len(lams), n, device=device)
        for k, nets in enumerate(policy.module):
            fit_value(nets.value, layer, inputs_l[:, seen[k]].reshape(-1, inputs_l.shape[-1]),
                      future_gain[:, seen[k]].reshape(-1), future_exit[:, seen[k]].reshape(-1) / num_layers, cfg)
            with torch.no_grad():
                held = part == k
                cont[:, held] = nets.value(inputs_l[:, held].reshape(-1, inputs_l.shape[-1]),
                                           layer).view(len(lams), -1)
            bar.update(1)
        stop = gain_hat[None, :, layer] - cost[:, layer:layer + 1] >= cont
        future_gain = torch.where(stop, gains[None, :, layer], future_gain)
        future_exit = torch.where(stop, float(layer + 1), future_exit)
        stop_share[layer + 1] = {f"{lam:g}": round(float(s), 4) for lam, s in zip(cfg.train_costs,
                                                                                  stop.float().mean(1))}
    value = future_gain - lams[:, None] * future_exit / num_layers
    bar.close()
    chosen = cfg.train_costs.index(float(cfg.cost_weight))
    info = {"gain": cfg.gain, "gain_model": cfg.gain_model, "fitted_on": inputs.learn_on, "folds": folds,
            "train_costs": cfg.train_costs, "stop_share_by_layer": stop_share,
            "induction_value": round(float(value[chosen].mean()), 6), "train_seconds": round(time.time() - started, 2)}
    return policy, info


AGENT = register(AgentSpec(
    "stopping", StoppingConfig, LEARNED, Knob("agent.cost_weight", COST_WEIGHT_GRID), fit_stopping,
    "optimal stopping: exit when the fitted gain of exiting now beats the fitted value of going on (backward "
    "induction, cost-conditioned, cross-fitted)"))
