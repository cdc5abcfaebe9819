"""Fine-tune a `MultiExitModel` on a task, and cache the result under a key of everything that shaped it.

The key covers the base weights (content hash), the task data (content hash), the objective, every
hyperparameter and the seed, so `agent=confidence` after `agent=reinforce` on the same task reuses the model,
and any changed input trains a new one.
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
from exitrl.backbones.objectives import get_objective
from exitrl.data import TaskData
from exitrl.device import autocast
from exitrl.hashing import hash_json, hash_state_dict, hash_tokenizer

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    objective: str = "weighted_ce"
    lr: float = 2e-5
    head_lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 5
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0


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


def finetune(model: MultiExitModel, tokenizer, data: TaskData, cfg: FinetuneConfig, device: torch.device,
             writer=None) -> dict:
    """Train all layers and heads with ``cfg.objective``; returns per-layer dev accuracy after each epoch."""
    objective = get_objective(cfg.objective)
    train = tokenize_split(tokenizer, data.splits["train"], cfg.max_length)
    dev = tokenize_split(tokenizer, data.splits["dev"], cfg.max_length) if "dev" in data.splits else None
    model.to(device).train()
    head_params = list(model.heads.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}], weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    step = 0
    bar = tqdm(total=steps, desc=f"fine-tune {data.name} ({cfg.objective})", unit="batch")
    for epoch in range(cfg.epochs):
        model.train()
        for batch in iterate_batches(tokenizer, train, cfg.batch_size, device, shuffle=True, generator=generator):
            labels = batch.pop("labels")
            with autocast(device):
                out = model(**batch)
            loss = objective(out.logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
            if writer is not None and step % 10 == 0:
                writer.add_scalar("backbone/loss", loss.item(), step)
        if dev is not None:
            accs = per_layer_accuracy(model, tokenizer, dev, device)
            history.append(accs)
            log.info("epoch %d dev per-layer accuracy: %s", epoch + 1, " ".join(f"{a:.3f}" for a in accs))
            if writer is not None:
                for i, a in enumerate(accs):
                    writer.add_scalar(f"backbone/dev_accuracy_layer{i + 1}", a, epoch + 1)
    bar.close()
    model.eval()
    return {"dev_accuracy_per_epoch": history}


def load_or_finetune(name: str, data: TaskData, cfg: FinetuneConfig, cache_dir: str | Path, device: torch.device,
                     pooling: str = "cls", package: str | None = None, writer=None):
    """Return ``(model, tokenizer, info)``, fine-tuning only when no cached model matches the inputs."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_multi_exit(name, data.num_labels, pooling=pooling, package=package)
    key = hash_json({  # only what shapes the weights: the dev split does not
        "base": hash_state_dict(model.encoder), "tokenizer": hash_tokenizer(tokenizer),
        "data": data.fingerprint(("train",)), "pooling": pooling, "num_labels": data.num_labels,
        "finetune": asdict(cfg),
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
