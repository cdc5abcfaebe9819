"""The fine-tuning settings: those every recipe reads (learning rates, batch size, epochs, ...) and the options of
one recipe each, which only that recipe reads and only its runs put in the cache key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneConfig:
    objective: str = "weighted_ce"  # the recipe (exitrl.backbones.recipes): weighted_ce|sweet|layerskip|deebert|free
    lr: float = 2e-5
    head_lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 5
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float | None = 0.1  # None: constant learning rates
    clip_norm: float = 1.0
    seed: int = 0
    # options read by one recipe only (ignored by, and left out of the cache key of, the others)
    head_epochs: int | None = None  # deebert: epochs of stage 2 (early heads on the frozen backbone); None = epochs
    shallow_layer: int | None = None  # free: the shallow exit L_s (1-indexed); None = max(1, round-half-up(L/4))
    distill_weight: float = 1.0  # free: weight of the MSE between the shallow and the (detached) deep pooled state
    layerskip_p_max: float = 0.2  # layerskip: layer-dropout rate of the last layer
    layerskip_e_scale: float = 1.0  # layerskip: e_scale of the per-layer early-exit loss scales
    layerskip_curriculum: str = "rotational"  # layerskip: rotational | gradual
    layerskip_rotation: int = 2  # layerskip: period R of the rotational curriculum
