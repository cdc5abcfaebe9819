"""LayerSkip (Elhoushi et al., ACL 2024), for encoder classifiers and causal LMs.

Two parts make early layers good exits without separate heads:

- per-sample layer dropout, rising with depth: p_l = p_max * (2^(l/(L-1)) - 1) for 0-based layer l (0 for the
  first layer, p_max for the last), so the model learns not to rely on its last layers;
- an early-exit loss through ONE head shared by all layers, with per-layer scales
  e(l) = e_scale * sum_{i=0..l} i for l < L-1 and e(L-1) = (L-1) + e_scale * sum_{i=0..L-2} i, switched on per
  step by a curriculum C(t, l) and normalised: w(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i).

Curricula (t = optimiser step from 0, T = steps of training): ``rotational`` enables layer l when
(l - t) mod R == 0, the last layer always; ``gradual`` enables layer l once t >= T (L-1-l) / L, so the exits come
on from the top down and the last layer is on from the start. Layer dropout acts only in training; traces and
inference run every layer. (Note e(0) = 0: the first layer's exit gets no loss of its own; it reads the shared
head that the deeper layers train.) For a causal LM the loss is next-token CE at the enabled exits, through the
model's own final norm and LM head (its shared exit); a disabled exit is not computed at all. Self-speculative
decoding with the result is part of `exitrl`'s decoding, not of training.
"""

from __future__ import annotations

import torch

from exitrl.backbones.losses import layer_ce, next_token_ce
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Recipe

CURRICULA = ("rotational", "gradual")


def layer_drop_rates(num_layers: int, p_max: float) -> list[float]:
    """p_l = p_max * (2^(l/(L-1)) - 1) for l = 0..L-1; a single layer is never dropped."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (2 ** (layer / (num_layers - 1)) - 1) for layer in range(num_layers)]


def early_exit_scales(num_layers: int, e_scale: float) -> list[float]:
    """The paper's per-layer scales e(l): e_scale * sum_{i<=l} i, and (L-1) + e_scale * sum_{i<=L-2} i at the top."""
    if num_layers == 1:
        return [1.0]
    scales = [e_scale * layer * (layer + 1) / 2 for layer in range(num_layers - 1)]
    return scales + [(num_layers - 1) + e_scale * (num_layers - 2) * (num_layers - 1) / 2]


def rotational_curriculum(step: int, num_layers: int, rotation: int) -> list[bool]:
    """C(t, l) = 1 when (l - t) mod R == 0; the last layer always."""
    return [(layer - step) % rotation == 0 or layer == num_layers - 1 for layer in range(num_layers)]


def gradual_curriculum(step: int, total: int, num_layers: int) -> list[bool]:
    """C(t, l) = 1 once t >= T (L-1-l) / L: exits switch on from the last layer down to the first."""
    return [step * num_layers >= total * (num_layers - 1 - layer) for layer in range(num_layers)]


def exit_loss_weights(scales: list[float], enabled: list[bool]) -> torch.Tensor:
    """w(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i)."""
    raw = torch.tensor([s if on else 0.0 for s, on in zip(scales, enabled, strict=True)])
    return raw / raw.sum()


class LayerSkip(Recipe):
    """Layer dropout plus the curriculum-weighted early-exit loss through one shared head."""

    name = "layerskip"
    options = ("layerskip_p_max", "layerskip_e_scale", "layerskip_curriculum", "layerskip_rotation")

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.layerskip_curriculum not in CURRICULA:
            raise ValueError(f"Unknown layerskip_curriculum {cfg.layerskip_curriculum!r}; valid: "
                             f"{', '.join(CURRICULA)}.")
        if not 0.0 <= cfg.layerskip_p_max <= 1.0:
            raise ValueError(f"layerskip_p_max must lie in [0, 1], got {cfg.layerskip_p_max}.")
        if cfg.layerskip_e_scale < 0:
            raise ValueError(f"layerskip_e_scale must be >= 0, got {cfg.layerskip_e_scale}.")
        if int(cfg.layerskip_rotation) < 1:
            raise ValueError(f"layerskip_rotation must be >= 1, got {cfg.layerskip_rotation}.")

    def prepare(self, model: MultiExitModel) -> None:
        model.share_heads()

    def weights(self, num_layers: int, progress: Progress) -> torch.Tensor:
        """This step's normalised per-layer loss weights."""
        if self.cfg.layerskip_curriculum == "rotational":
            enabled = rotational_curriculum(progress.step, num_layers, int(self.cfg.layerskip_rotation))
        else:
            enabled = gradual_curriculum(progress.step, progress.total, num_layers)
        return exit_loss_weights(early_exit_scales(num_layers, self.cfg.layerskip_e_scale), enabled)

    def loss(self, model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        rates = layer_drop_rates(model.num_layers, self.cfg.layerskip_p_max)
        out = model(**batch, layer_drop=rates)
        per_layer = layer_ce(out.logits, labels)
        return (self.weights(model.num_layers, progress).to(per_layer.device) * per_layer).sum()

    def lm_loss(self, model, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        rates = layer_drop_rates(model.num_layers, self.cfg.layerskip_p_max)
        return next_token_ce(model, labels, batch.get("attention_mask"), self.weights(model.num_layers, progress),
                             rates)
