"""Multi-exit backbones over any Hugging Face encoder, their training recipes and fine-tuning."""

from exitrl.backbones.finetune import finetune, load_or_finetune, per_layer_accuracy
from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.loading import load_multi_exit, resolve_backbone_path
from exitrl.backbones.losses import exit_layer_ce, layer_ce, weighted_ce
from exitrl.backbones.multi_exit import BackboneError, MultiExitModel, MultiExitOutput
from exitrl.backbones.recipes import RECIPES, Recipe, build_recipe, get_recipe
from exitrl.backbones.training import train_stages

__all__ = [
    "BackboneError", "FinetuneConfig", "MultiExitModel", "MultiExitOutput", "RECIPES", "Recipe", "build_recipe",
    "exit_layer_ce", "finetune", "get_recipe", "layer_ce", "load_multi_exit", "load_or_finetune",
    "per_layer_accuracy", "resolve_backbone_path", "train_stages", "weighted_ce",
]
