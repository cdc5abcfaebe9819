"""What every training recipe gives the fine-tuning loop: a list of stages, each naming the parameters it trains
(everything else is frozen for that stage), its learning rates, its length and its loss.

Why stages: some recipes train different parts at different times (DeeBERT trains the backbone first and the
early heads afterwards on the frozen backbone), and the loop should not need to know which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.multi_exit import MultiExitModel


@dataclass(frozen=True)
class Progress:
    """Where training stands inside the current stage: optimiser steps done (0 on the first batch) and in all."""

    step: int
    total: int


LossFn = Callable[[MultiExitModel, dict, torch.Tensor, Progress], torch.Tensor]


@dataclass
class Stage:
    """One phase of training: ``groups`` are AdamW parameter groups (``{"params": [...], "lr": x}``); every
    parameter of the model outside them is frozen while the stage runs."""

    name: str
    epochs: int
    groups: list[dict]
    loss: LossFn


class StageLoss(nn.Module):
    """A stage's loss as a module, so DistributedDataParallel or FSDP can wrap it (its forward is what they watch)."""

    def __init__(self, model: nn.Module, stage: Stage):
        super().__init__()
        self.model, self.stage_loss = model, stage.loss

    def forward(self, batch: dict, labels: torch.Tensor, where: Progress) -> torch.Tensor:
        return self.stage_loss(self.model, batch, labels, where)


def body_parameters(model: MultiExitModel) -> list[nn.Parameter]:
    """Everything but the exit heads: embeddings and encoder layers. (``parameters()`` lists a shared head once.)"""
    head_ids = {id(p) for p in model.heads.parameters()}
    return [p for p in model.parameters() if id(p) not in head_ids]


class Recipe:
    """A backbone training recipe. Subclasses set ``name``, the `FinetuneConfig` fields only they read
    (``options``, which alone of the recipe-specific fields enter the fine-tune cache key) and ``loss``;
    multi-stage recipes override ``stages``; recipes that change the model's structure override ``prepare``."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg

    def prepare(self, model: MultiExitModel) -> None:
        """Change the model before training (called once, before any optimiser exists)."""

    def stages(self, model: MultiExitModel) -> list[Stage]:
        """One stage by default: the body at ``lr``, every head at ``head_lr``, for ``epochs``, with ``loss`` (or
        ``lm_loss`` for a causal LM)."""
        return [Stage(self.name, self.cfg.epochs, [
            {"params": body_parameters(model), "lr": self.cfg.lr},
            {"params": list(model.heads.parameters()), "lr": self.cfg.head_lr},
        ], self.lm_loss if getattr(model, "is_lm", False) else self.loss)]

    def loss(self, model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        """The training loss of one batch (``batch`` holds the model's inputs; runs under autocast)."""
        raise NotImplementedError

    @classmethod
    def trains_lms(cls) -> bool:
        return cls.lm_loss is not Recipe.lm_loss

    def lm_loss(self, model, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        """The loss of one batch of a causal LM (`MultiExitLM`): ``labels`` are the token ids ``[B, T]``."""
        raise NotImplementedError
