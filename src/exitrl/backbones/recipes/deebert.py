"""DeeBERT (Xin et al., ACL 2020): two stages, so the early exits cannot degrade the full model.

Stage 1 trains the backbone and the last head with CE at the last layer only, as ordinary fine-tuning does.
Stage 2 freezes both and trains only the other heads (sum of their CE) on the frozen states, for ``head_epochs``
epochs (``epochs`` when unset) at ``head_lr``. The last layer's accuracy is therefore exactly plain fine-tuning's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exitrl.backbones.losses import layer_ce
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Recipe, Stage, body_parameters


def last_layer_ce(model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
    """Stage 1: CE of the last head only."""
    return F.cross_entropy(model(**batch).logits[:, -1].float(), labels)


def early_heads_ce(model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
    """Stage 2: sum of the CE of heads 1..L-1 (the backbone and last head are frozen by the stage)."""
    return layer_ce(model(**batch).logits[:, :-1], labels).sum()


class DeeBERT(Recipe):
    """Backbone + last head first, then the early heads alone."""

    name = "deebert"
    options = ("head_epochs",)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.head_epochs is not None and int(cfg.head_epochs) < 0:
            raise ValueError(f"head_epochs must be >= 0 or null, got {cfg.head_epochs}.")

    def stages(self, model: MultiExitModel) -> list[Stage]:
        if model.shared_heads:
            raise ValueError("deebert trains the early heads apart from the last one; this model shares one head.")
        head_epochs = self.cfg.epochs if self.cfg.head_epochs is None else int(self.cfg.head_epochs)
        early = [p for head in model.heads[:-1] for p in head.parameters()]
        return [
            Stage("backbone+last head", self.cfg.epochs, [
                {"params": body_parameters(model), "lr": self.cfg.lr},
                {"params": list(model.heads[-1].parameters()), "lr": self.cfg.head_lr},
            ], last_layer_ce),
            Stage("early heads", head_epochs, [{"params": early, "lr": self.cfg.head_lr}], early_heads_ce),
        ]
