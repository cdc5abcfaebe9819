"""Fine-tune a `MultiExitModel` on a task, and cache the result under a key of everything that shaped it.

The key covers the base weights (content hash), the task data (content hash), the objective (the training
recipe, `exitrl.backbones.recipes`), every hyperparameter that recipe reads and the seed, so `agent=confidence`
after `agent=reinforce` on the same task reuses the model, and any changed input trains a new one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from exitrl.backbones.batching import iterate_batches, tokenize_split
from exitrl.backbones.loading import load_multi_exit
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes import Progress, Stage, build_recipe, recipe_settings
from exitrl.data import TaskData
from exitrl.device import autocast
from exitrl.hashing import hash_json, hash_state_dict, hash_tokenizer

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    objective: str = "weighted_ce"  # a recipe of exitrl.backbones.recipes: weighted_ce|sweet|layerskip|deebert|free
    lr: float = 2e-5
    head_lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 5
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
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


@torch.no_grad()
def per_layer_accuracy(model: MultiExitModel, tokenizer, examples: list[dict], device, batch_size: int = 64):
    model.eval()
    correct = torch.zeros(model.num_layers)
    for batch in iterate_batches(tokenizer, examples, batch_size, device):
        labels = batch.pop("labels")
        with autocast(device):
            out = model(**batch)
        correct += (out.logits.argmax(-1) == labels[:, None]).float().sum(0).cpu()
    return (correct / len(examples)).tolist()


def _freeze_all_but(model: MultiExitModel, stage: Stage) -> list[torch.nn.Parameter]:
    """Train only the stage's parameters; returns them."""
    trained = [p for group in stage.groups for p in group["params"]]
    ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trained


def finetune(model: MultiExitModel, tokenizer, data: TaskData, cfg: FinetuneConfig, device: torch.device,
             writer=None) -> dict:
    """Train the model with the recipe ``cfg.objective``, stage by stage; returns per-layer dev accuracy after
    each epoch (of all stages in order) and the stages run."""
    recipe = build_recipe(cfg)
    train = tokenize_split(tokenizer, data.splits["train"], cfg.max_length)
    dev = tokenize_split(tokenizer, data.splits["dev"], cfg.max_length) if "dev" in data.splits else None
    recipe.prepare(model)
    model.to(device).train()
    stages = recipe.stages(model)
    batches_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    step = epoch_index = 0
    bar = tqdm(total=sum(s.epochs for s in stages) * batches_per_epoch, desc=f"fine-tune {data.name} "
               f"({cfg.objective})", unit="batch")
    try:
        for stage in stages:
            trained = _freeze_all_but(model, stage)
            optimizer = torch.optim.AdamW(stage.groups, weight_decay=cfg.weight_decay)
            stage_steps = stage.epochs * batches_per_epoch
            scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * stage_steps), stage_steps)
            stage_step = 0
            for _ in range(stage.epochs):
                model.train()
                for batch in iterate_batches(tokenizer, train, cfg.batch_size, device, shuffle=True,
                                             generator=generator):
                    labels = batch.pop("labels")
                    with autocast(device):
                        loss = stage.loss(model, batch, labels, Progress(stage_step, stage_steps))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trained, cfg.clip_norm)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    stage_step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", stage=stage.name)
                    if writer is not None and step % 10 == 0:
                        writer.add_scalar("backbone/loss", loss.item(), step)
                epoch_index += 1
                if dev is not None:
                    accs = per_layer_accuracy(model, tokenizer, dev, device)
                    history.append(accs)
                    log.info("epoch %d (%s) dev per-layer accuracy: %s", epoch_index, stage.name,
                             " ".join(f"{a:.3f}" for a in accs))
                    if writer is not None:
                        for i, a in enumerate(accs):
                            writer.add_scalar(f"backbone/dev_accuracy_layer{i + 1}", a, epoch_index)
    finally:
        bar.close()
        for p in model.parameters():  # later users (tracing, co-training) get a fully trainable model back
            p.requires_grad_(True)
    model.eval()
    return {"dev_accuracy_per_epoch": history, "stages": [{"name": s.name, "epochs": s.epochs} for s in stages]}


def load_or_finetune(name: str, data: TaskData, cfg: FinetuneConfig, cache_dir: str | Path, device: torch.device,
                     pooling: str = "cls", package: str | None = None, writer=None):
    """Return ``(model, tokenizer, info)``, fine-tuning only when no cached model matches the inputs."""
    build_recipe(cfg)  # an unknown objective or a bad option fails here, before loading or training
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_multi_exit(name, data.num_labels, pooling=pooling, package=package)
    key = hash_json({  # only what shapes the weights: the dev split does not
        "base": hash_state_dict(model.encoder), "tokenizer": hash_tokenizer(tokenizer),
        "data": data.fingerprint(("train",)), "pooling": pooling, "num_labels": data.num_labels,
        "finetune": recipe_settings(cfg),
    })
    folder = Path(cache_dir).expanduser() / "backbones" / f"{data.name}-{key}"
    if (folder / "exitrl_backbone.json").is_file():
        log.info("Reusing fine-tuned backbone %s", folder)
        model, tokenizer, meta = MultiExitModel.load(folder, device)
        return model.eval(), tokenizer, {"key": key, "path": str(folder), "cached": True, **meta}
    start = time.time()
    history = finetune(model, tokenizer, data, cfg, device, writer)
    info = {"key": key, "base": name, "task": data.name, "finetune": asdict(cfg),
            "train_seconds": round(time.time() - start, 1), **history}
    tmp = folder.with_name(folder.name + ".partial")
    model.save(tmp, tokenizer, extra=info)
    tmp.rename(folder)
    (folder / "finetune.json").write_text(json.dumps(info, indent=2))
    return model.eval(), tokenizer, {"path": str(folder), "cached": False, **info}
