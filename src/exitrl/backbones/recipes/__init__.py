"""Backbone training recipes, chosen by ``backbone.finetune.objective=<recipe>``.

Every recipe trains every exit head, so any exit policy can run on any layer of the result:

- ``weighted_ce``: PABEE / ConsistentEE stage 1, sum_l l CE_l / sum_l l.
- ``sweet``: SWEET, each layer trained only by the head right after it (detached between layers).
- ``layerskip``: LayerSkip, depth-rising layer dropout and a curriculum-weighted loss through one shared head.
- ``deebert``: DeeBERT, backbone + last head first, then the early heads on the frozen backbone.
- ``free``: FREE shallow-deep loss with hidden-state distillation; other heads as detached probes.
"""

from __future__ import annotations

from dataclasses import asdict

from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.recipes.base import Progress, Recipe, Stage, body_parameters
from exitrl.backbones.recipes.deebert import DeeBERT
from exitrl.backbones.recipes.free import Free
from exitrl.backbones.recipes.layerskip import LayerSkip
from exitrl.backbones.recipes.sweet import Sweet
from exitrl.backbones.recipes.weighted_ce import WeightedCE

RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (WeightedCE, Sweet, LayerSkip, DeeBERT, Free)}
RECIPE_OPTIONS = frozenset(option for recipe in RECIPES.values() for option in recipe.options)


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class called ``name`` (the config key ``backbone.finetune.objective``); a ValueError lists the
    valid ones."""
    if name not in RECIPES:
        raise ValueError(f"Unknown backbone.finetune.objective {name!r}; valid: {', '.join(RECIPES)}.")
    return RECIPES[name]


def build_recipe(cfg: FinetuneConfig) -> Recipe:
    """The recipe ``cfg.objective`` with its options from ``cfg`` (checked here, before any training)."""
    return get_recipe(cfg.objective)(cfg)


def recipe_settings(cfg: FinetuneConfig) -> dict:
    """The fine-tune settings that shape the weights: the shared ones and only the chosen recipe's own options,
    so an option of another recipe neither retrains nor splits the cache."""
    own = set(get_recipe(cfg.objective).options)
    return {k: v for k, v in asdict(cfg).items() if k not in RECIPE_OPTIONS or k in own}


__all__ = [
    "DeeBERT", "Free", "LayerSkip", "Progress", "RECIPES", "RECIPE_OPTIONS", "Recipe", "Stage", "Sweet",
    "WeightedCE", "body_parameters", "build_recipe", "get_recipe", "recipe_settings",
]
