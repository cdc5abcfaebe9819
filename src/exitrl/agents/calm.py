"""CALM (Schuster et al., NeurIPS 2022) for classifiers: exit when a confidence measure passes a threshold that
Learn-then-Test certifies on held-out data, so that the early-exit model disagrees with the full model on at most a
fraction δ of inputs with probability at least 1 − ε.

Read top to bottom: the three measures, the meta classifier, the deployable policy, then fitting (meta classifier on
the training trace, optional per-exit temperatures and the LTT walk on the held-out split).

Measures, higher = surer:
* ``margin``: softmax response, top-1 minus top-2 probability of the exit head;
* ``saturation``: cos(h_{l−1}, h_l) of consecutive pooled states (no previous state at layer 1: never exits there);
* ``meta``: a small classifier trained with the backbone frozen to predict "this layer's prediction equals the last
  layer's", class-balanced (the agreeing class dominates).
Risks (0/1 per example, so the Hoeffding–Bentkus bound applies): ``consistency`` = disagreement with the full model
(CALM's textual consistency), ``loss`` = wrong where the full model was right (risk consistency with 0/1 loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.standardize import fit_standardizer
from exitrl.calibration.ltt import learn_then_test
from exitrl.calibration.temperature import TemperatureScaledPolicy, fit_temperatures
from exitrl.core.observation import TokenExit, confidence_measure
from exitrl.core.progress import progress
from exitrl.policy import ExitPolicy, LayerBatch, Memory
from exitrl.traces.trace import SplitTrace

MEASURES = ("margin", "saturation", "meta")
RISKS = ("consistency", "loss")


def candidate_thresholds(measure: str) -> torch.Tensor:
    """Fixed grids from strict to loose (fixed before seeing data, as LTT's fixed-sequence test requires).
    Saturation lives near 1, so its grid is dense there."""
    if measure == "saturation":
        return 1.0 - torch.logspace(-6, 0.30103, 241)  # 1 - 1e-6 .. -1
    return torch.linspace(1.0, 0.0, 201)


class MetaClassifier(nn.Module):
    """P(layer agrees with the last layer) from the standardised pooled state and the layer position."""

    def __init__(self, hidden_size: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        self.net = nn.Sequential(nn.Linear(hidden_size + 1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        x = (states.float() - self.mean) / self.std
        return self.net(torch.cat([x, position.float().unsqueeze(-1)], -1)).squeeze(-1)




class CalmPolicy(ExitPolicy):
    """Exit where the measure is >= ``threshold``; ``threshold=None`` (nothing certified) never exits early."""

    name = "calm"

    @property
    def graph_safe(self) -> bool:
        return self.measure != "saturation"  # its memory changes shape after the first layer

    def __init__(self, measure: str = "margin", threshold: float | None = None, hidden_size: int | None = None,
                 meta_hidden: int = 64):
        if measure not in MEASURES:
            raise ValueError(f"Unknown CALM measure {measure!r}; valid: {', '.join(MEASURES)}.")
        if measure == "meta" and hidden_size is None:
            raise ValueError("the meta measure needs hidden_size (the pooled state's width).")
        self.measure = measure
        self.threshold = None if threshold is None else float(threshold)
        self.hidden_size, self.meta_hidden = hidden_size, meta_hidden
        self.meta = MetaClassifier(hidden_size, meta_hidden) if measure == "meta" else None

    def score(self, states: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor | None, layer: int,
              num_layers: int, token: TokenExit | None = None) -> torch.Tensor:
        """The measure for rows at 1-indexed ``layer``; the same function builds the calibration table."""
        if self.measure == "margin":
            return confidence_measure(logits, "margin", token)
        if self.measure == "saturation":
            if previous is None:
                return torch.full(states.shape[:1], -float("inf"), device=states.device)
            return F.cosine_similarity(previous.float(), states.float(), dim=-1)
        position = torch.full(states.shape[:1], layer / num_layers, device=states.device)
        return torch.sigmoid(self.meta(states, position))

    def init_memory(self, batch_size: int, device: torch.device) -> Memory:
        return {"previous": torch.empty(batch_size, 0, device=device)} if self.measure == "saturation" else {}

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        previous = None
        if self.measure == "saturation":
            previous = memory["previous"] if memory["previous"].shape[1] else None
            memory["previous"] = batch.states
        value = self.score(batch.states, batch.logits, previous, batch.layer, batch.num_layers, batch.token)
        if self.threshold is None:
            return torch.zeros_like(value, dtype=torch.bool)
        return value >= self.threshold

    def to(self, device: torch.device) -> CalmPolicy:
        if self.meta is not None:
            self.meta.to(device)
        return self

    def config(self) -> dict:
        return {"measure": self.measure, "threshold": self.threshold, "hidden_size": self.hidden_size,
                "meta_hidden": self.meta_hidden}

    def state_dict(self) -> dict:
        return self.meta.state_dict() if self.meta is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.meta is not None:
            self.meta.load_state_dict(state)


@torch.no_grad()
def score_table(policy: CalmPolicy, trace: SplitTrace, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """The measure at every (example, layer): ``[N, L]``."""
    columns, previous = [], None
    for layer in range(trace.num_layers):
        logits = trace.logits[:, layer].float()
        if temperatures is not None:
            logits = logits / temperatures[layer]
        states = trace.states[:, layer].float()
        token = None if trace.token is None else trace.token.select((slice(None), layer))
        columns.append(policy.score(states, logits, previous, layer + 1, trace.num_layers, token))
        previous = states
    return torch.stack(columns, 1)


def exit_layers_for(scores: torch.Tensor, thresholds: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """0-based exit layer of every example under every threshold: the first layer < L whose score passes, else
    L − 1. ``scores [N, L]``, ``thresholds [K]`` -> ``[K, N]``."""
    early = scores[:, :-1]
    last = scores.shape[1] - 1
    out = []
    for start in range(0, thresholds.numel(), chunk):
        passes = early.unsqueeze(0) >= thresholds[start:start + chunk, None, None].to(early)  # [k, N, L-1]
        first = passes.int().argmax(-1)
        out.append(torch.where(passes.any(-1), first, torch.full_like(first, last)))
    return torch.cat(out)


def risks_for(exit_layers: torch.Tensor, trace: SplitTrace, risk: str) -> torch.Tensor:
    """Mean 0/1 risk of each row of ``exit_layers [K, N]`` against the full model."""
    preds = trace.prediction_table()  # [N, L]
    at_exit = preds.gather(1, exit_layers.t()).t()  # [K, N]
    full = preds[:, -1]
    if risk == "consistency":
        bad = at_exit != full
    else:
        bad = (at_exit != trace.labels) & (full == trace.labels)
    return bad.float().mean(1)


# -- fitting --------------------------------------------------------------------------------------------------
@dataclass
class CalmConfig:
    measure: str = "margin"
    delta: float = 0.1  # tolerated risk
    epsilon: float = 0.05  # the certificate holds with probability >= 1 - epsilon
    risk: str = "consistency"  # consistency | loss
    threshold: float | None = None  # set: use this threshold, skip calibration
    temperature: bool = False  # per-exit temperature scaling of the logits (fitted on half the held-out split)
    meta_hidden: int = 64
    meta_epochs: int = 5
    meta_lr: float = 1e-3
    meta_batch_size: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"Unknown CALM measure {self.measure!r}; valid: {', '.join(MEASURES)}.")
        if self.risk not in RISKS:
            raise ValueError(f"Unknown CALM risk {self.risk!r}; valid: {', '.join(RISKS)}.")
        if not 0 < self.delta < 1 or not 0 < self.epsilon < 1:
            raise ValueError(f"CALM needs 0 < delta < 1 and 0 < epsilon < 1, got {self.delta}, {self.epsilon}.")


def train_meta_classifier(meta: MetaClassifier, trace: SplitTrace, cfg: CalmConfig, device) -> dict:
    """Class-balanced BCE on (state, layer) -> 1[prediction equals the last layer's], layers 1..L−1."""
    meta.to(device)
    num_layers = trace.num_layers
    states = trace.states[:, :-1].reshape(-1, trace.hidden_size)
    preds = trace.prediction_table()
    agrees = (preds[:, :-1] == preds[:, -1:]).reshape(-1).float()
    position = (torch.arange(1, num_layers, device=states.device).repeat(len(trace)) / num_layers).float()
    fit_standardizer(meta, states)
    positives = float(agrees.sum())
    pos_weight = torch.tensor((agrees.numel() - positives) / max(positives, 1.0), device=device)
    optimizer = torch.optim.Adam(meta.parameters(), lr=cfg.meta_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(0.0)
    batches = -(-agrees.numel() // cfg.meta_batch_size)
    bar = progress(total=cfg.meta_epochs * batches, desc="calm meta classifier", unit="batch")
    for _ in range(cfg.meta_epochs):
        for index in torch.randperm(agrees.numel(), generator=generator).split(cfg.meta_batch_size):
            index = index.to(states.device)
            logit = meta(states[index].to(device), position[index].to(device))
            loss = F.binary_cross_entropy_with_logits(logit, agrees[index].to(device), pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
    bar.close()
    meta.eval()
    return {"meta_agree_fraction": positives / agrees.numel(), "meta_final_loss": float(loss.detach())}


def fit_calm(cfg: CalmConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    """The meta classifier (if any) on the backbone's train split; temperatures and the LTT threshold on the
    held-out split."""
    train, held_out, device = inputs.train, inputs.held_out, inputs.device
    policy = CalmPolicy(cfg.measure, cfg.threshold, train.hidden_size, cfg.meta_hidden)
    info: dict = {"measure": cfg.measure}
    if policy.meta is not None:
        info.update(train_meta_classifier(policy.meta, train, cfg, device))
        policy.to(torch.device("cpu"))
    temperatures = None
    calibration = held_out
    if cfg.temperature or cfg.threshold is None:
        held_out = inputs.require_held_out("agent=calm", ", or give agent.threshold to skip calibration").to("cpu")
        calibration = held_out
    if cfg.temperature:
        order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(cfg.seed))
        half = len(held_out) // 2
        fit_rows, calibration_rows = order[:half], order[half:]
        temperatures = fit_temperatures(held_out.logits[fit_rows], held_out.labels[fit_rows], token=held_out.token)
        if cfg.threshold is None:
            calibration = held_out.select(calibration_rows)
        info["temperatures"] = temperatures.tolist()
    if cfg.threshold is None:
        thresholds = candidate_thresholds(cfg.measure)
        scores = score_table(policy, calibration, temperatures)
        risks = risks_for(exit_layers_for(scores, thresholds), calibration, cfg.risk)
        walk = learn_then_test(risks, len(calibration), cfg.delta, cfg.epsilon)
        policy.threshold = float(thresholds[walk.index]) if walk.certified else None
        info.update({"delta": cfg.delta, "epsilon": cfg.epsilon, "risk": cfg.risk, "certified": walk.certified,
                     "threshold": policy.threshold, "calibration_examples": len(calibration),
                     "calibration_risk": walk.risks[walk.index] if walk.certified else None,
                     "thresholds_tested": len(walk.pvalues)})
    else:
        info["threshold"] = cfg.threshold
    wrapped = policy if temperatures is None else TemperatureScaledPolicy(policy, temperatures)
    return wrapped, info


AGENT = register(AgentSpec(
    "calm", CalmConfig, RULE, Knob("agent.delta", (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)), fit_calm,
    "CALM: a confidence measure (margin, saturation, meta classifier) above the loosest threshold Learn-then-Test "
    "certifies on the held-out split", needs_held_out=lambda cfg: cfg.threshold is None or cfg.temperature))
