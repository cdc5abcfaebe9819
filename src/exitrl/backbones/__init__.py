"""Multi-exit backbones over any Hugging Face encoder, their training recipes and fine-tuning."""

from exitrl.backbones.finetune import FinetuneConfig, finetune, load_or_finetune, per_layer_accuracy
from exitrl.backbones.loading import load_multi_exit, resolve_backbone_path
from exitrl.backbones.multi_exit import BackboneError, MultiExitModel, MultiExitOutput
from exitrl.backbones.objectives import exit_layer_ce, layer_ce, weighted_ce
from exitrl.backbones.recipes import OBJECTIVES, Recipe, build_recipe, get_objective

__all__ = [
    "BackboneError", "FinetuneConfig", "MultiExitModel", "MultiExitOutput", "OBJECTIVES", "Recipe", "build_recipe",
    "exit_layer_ce", "finetune", "get_objective", "layer_ce", "load_multi_exit", "load_or_finetune",
    "per_layer_accuracy", "resolve_backbone_path", "weighted_ce",
]
