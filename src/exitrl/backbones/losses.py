"""Loss functions of per-layer exit logits and labels, shared by the training recipes and co-training.

The recipes that pick and combine them (``backbone.finetune.objective=`` names the recipe) live in
`exitrl.backbones.recipes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every exit head, ``[L]``, from logits ``[B, L, C]`` (computed in fp32)."""
    return torch.stack([F.cross_entropy(logits[:, i].float(), labels) for i in range(logits.shape[1])])


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PABEE / ConsistentEE stage 1: sum_l l * CE_l / sum_l l, so deeper heads weigh more."""
    num_layers = logits.shape[1]
    weights = torch.arange(1, num_layers + 1, device=logits.device, dtype=torch.float32)
    return (weights * layer_ce(logits, labels)).sum() / weights.sum()


def exit_layer_ce(logits: torch.Tensor, labels: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """ConsistentEE's task loss for co-training: CE of each example only at its (0-based) exit layer."""
    at_exit = logits[torch.arange(logits.shape[0], device=logits.device), exit_layers]
    return F.cross_entropy(at_exit.float(), labels)


def next_token_ce(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, weights: torch.Tensor,
                  layer_drop=None) -> torch.Tensor:
    """Σ_l w_l · CE_l of a causal LM's exits at predicting token t+1 from position t (teacher forcing; padded
    targets ignored), normalised by Σ_l w_l. A layer with weight 0 costs no exit at all (LayerSkip's curriculum
    leaves most exits off at each step), so only the enabled exits build vocabulary-sized logits."""
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    states = model.layer_states(input_ids, attention_mask, layer_drop)
    total = torch.zeros((), device=input_ids.device)
    for layer, weight in enumerate(weights.tolist()):
        if weight:
            logits = model.exit_logits(layer, states[layer][:, :-1]).float()
            total = total + weight * F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return total / weights.sum()
