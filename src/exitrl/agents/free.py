"""FREE (Bae et al., EMNLP 2023) for classifiers: one shallow exit at layer L_s, else the full model, with the
adaptive Beta-mixture threshold.

Read top to bottom: the policy (exit at L_s when the shallow max-prob passes the threshold; rows that go on never
exit before the last layer), its online refit, then fitting on a trace.

The threshold comes from (shallow confidence, 1[shallow prediction = deep prediction]) pairs
(`exitrl.calibration.beta_mixture`). It is first fitted on a trace split; then, as inference runs, every row that
went deep adds its pair (the deep prediction is known for it: no label is needed) and the threshold is refitted
every ``refit_every`` new pairs over the newest ``max_pairs``. As in FREE, only rows that went deep feed the refit.

Confidence is max-prob rescaled to [0, 1]: (p − 1/C) / (1 − 1/C). FREE's grid linspace(0.3, 0.9) was made for
token softmaxes over a vocabulary, where max-prob spans [0, 1] and the rescaling changes nothing; a C-class head's
max-prob never falls below 1/C, so on the raw value a binary task's grid points under 0.5 would all count as
"agrees" and the fitted threshold would sit at 0.3, exiting every row (the README has the measurement). For two
classes the rescaled value is the margin p(1st) − p(2nd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import RULE, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.backbones.recipes.free import default_shallow_layer
from exitrl.calibration.beta_mixture import beta_mixture_threshold
from exitrl.calibration.temperature import TemperatureScaledPolicy, fit_temperatures
from exitrl.core.observation import confidence_measure
from exitrl.policy import ExitPolicy, LayerBatch, Memory


def rescaled_confidence(max_prob: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Max-prob mapped from [1/C, 1] to [0, 1] (``num_classes`` None: a vocabulary, where 1/C is ~0)."""
    floor = 0.0 if num_classes is None else 1.0 / num_classes
    return ((max_prob - floor) / (1.0 - floor)).clamp(0.0, 1.0)


def class_count(logits: torch.Tensor, token) -> int | None:
    return None if token is not None else logits.shape[-1]


class FreePolicy(ExitPolicy):
    """Shallow–deep exit with an adaptive threshold; the pairs it has seen are part of its saved state."""

    name = "free"

    def __init__(self, shallow_layer: int = 2, threshold: float = 0.9, zeta: float = 0.4, adaptive: bool = True,
                 refit_every: int = 256, max_pairs: int = 20000):
        if int(shallow_layer) < 1:
            raise ValueError(f"FREE's shallow layer must be >= 1 (1-indexed), got {shallow_layer}.")
        self.shallow_layer = int(shallow_layer)
        self.threshold = float(threshold)
        self.zeta, self.adaptive = float(zeta), bool(adaptive)
        self.refit_every, self.max_pairs = int(refit_every), int(max_pairs)
        self.confidence = torch.empty(0)
        self.agrees = torch.empty(0, dtype=torch.bool)
        self.pending = 0  # pairs added since the last refit
        self.refits = 0
        self.first_exit_layer = self.shallow_layer

    @property
    def graph_safe(self) -> bool:
        return not self.adaptive  # an adaptive threshold changes between calls: it cannot be baked into a graph

    @property
    def observes_final(self) -> bool:
        return self.adaptive

    # -- inference -------------------------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device: torch.device) -> Memory:
        return {"confidence": torch.zeros(batch_size, device=device),
                "prediction": torch.full((batch_size,), -1, dtype=torch.long, device=device)}

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        rows = batch.logits.shape[0]
        if batch.layer != self.shallow_layer:
            return torch.zeros(rows, dtype=torch.bool, device=batch.logits.device)
        confidence = rescaled_confidence(batch.confidence("maxprob"), class_count(batch.logits, batch.token))
        prediction = batch.prediction
        memory["confidence"], memory["prediction"] = confidence, prediction
        return confidence >= self.threshold

    def observe_final(self, batch: LayerBatch, memory: Memory) -> None:
        """Rows that went deep: their shallow confidence and whether the shallow exit would have agreed."""
        if not self.adaptive or batch.layer <= self.shallow_layer:
            return
        went_deep = memory["prediction"] >= 0
        deep = batch.prediction
        self.add_pairs(memory["confidence"][went_deep], memory["prediction"][went_deep] == deep[went_deep])

    # -- the adaptive threshold ------------------------------------------------------------------------------
    def add_pairs(self, confidence: torch.Tensor, agrees: torch.Tensor) -> None:
        self.confidence = torch.cat([self.confidence, confidence.detach().float().cpu()])[-self.max_pairs:]
        self.agrees = torch.cat([self.agrees, agrees.detach().bool().cpu()])[-self.max_pairs:]
        self.pending += int(confidence.numel())
        if self.pending >= self.refit_every:
            self.refit()

    def refit(self) -> float:
        if self.agrees.numel():
            self.threshold = beta_mixture_threshold(self.confidence, self.agrees, self.zeta)
            self.refits += 1
        self.pending = 0
        return self.threshold

    # -- persistence -----------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"shallow_layer": self.shallow_layer, "threshold": self.threshold, "zeta": self.zeta,
                "adaptive": self.adaptive, "refit_every": self.refit_every, "max_pairs": self.max_pairs}

    def state_dict(self) -> dict:
        return {"confidence": self.confidence, "agrees": self.agrees, "pending": torch.tensor(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.confidence, self.agrees = state["confidence"].float(), state["agrees"].bool()
        self.pending = int(state["pending"])


# -- fitting ------------------------------------------------------------------------------------------------
@dataclass
class FreeConfig:
    shallow_layer: int | None = None  # None: a quarter of the depth (default_shallow_layer)
    zeta: float = 0.4  # posterior of "agrees" a grid point needs
    adaptive: bool = True  # False: keep ``threshold`` fixed
    threshold: float | None = None  # fixed threshold on the rescaled confidence (adaptive=False), or the start
    refit_every: int = 256
    max_pairs: int = 20000
    temperature: bool = False  # per-exit temperature scaling (fitted on the held-out split)
    seed: int = 0

    def __post_init__(self):
        if self.shallow_layer is not None and int(self.shallow_layer) < 1:
            raise ValueError(f"FREE's shallow_layer must be >= 1 (1-indexed), got {self.shallow_layer}.")
        if not 0.0 < self.zeta < 1.0:
            raise ValueError(f"FREE's zeta must lie in (0, 1), got {self.zeta}.")
        if int(self.refit_every) < 1 or int(self.max_pairs) < 1:
            raise ValueError("FREE's refit_every and max_pairs must be >= 1.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"FREE's threshold (rescaled confidence) must lie in [0, 1], got {self.threshold}.")


def fit_free(cfg: FreeConfig, inputs: FitInputs) -> tuple[ExitPolicy, dict]:
    """The starting threshold from every row of the learning split (shallow confidence, agreement with the last
    layer)."""
    split = inputs.learn
    num_layers = split.num_layers
    shallow = default_shallow_layer(num_layers) if cfg.shallow_layer is None else int(cfg.shallow_layer)
    if not 1 <= shallow < num_layers:
        raise ValueError(f"FREE's shallow layer must lie in 1..{num_layers - 1} for a {num_layers}-layer model, "
                         f"got {shallow}.")
    if not cfg.adaptive and cfg.threshold is None:
        raise ValueError("agent=free with adaptive=false needs a threshold (e.g. agent.threshold=0.9).")
    policy = FreePolicy(shallow, cfg.threshold if cfg.threshold is not None else 0.9, cfg.zeta, cfg.adaptive,
                        cfg.refit_every, cfg.max_pairs)
    temperatures = None
    if cfg.temperature:
        held_out = inputs.require_held_out("agent.temperature=true")
        temperatures = fit_temperatures(held_out.logits, held_out.labels, token=held_out.token)
    info = {"shallow_layer": shallow}
    if cfg.adaptive:
        shallow_logits = split.logits[:, shallow - 1].float().cpu()
        if temperatures is not None:
            shallow_logits = shallow_logits / temperatures[shallow - 1]
        token = None if split.token is None else split.token.select((slice(None), shallow - 1)).to("cpu")
        confidence = rescaled_confidence(confidence_measure(shallow_logits, "maxprob", token),
                                         class_count(shallow_logits, token))
        predictions = split.prediction_table().cpu()
        agrees = predictions[:, shallow - 1] == predictions[:, -1]
        policy.add_pairs(confidence, agrees)
        policy.refit()
        info.update({"fitted_threshold": policy.threshold, "fit_pairs": int(agrees.numel()),
                     "fit_agree_fraction": float(agrees.float().mean())})
    if temperatures is not None:
        info["temperatures"] = temperatures.tolist()
        return TemperatureScaledPolicy(policy, temperatures), info
    return policy, info


AGENT = register(AgentSpec(
    "free", FreeConfig, RULE, Knob("agent.shallow_layer"), fit_free,  # zeta barely moves the 10-point grid
    "FREE: one shallow exit at L_s (L/4), else the full model; Beta-mixture threshold refitted online",
    needs_held_out=lambda cfg: cfg.temperature))
