"""Fine-tune a `MultiExitModel` on a task, and cache the result under a key of everything that shaped it.

The key covers the base weights (content hash), the task data (content hash), the recipe (config key
``objective``, `exitrl.backbones.recipes`), every hyperparameter that recipe reads and the seed, so `agent=confidence`
after `agent=reinforce` on the same task reuses the model, and any changed input trains a new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from exitrl.backbones.batching import by_length, iterate_batches, tokenize_split
from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.loading import load_multi_exit
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes import build_recipe, recipe_settings
from exitrl.backbones.training import train_stages
from exitrl.core.checkpoint import Checkpoints, CorruptFile, verify_manifest, write_manifest
from exitrl.core.device import autocast
from exitrl.core.distributed import barrier, broadcast, current_world
from exitrl.core.hashing import hash_json, hash_state_dict, hash_tokenizer
from exitrl.data import TaskData

log = logging.getLogger(__name__)


@torch.no_grad()
def per_layer_accuracy(model: MultiExitModel, tokenizer, examples: list[dict], device, batch_size: int = 64):
    model.eval()
    correct = torch.zeros(model.num_layers)
    examples = [examples[i] for i in by_length(examples)]  # counting does not care about order; padding does
    for batch in iterate_batches(tokenizer, examples, batch_size, device):
        labels = batch.pop("labels")
        with autocast(device):
            out = model(**batch)
        correct += (out.logits.argmax(-1) == labels[:, None]).float().sum(0).cpu()
    return (correct / len(examples)).tolist()


def finetune(model: MultiExitModel, tokenizer, data: TaskData, cfg: FinetuneConfig, device: torch.device,
             writer=None, checkpoints: Checkpoints | None = None) -> dict:
    """Train the model with the recipe ``cfg.objective``, stage by stage; returns per-layer dev accuracy after
    each epoch (of all stages in order) and the stages run. With ``checkpoints`` it saves periodically and resumes
    from a checkpoint it finds (`train_stages`)."""
    recipe = build_recipe(cfg)
    train = tokenize_split(tokenizer, data.splits["train"], cfg.max_length)
    dev = tokenize_split(tokenizer, data.splits["dev"], cfg.max_length) if "dev" in data.splits else None
    recipe.prepare(model)
    model.to(device).train()
    stages = recipe.stages(model)
    carry = {"history": []}  # saved with each checkpoint

    def log_loss(step: int, loss: torch.Tensor, last: bool) -> None:
        if writer is not None and step % 10 == 0:
            writer.add_scalar("backbone/loss", loss.item(), step)

    def evaluate_epoch(epoch: int, stage) -> None:
        if dev is None or not current_world().is_main:  # one process evaluates and logs
            return
        accs = per_layer_accuracy(model, tokenizer, dev, device)
        carry["history"].append(accs)
        log.info("epoch %d (%s) dev per-layer accuracy: %s", epoch, stage.name, " ".join(f"{a:.3f}" for a in accs))
        if writer is not None:
            for i, a in enumerate(accs):
                writer.add_scalar(f"backbone/dev_accuracy_layer{i + 1}", a, epoch)

    train_stages(model, tokenizer, train, stages, batch_size=cfg.batch_size, device=device,
                 generator=torch.Generator().manual_seed(cfg.seed), clip_norm=cfg.clip_norm,
                 weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                 desc=f"fine-tune {data.name} ({cfg.objective})", on_step=log_loss, on_epoch=evaluate_epoch,
                 checkpoints=checkpoints, carry=carry)
    return {"dev_accuracy_per_epoch": carry["history"],
            "stages": [{"name": s.name, "epochs": s.epochs} for s in stages]}


def load_or_finetune(name: str, data: TaskData, cfg: FinetuneConfig, cache_dir: str | Path, device: torch.device,
                     pooling: str = "cls", package: str | None = None, writer=None,
                     checkpoint_seconds: float = 300.0):
    """Return ``(model, tokenizer, info)``, fine-tuning only when no cached model matches the inputs. Fine-tuning
    checkpoints every ``checkpoint_seconds`` beside the cache entry (``<entry>.checkpoint``), so a killed run's
    rerun continues where it stopped. Under several processes all train (`train_stages`), process 0 decides
    whether the cache holds the entry and alone writes it; the key has no process count in it."""
    build_recipe(cfg)  # an unknown objective or a bad option fails here, before loading or training
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_multi_exit(name, data.num_labels, pooling=pooling, package=package)
    key = hash_json({  # only what shapes the weights: the dev split does not
        "base": hash_state_dict(model.encoder), "tokenizer": hash_tokenizer(tokenizer),
        "data": data.fingerprint(("train",)), "pooling": pooling, "num_labels": data.num_labels,
        "finetune": recipe_settings(cfg),
    })
    folder = Path(cache_dir).expanduser() / "backbones" / f"{data.name}-{key}"
    if broadcast(cached_entry(folder) if current_world().is_main else None):
        try:
            log.info("Reusing fine-tuned backbone %s", folder)
            model, tokenizer, meta = MultiExitModel.load(folder, device)
            return model.eval(), tokenizer, {"key": key, "path": str(folder), "cached": True, **meta}
        except CorruptFile as err:
            set_aside(folder, err)
    start = time.time()
    checkpoints = Checkpoints(folder.with_name(folder.name + ".checkpoint"), checkpoint_seconds, work=key)
    history = finetune(model, tokenizer, data, cfg, device, writer, checkpoints)
    info = {"key": key, "base": name, "task": data.name, "finetune": asdict(cfg),
            "train_seconds": round(time.time() - start, 1), **history}
    info["checkpoints"] = checkpoints.summary()
    if not current_world().is_main:
        barrier()  # process 0 writes the entry
        return model.eval(), tokenizer, {"path": str(folder), "cached": False, **info}
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save(tmp, tokenizer, extra=info)
    (tmp / "finetune.json").write_text(json.dumps(info, indent=2))
    write_manifest(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same entry first: keep theirs, which has the same content key
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s was written by another process meanwhile; using it.", folder)
    checkpoints.clear()  # only now: the result is whole on disk
    barrier()
    return model.eval(), tokenizer, {"path": str(folder), "cached": False, **info}


def cached_entry(folder: Path) -> bool:
    """Whether ``folder`` holds a whole cache entry; one whose files fail their manifest is set aside."""
    if not (folder / "exitrl_backbone.json").is_file():
        return False
    try:
        verify_manifest(folder)
        return True
    except CorruptFile as err:
        set_aside(folder, err)
        return False


def set_aside(folder: Path, err: CorruptFile) -> None:
    """A corrupt cache entry is renamed (never silently used, never deleted), so the caller fine-tunes again."""
    aside = folder.with_name(f"{folder.name}.corrupt-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(aside)
    except OSError:  # another process moved it aside first
        pass
    log.warning("%s; moved to %s and fine-tuning again.", err, aside)
