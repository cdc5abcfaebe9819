"""Weighted CE (PABEE, ConsistentEE stage 1): every head on every example, deeper heads weighing more; for a causal
LM, next-token CE at every exit with the same weights."""

from __future__ import annotations

import torch

from exitrl.backbones.losses import next_token_ce, weighted_ce
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Recipe


class WeightedCE(Recipe):
    """loss = sum_l l * CE_l / sum_l l, all layers and heads trained together."""

    name = "weighted_ce"

    def loss(self, model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        return weighted_ce(model(**batch).logits.float(), labels)

    def lm_loss(self, model, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        weights = torch.arange(1, model.num_layers + 1, dtype=torch.float32)
        return next_token_ce(model, labels, batch.get("attention_mask"), weights)
