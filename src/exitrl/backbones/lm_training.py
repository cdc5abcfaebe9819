"""Continued training of a causal LM with an exit recipe (LayerSkip, or next-token CE at every exit) on packed
text, through the same stage loop as encoder fine-tuning (`exitrl.backbones.training.train_stages`): the same
optimiser, schedule, clipping, bf16 autocast on GPUs, checkpoints and resume."""

from __future__ import annotations

import time

import torch

from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.backbones.recipes import RECIPES, build_recipe
from exitrl.backbones.training import train_stages
from exitrl.core.checkpoint import Checkpoints


def lm_recipes() -> list[str]:
    """The recipes that can train a causal LM."""
    return [name for name, recipe in RECIPES.items() if recipe.trains_lms()]


def continue_training(model: MultiExitLM, tokenizer, chunks: list[dict], cfg: FinetuneConfig,
                      device: torch.device | str, checkpoints: Checkpoints | None = None) -> dict:
    """Train ``model`` on packed ``chunks`` (`exitrl.data.lm_text.pack`) for ``cfg.epochs`` with recipe
    ``cfg.objective``; returns what was done (steps, tokens, seconds)."""
    recipe = build_recipe(cfg)
    if not recipe.trains_lms():
        raise ValueError(f"backbone.finetune.objective={cfg.objective} trains encoder classifiers only; for a causal "
                         f"LM use one of {', '.join(lm_recipes())}.")
    if not chunks:
        raise ValueError("No training chunks: give more text or a shorter chunk length.")
    started = time.time()
    recipe.prepare(model)
    model.to(device)
    steps = train_stages(model, tokenizer, chunks, recipe.stages(model), batch_size=cfg.batch_size,
                         device=torch.device(device), generator=torch.Generator().manual_seed(cfg.seed),
                         clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                         desc=f"continue training ({cfg.objective})", checkpoints=checkpoints)
    tokens = cfg.epochs * len(chunks) * len(chunks[0]["input_ids"])
    return {"objective": cfg.objective, "steps": steps, "tokens": tokens, "chunks": len(chunks),
            "seconds": round(time.time() - started, 1)}
