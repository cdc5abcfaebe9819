"""SWEET (Separating Weights in Early Exit Transformers, ACL 2023).

Early heads and the last head pull the shared layers in conflicting directions. SWEET removes the conflict: the
encoder runs segment by segment between exits, each head sees its segment's output with gradient, and the state
handed to the next segment is detached. Each layer (and the embeddings, through head 1) is then trained only by
the head right after it. Loss = sum_i CE_i.
"""

from __future__ import annotations

import torch

from exitrl.backbones.losses import layer_ce
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Recipe


class Sweet(Recipe):
    """Sum of every head's CE through the detached-between-layers forward."""

    name = "sweet"

    def loss(self, model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        return layer_ce(model(**batch, detach_between=True).logits, labels).sum()
