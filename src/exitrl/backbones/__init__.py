"""Multi-exit backbones over any Hugging Face encoder, their training objectives and fine-tuning."""

from exitrl.backbones.finetune import FinetuneConfig, finetune, load_or_finetune, per_layer_accuracy
from exitrl.backbones.loading import load_multi_exit, resolve_backbone_path
from exitrl.backbones.multi_exit import BackboneError, MultiExitModel, MultiExitOutput
from exitrl.backbones.objectives import OBJECTIVES, get_objective, weighted_ce

__all__ = [
    "BackboneError", "FinetuneConfig", "MultiExitModel", "MultiExitOutput", "OBJECTIVES", "finetune",
    "get_objective", "load_multi_exit", "load_or_finetune", "per_layer_accuracy", "resolve_backbone_path",
    "weighted_ce",
]
