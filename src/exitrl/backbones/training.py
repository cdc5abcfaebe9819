"""The one training loop for backbones: it runs a list of recipe `Stage`s over a tokenized split. Fine-tuning
(every recipe) and ConsistentEE co-training (one stage whose loss is CE at the policy's exit layers) both call it.

Per stage: every parameter outside the stage's groups is frozen, AdamW over the groups, optionally the linear
warm-up/decay schedule, gradient clipping over the trained parameters. Hooks let callers log (``on_step``),
evaluate after each epoch (``on_epoch``) and edit gradients between backward and the step (``after_backward``).

Under torchrun (`exitrl.core.distributed`) every process draws the same batch order, trains on its share of each batch,
and DistributedDataParallel (or FSDP2, `exitrl.backbones.sharded`) averages the gradients, each share's loss
weighted by its rows: the optimiser steps are those of one process on the whole batch. Process 0 alone saves
checkpoints.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from exitrl.backbones.batching import batch_order, padded_batch
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Stage, StageLoss
from exitrl.core.checkpoint import Checkpoints, rng_state, set_rng_state
from exitrl.core.device import autocast, varied_shape_attention
from exitrl.core.distributed import World, all_sum, broadcast, current_world, gather, same_everywhere, share
from exitrl.core.progress import progress


def freeze_all_but(model: MultiExitModel, stage: Stage) -> list[torch.nn.Parameter]:
    """Train only the stage's parameters; returns them."""
    trained = [p for group in stage.groups for p in group["params"]]
    ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trained


def wrap_for(world: World, model: nn.Module, stage: Stage, device: torch.device) -> nn.Module:
    """The stage's loss, under DDP when several processes train (built after freezing: DDP syncs what trains)."""
    loss = StageLoss(model, stage)
    if not world.active:
        return loss
    return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)  # LayerSkip, DeeBERT: not every exit every step


def my_share(tokenizer, examples: list[dict], ids: list[int], world: World, device: torch.device):
    """This process's rows of one global batch and the weight of its loss (rows × processes ÷ batch rows). A
    process left without rows (a last batch smaller than the world) runs one row at weight 0."""
    mine = share(ids, world)
    weight = len(mine) * world.size / len(ids)
    return padded_batch(tokenizer, [examples[i] for i in (mine or ids[:1])], device), weight


def train_stages(model: MultiExitModel, tokenizer, examples: list[dict], stages: list[Stage], *, batch_size: int,
                 device: torch.device, generator: torch.Generator, clip_norm: float, weight_decay: float,
                 warmup_ratio: float | None, desc: str, step: int = 0,
                 on_step: Callable[[int, torch.Tensor, bool], None] | None = None,
                 on_epoch: Callable[[int, Stage], None] | None = None,
                 after_backward: Callable[[nn.Module, float], None] | None = None,
                 checkpoints: Checkpoints | None = None, carry: dict | None = None) -> int:
    """Train ``model`` stage by stage on ``examples``; returns the global step reached (counting from ``step``).

    ``warmup_ratio`` None keeps each stage's learning rates constant; a number applies the linear schedule with
    that warm-up fraction. ``on_step(step, loss, last)`` runs after every optimiser step, ``on_epoch(epoch, stage)``
    after every epoch (1-indexed over all stages), ``after_backward(trained, weight)`` between backward and
    clipping, given the module whose gradients the step will use (``model``, or its sharded copy under FSDP) and the
    weight of this process's rows (0 for a process that ran a filler row because the batch had none left for it).

    With ``checkpoints``, the model, optimiser, scheduler, position (stage, epoch, batch), the data order's generator
    as it was at the epoch's start, every RNG and ``carry`` (the callbacks' own state, updated in place) are saved
    whenever a checkpoint is due, and a run that finds a checkpoint continues from it: the same batches in the same
    order, the same dropout masks (every process's own RNG state is saved; on another number of processes each
    draws fresh ones), so the result equals an uninterrupted run's. The caller removes the file once the result is
    safely saved."""
    world = current_world()
    batches_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = sum(s.epochs for s in stages) * batches_per_epoch
    resume = checkpoints.load() if checkpoints is not None else None
    same_everywhere((checkpoints is not None, resume["step"] if resume else None),
                    "whether training keeps a checkpoint, and the step of the one found")
    position = resume["position"] if resume else {"stage": 0, "epoch": 0, "batch": 0}
    if resume:
        model.load_state_dict(resume["model"])
        step, epoch_index = resume["step"], resume["epoch_index"]
        if carry is not None:
            carry.clear()
            carry.update(resume["carry"])
    else:
        epoch_index = 0
    done = position["batch"] + batches_per_epoch * epoch_index  # batches trained (before a resumed checkpoint too)
    bar = progress(total=total, desc=desc, unit="batch")
    bar.update(done)
    try:
        for stage_index, stage in enumerate(stages):
            if stage_index < position["stage"]:
                continue
            trained, groups = freeze_all_but(model, stage), stage.groups
            sharded = None
            if world.active and world.sharding == "fsdp":
                from exitrl.backbones.sharded import ShardedStage  # here: FSDP2 loads torch.distributed's checkpointing

                sharded = ShardedStage(model, stage, device, world.size)
            if sharded is not None:
                engine, trained, groups = sharded.loss, sharded.trained, sharded.groups
            else:
                engine = wrap_for(world, model, stage, device)
            optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
            from transformers import get_linear_schedule_with_warmup  # here: its module loads transformers' models

            stage_steps = stage.epochs * batches_per_epoch
            scheduler = None if warmup_ratio is None else get_linear_schedule_with_warmup(
                optimizer, int(warmup_ratio * stage_steps), stage_steps)
            stage_step = 0
            first_epoch, skip = 0, 0
            resumed = bool(resume) and stage_index == position["stage"]
            if resumed:
                if sharded is not None:
                    sharded.load_optimizer_state(optimizer, resume["optimizer"])
                else:
                    optimizer.load_state_dict(resume["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(resume["scheduler"])
                first_epoch, skip = position["epoch"], position["batch"]
                stage_step = first_epoch * batches_per_epoch + skip
                generator.set_state(resume["epoch_generator"])
                set_rng_state(resume["rng"])
            if world.active:  # each process its own dropout masks (its rows differ anyway)
                own = resume.get("process_rng") if resumed else None
                if own is not None and len(own) == world.size:
                    set_rng_state(own[world.rank])
                else:
                    torch.manual_seed((torch.initial_seed() + 7919 * world.rank + step) % 2**63)
            for epoch in range(first_epoch, stage.epochs):
                (model if sharded is None else sharded.loss).train()
                epoch_generator = generator.get_state()
                first = skip if epoch == first_epoch else 0
                order = batch_order(examples, batch_size, True, generator)[first:]
                for batch_number, ids in enumerate(order, start=first):
                    batch, weight = my_share(tokenizer, examples, ids, world, device)
                    labels = batch.pop("labels")
                    with autocast(device), varied_shape_attention():
                        loss = engine(batch, labels, Progress(stage_step, stage_steps))
                    optimizer.zero_grad(set_to_none=True)
                    (loss * weight).backward()
                    if world.active:  # the whole batch's loss, as one process would report it
                        loss = all_sum(loss.detach() * (weight / world.size))
                    if after_backward is not None:
                        after_backward(model if sharded is None else sharded.loss.model, weight)
                    torch.nn.utils.clip_grad_norm_(trained, clip_norm)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    step += 1
                    stage_step += 1
                    done += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", stage=stage.name)
                    if on_step is not None:
                        on_step(step, loss, done == total)
                    due = world.is_main and checkpoints is not None and checkpoints.due()
                    if world.active and checkpoints is not None:  # gathering RNG states (and FSDP's weights) is
                        due = broadcast(due)  # a collective: all must know (only when checkpointing: a hot loop)
                    if due:
                        process_rng = gather(rng_state()) if world.active else None
                        if sharded is not None:
                            sharded.gather()
                            optimizer_state = sharded.optimizer_state(optimizer)
                        else:
                            optimizer_state = optimizer.state_dict()
                    if due and world.is_main:
                        checkpoints.save({
                            "position": {"stage": stage_index, "epoch": epoch, "batch": batch_number + 1},
                            "model": model.state_dict(), "optimizer": optimizer_state,
                            "scheduler": None if scheduler is None else scheduler.state_dict(),
                            "epoch_generator": epoch_generator, "step": step, "epoch_index": epoch_index,
                            "carry": dict(carry or {}), "process_rng": process_rng})
                epoch_index += 1
                if sharded is not None:  # the plain model, which callers evaluate, takes the trained weights
                    sharded.gather()
                if on_epoch is not None:
                    on_epoch(epoch_index, stage)
            if sharded is not None:  # FSDP ties the copy into reference cycles: free it before the next stage's
                engine = optimizer = scheduler = sharded = trained = groups = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        bar.close()
        for p in model.parameters():  # later users (tracing, co-training) get a fully trainable model back
            p.requires_grad_(True)
    model.eval()
    return step
