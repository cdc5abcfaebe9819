"""A learned exit score with per-layer thresholds, after CATs (Schuster et al., EMNLP 2021) and EENet (Ilhan et al.,
WACV 2024): a per-layer network predicts from the observation (history included by default) whether this layer's
prediction is already final, and the policy exits where that score passes a threshold fitted for the cost weight.

Read top to bottom: the deployable policy, then fitting.

Why it cannot lose to the per-layer confidence rule on the rows it is fitted on: the score is a blend
(1 − β)·logit(max-prob) + β·g(observation), and β is chosen among ``agent.blends`` (0 included) together with the
per-layer thresholds (`exitrl.calibration.per_layer`), by the same objective the rule maximises. β = 0 *is* the
per-layer max-prob rule, so the learned family contains it and departs from it only where g helps.

Why the scores it fits thresholds on are honest: the learn split is cut into ``agent.folds`` parts; the network of
part k is trained on the other parts and scores part k, so β and the thresholds are chosen on scores of rows no
network saw (like cross-fitting the backbone, one level up). The deployed score averages the parts' networks.
The target (``agent.target``) is "agrees with the last layer" (``consistency``, denser than correctness and free
of labels) or ``correct``; the thresholds always maximise the task's own gain (``agent.gain``).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from exitrl.agents.declaration import LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.reinforce import PerLayerExitNet
from exitrl.agents.standardize import fit_standardizer
from exitrl.calibration.per_layer import COST_WEIGHT_GRID, GAINS, exit_gains, fit_per_layer_thresholds
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy


def max_prob_logit(observations: torch.Tensor, layout: ObservationLayout) -> torch.Tensor:
    """logit(max-prob): the confidence rule's score on the scale of a learned logit."""
    p = observations[..., layout.max_prob].clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


class ExitScorerPolicy(ModuleExitPolicy):
    """Exit at the first layer l where (1 − blend)·logit(max-prob) + blend·g_l(x) >= thresholds[l − 1]."""

    name = "exit_scorer"
    graph_safe = True

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, features: str = "history",
                 hidden: int = 64, folds: int = 2, blend: float = 1.0, thresholds: list[float] | None = None):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = check_features(features)
        self.uses_history = view_reads_history(features)
        self.blend = float(blend)
        self.thresholds = [float("inf")] * num_layers if thresholds is None else [float(t) for t in thresholds]
        self._config = {"num_layers": num_layers, "hidden_size": hidden_size, "num_classes": num_classes,
                        "features": features, "hidden": hidden, "folds": folds}
        self.module = nn.ModuleList(PerLayerExitNet(num_layers, self.layout.feature_size(features), hidden)
                                    for _ in range(folds))

    def learned_score(self, observations: torch.Tensor, layer: int, nets=None) -> torch.Tensor:
        """g at 0-based ``layer``: the mean logit of ``nets`` (all parts' networks by default)."""
        x = self.layout.select(observations, self.features)
        nets = self.module if nets is None else nets
        return torch.stack([net(x, layer) for net in nets]).mean(0)

    def score(self, observations: torch.Tensor, layer: int) -> torch.Tensor:
        rule = max_prob_logit(observations, self.layout)
        if self.blend == 0:
            return rule
        return (1 - self.blend) * rule + self.blend * self.learned_score(observations, layer)

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return self.score(batch.observations, batch.layer - 1) >= self.thresholds[batch.layer - 1]

    def config(self) -> dict:
        return {**self._config, "blend": self.blend, "thresholds": self.thresholds}


@dataclass
class ExitScorerConfig:
    cost_weight: float = 0.1  # the knob: what one layer (as a fraction of L) costs in units of the gain
    features: str = "history"  # state | confidence | observation | history | full (exitrl.core.observation)
    target: str = "consistency"  # what g predicts: consistency (agrees with the last layer) | correct
    gain: str = "correct"  # what the thresholds maximise: correct | consistency
    hidden: int = 64
    folds: int = 2  # parts of the learn split; each part is scored by a network that never saw it
    blends: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # candidate β; 0: the rule
    steps: int = 400  # full-batch Adam steps per network
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)
        for key, value in (("target", self.target), ("gain", self.gain)):
            if value not in GAINS:
                raise ValueError(f"Unknown agent.{key} {value!r}; valid: {', '.join(GAINS)}.")
        if self.cost_weight < 0:
            raise ValueError(f"agent.cost_weight must be >= 0, got {self.cost_weight}.")
        if int(self.folds) < 1:
            raise ValueError(f"agent.folds must be >= 1, got {self.folds}.")
        self.blends = [float(b) for b in self.blends]
        if not self.blends or any(not 0 <= b <= 1 for b in self.blends):
            raise ValueError(f"agent.blends must be a non-empty list of values in [0, 1], got {list(self.blends)}.")


def train_net(net: PerLayerExitNet, x: torch.Tensor, target: torch.Tensor, cfg: ExitScorerConfig,
              resumed: dict | None = None, save: Callable[[int, dict], None] | None = None, bar=None) -> None:
    """Full-batch BCE on layers 1..L−1 (the last layer always exits). ``resumed`` (``step``, ``optimizer``)
    continues a checkpointed fit whose weights are already in ``net``; ``save(step, optimizer_state)`` is offered
    the state after every step; ``bar`` (`exitrl.core.progress`) counts the steps."""
    fit_standardizer(net, x)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(resumed["step"] if resumed else 0, cfg.steps):
        loss = sum(loss_fn(net(x[:, layer], layer), target[:, layer]) for layer in range(x.shape[1] - 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
        if save is not None and step + 1 < cfg.steps:
            save(step + 1, optimizer.state_dict())


@dataclass
class TrainedScorer:
    """A scorer trained once, with what choosing its thresholds needs: the out-of-part learned scores, the rule's
    score and the gains, all ``[N, L]`` on the learn split. One trained scorer gives a whole curve:
    `with_cost_weight` for each point."""

    policy: ExitScorerPolicy
    learned: torch.Tensor
    rule: torch.Tensor
    gains: torch.Tensor
    blends: list[float]
    learn_on: str
    seconds: float
    checkpoints: dict | None = None  # the summary of its checkpoints, when it kept them

    def with_cost_weight(self, cost_weight: float) -> tuple[ExitScorerPolicy, dict]:
        """A copy of the policy with β and per-layer thresholds chosen for ``cost_weight``."""
        fits = {}
        for blend in sorted(set(self.blends)):  # ascending: on a tie the simpler score (nearer the rule) stays
            score = self.rule if blend == 0 else (1 - blend) * self.rule + blend * self.learned
            fits[blend] = fit_per_layer_thresholds(score, self.gains, cost_weight)
        blend = max(fits, key=lambda b: (fits[b][1], -b))
        policy = copy.copy(self.policy)  # the networks are shared; β and the thresholds are the copy's own
        policy.blend, policy.thresholds = blend, fits[blend][0].tolist()
        info = {"blend": blend, "objective_by_blend": {str(b): round(v[1], 6) for b, v in fits.items()},
                "thresholds": [None if t == float("inf") else t for t in policy.thresholds],
                "fitted_on": self.learn_on, "train_seconds": round(self.seconds, 2)}
        if self.checkpoints is not None:
            info["checkpoints"] = self.checkpoints
        return policy, info


def train_exit_scorer(cfg: ExitScorerConfig, inputs: FitInputs) -> TrainedScorer:
    """Train the parts' networks and score every row of the learn split with the network that never saw it."""
    torch.manual_seed(cfg.seed)
    started = time.time()
    learn = inputs.learn.to(inputs.device)
    n, num_layers = len(learn), learn.num_layers
    if n < 2 * cfg.folds:
        raise ValueError(f"exit_scorer needs at least {2 * cfg.folds} rows to learn on, the split has {n}.")
    policy = ExitScorerPolicy(num_layers, learn.hidden_size, learn.num_classes, cfg.features, cfg.hidden,
                              cfg.folds).to(inputs.device)
    table = learn.observations()  # [N, L, D]
    x = policy.layout.select(table, cfg.features)
    target = exit_gains(learn.prediction_table(), learn.labels, cfg.target).float()
    generator = torch.Generator().manual_seed(cfg.seed)
    part = (torch.randperm(n, generator=generator) % cfg.folds).to(inputs.device)
    learned = torch.zeros(n, num_layers, device=inputs.device)
    # A checkpoint found (a killed run's): the parts' networks, the scores of the finished parts, and the fold in
    # progress with its step and optimiser.
    checkpoints, resumed = inputs.checkpoints, None
    if checkpoints is not None and (resumed := checkpoints.load()) is not None:
        policy.module.load_state_dict(resumed["nets"])
        learned = resumed["learned"].to(inputs.device)

    def save(fold: int, step: int, optimizer: dict) -> None:
        if checkpoints.due():
            checkpoints.save({"fold": fold, "step": step, "optimizer": optimizer, "learned": learned,
                              "nets": policy.module.state_dict()})

    done = resumed["fold"] * cfg.steps + resumed["step"] if resumed is not None else 0
    bar = progress(total=cfg.folds * cfg.steps, desc="exit_scorer", unit="step", initial=done)
    for k, net in enumerate(policy.module):
        if resumed is not None and k < resumed["fold"]:
            continue  # finished before the kill: its scores are in ``learned``
        seen = part != k if cfg.folds > 1 else torch.ones_like(part, dtype=torch.bool)
        train_net(net, x[seen], target[seen], cfg, resumed if resumed is not None and k == resumed["fold"] else None,
                  None if checkpoints is None else functools.partial(save, k), bar)
        with torch.no_grad():
            held = part == k
            learned[held] = torch.stack([net(x[held, layer], layer) for layer in range(num_layers)], 1)
    bar.close()
    gains = exit_gains(learn.prediction_table(), learn.labels, cfg.gain)
    return TrainedScorer(policy, learned, max_prob_logit(table, policy.layout), gains, list(cfg.blends),
                         inputs.learn_on, time.time() - started,
                         checkpoints.summary() if checkpoints is not None else None)


def fit_exit_scorer(cfg: ExitScorerConfig, inputs: FitInputs) -> tuple[ExitScorerPolicy, dict]:
    return train_exit_scorer(cfg, inputs).with_cost_weight(cfg.cost_weight)


AGENT = register(AgentSpec(
    "exit_scorer", ExitScorerConfig, LEARNED, Knob("agent.cost_weight", COST_WEIGHT_GRID), fit_exit_scorer,
    "a learned per-layer exit score (blended with max-prob, history-aware), per-layer thresholds for a cost weight"))
