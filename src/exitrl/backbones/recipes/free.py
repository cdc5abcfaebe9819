"""FREE (Bae et al., EMNLP 2023), shallow-deep: one shallow exit at layer L_s, else the full model.

Loss = (L_s CE_s + L CE_L) / (L_s + L) + distill_weight * MSE(pooled_s, pooled_L detached): the deep exit and
the shallow exit are trained together, and the shallow state is pulled towards the deep one (hidden-state
distillation; the deep state is the teacher, so it is detached). The other heads are trained as linear probes on
DETACHED pooled states (CE, summed), so every exit policy can still run on a FREE backbone while the probes do
not shape it.

L_s defaults to a quarter of the depth, rounded half up: max(1, floor(L/4 + 1/2)) (L=6 -> 2, L=10 -> 3,
L=12 -> 3); ``shallow_layer`` sets it (1-indexed, 1 <= L_s < L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Recipe


def default_shallow_layer(num_layers: int) -> int:
    """A quarter of the depth, rounded half up, at least 1."""
    return max(1, math.floor(num_layers / 4 + 0.5))


def shallow_deep_loss(logits: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor, shallow: int,
                      distill_weight: float) -> torch.Tensor:
    """FREE's loss from logits ``[B, L, C]`` and pooled states ``[B, L, H]``; ``shallow`` is 1-indexed."""
    num_layers = logits.shape[1]
    ce_shallow = F.cross_entropy(logits[:, shallow - 1].float(), labels)
    ce_deep = F.cross_entropy(logits[:, -1].float(), labels)
    task = (shallow * ce_shallow + num_layers * ce_deep) / (shallow + num_layers)
    distill = F.mse_loss(pooled[:, shallow - 1].float(), pooled[:, -1].detach().float())
    return task + distill_weight * distill


class Free(Recipe):
    """Shallow-deep loss with distillation, plus detached linear probes at every other layer."""

    name = "free"
    options = ("shallow_layer", "distill_weight")

    def prepare(self, model: MultiExitModel) -> None:
        self.shallow_layer(model.num_layers)  # refuse a bad shallow_layer before any training

    def shallow_layer(self, num_layers: int) -> int:
        shallow = default_shallow_layer(num_layers) if self.cfg.shallow_layer is None else int(self.cfg.shallow_layer)
        if not 1 <= shallow < num_layers:
            raise ValueError(f"free needs 1 <= shallow_layer < number of layers ({num_layers}), got {shallow}.")
        return shallow

    def loss(self, model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        out = model(**batch)
        shallow = self.shallow_layer(model.num_layers)
        loss = shallow_deep_loss(out.logits, out.pooled, labels, shallow, self.cfg.distill_weight)
        for index in range(model.num_layers - 1):
            if index != shallow - 1:  # a probe: trains its head on the state, never the state itself
                probe = model.exit_logits(index, out.pooled[:, index].detach())
                loss = loss + F.cross_entropy(probe.float(), labels)
        return loss
