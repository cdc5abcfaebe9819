"""Processes of the 1-vs-2-process tests (`test_distributed.py`), started by torch.multiprocessing: each joins the
gloo group the test describes; process 0 saves what it saw for the test to compare."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def join(rank: int, size: int, port: int):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "TQDM_DISABLE": "1"})
    torch.set_num_threads(1)
    from exitrl.core.distributed import start

    return start(torch.device("cpu"))


def encoder(backbone: str, glue_dir: str, dropout: float = 0.0):
    """A tiny encoder, by default without dropout (one process's masks cannot be two processes' masks), and an RTE
    slice whose batches of 8 are 8, 8 and 1 rows (the last leaves a process without rows)."""
    from exitrl.backbones.loading import load_multi_exit
    from exitrl.data import load_task

    data = load_task("rte", glue_dir, limit={"train": 17, "dev": 11})
    torch.manual_seed(0)
    model, tokenizer = load_multi_exit(backbone, data.num_labels, dropout=dropout)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return model, tokenizer, data


def train(model, tokenizer, data, device, on_step, checkpoints=None, after_backward=None) -> None:
    """Two epochs of weighted CE on the slice."""
    from exitrl.backbones import FinetuneConfig
    from exitrl.backbones.batching import tokenize_split
    from exitrl.backbones.recipes import build_recipe
    from exitrl.backbones.training import train_stages

    cfg = FinetuneConfig(lr=1e-3, head_lr=1e-2, batch_size=8, epochs=2, seed=0)
    recipe = build_recipe(cfg)
    recipe.prepare(model)
    train_stages(model, tokenizer, tokenize_split(tokenizer, data.splits["train"], 64), recipe.stages(model),
                 batch_size=cfg.batch_size, device=device, generator=torch.Generator().manual_seed(0),
                 clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, desc="train",
                 on_step=on_step, checkpoints=checkpoints, after_backward=after_backward)


def tied_lm(lm: str):
    """The tiny Llama with its LM head tied to the token embedding (as SmolLM2's is), as a `MultiExitLM`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exitrl.backbones.multi_exit_lm import MultiExitLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(lm, tie_word_embeddings=True)
    return MultiExitLM(AutoModelForCausalLM.from_config(config))


def train_lm(model, tokenizer, device, on_step, after_backward=None) -> None:
    """Next-token CE at every exit on 5 random chunks, batches of 2 (the last leaves a process without rows)."""
    from exitrl.backbones import FinetuneConfig
    from exitrl.backbones.recipes import build_recipe
    from exitrl.backbones.training import train_stages

    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(5, 60, (12,), generator=generator).tolist() for _ in range(5)]
    chunks = [{"input_ids": chunk, "labels": chunk} for chunk in ids]  # as exitrl.data.lm_text.pack makes them
    cfg = FinetuneConfig(lr=1e-3, batch_size=2, epochs=1, seed=0)
    recipe = build_recipe(cfg)
    recipe.prepare(model)
    train_stages(model, tokenizer, chunks, recipe.stages(model), batch_size=cfg.batch_size, device=device,
                 generator=torch.Generator().manual_seed(0), clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay,
                 warmup_ratio=cfg.warmup_ratio, desc="train lm", on_step=on_step, after_backward=after_backward)


def kind(trained: torch.nn.Module) -> str:
    """What the trained module's parameters are: DTensor under FSDP2 (the sharded copy), Parameter otherwise."""
    return type(next(trained.parameters())).__name__


def work(rank: int, size: int, port: int, backbone: str, lm: str, glue_dir: str, out: str) -> None:
    """Trace the untrained encoder and a tiny LM's token trace, then train the encoder (with DDP; two processes also
    with FSDP2) and a tied tiny LM (FSDP2 on two processes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exitrl.backbones.multi_exit_lm import MultiExitLM
    from exitrl.core.distributed import start, stop
    from exitrl.traces.build import build_trace
    from exitrl.traces.tokens import build_token_split

    world, device = join(rank, size, port)
    model, tokenizer, data = encoder(backbone, glue_dir)
    trace = build_trace(model, tokenizer, data, 64, device, batch_size=4)
    generator = torch.Generator().manual_seed(0)
    chunks = [{"input_ids": torch.randint(5, 60, (12,), generator=generator).tolist()} for _ in range(5)]
    tokens = build_token_split(MultiExitLM(AutoModelForCausalLM.from_pretrained(lm)), chunks, 4, 8, batch_size=2)
    losses: list[float] = []
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    train(model, tokenizer, data, device, lambda step, loss, last: losses.append(loss.item()))
    sharded = {"losses": losses, "weights": model.state_dict()}
    if world.active:
        start(device, sharding="fsdp")
        twin, tokenizer, data = encoder(backbone, glue_dir)
        sharded = {"losses": [], "kinds": set()}
        train(twin, tokenizer, data, device, lambda step, loss, last: sharded["losses"].append(loss.item()),
              after_backward=lambda trained, weight: sharded["kinds"].add(kind(trained)))
        sharded["weights"], sharded["trained"] = twin.state_dict(), sorted(sharded.pop("kinds"))
    lm_model, lm_losses, lm_kinds = tied_lm(lm), [], set()
    train_lm(lm_model, AutoTokenizer.from_pretrained(lm), device,
             lambda step, loss, last: lm_losses.append(loss.item()),
             after_backward=lambda trained, weight: lm_kinds.add(kind(trained)))
    if world.is_main:
        torch.save({"fsdp": sharded, "lm": {"losses": lm_losses, "weights": lm_model.state_dict(),
                                            "trained": sorted(lm_kinds)},
                    "trace": {name: split.states for name, split in trace.splits.items()},
                    "logits": {name: split.logits for name, split in trace.splits.items()},
                    "tokens": {"states": tokens.states, "logits": tokens.logits, "labels": tokens.labels},
                    "losses": losses, "weights": model.state_dict(), "world": world.size,
                    "moved": max(float((value - initial[name]).abs().max()) for name, value in
                                 model.state_dict().items() if value.is_floating_point())},
                   Path(out) / f"result_{size}.pt")
    stop()


class Killed(Exception):
    """Stands for a killed job: raised in every process at the same step."""


def interrupted(rank: int, size: int, port: int, backbone: str, glue_dir: str, out: str, stop_at: int,
                sharding: str = "ddp", dropout: float = 0.0) -> None:
    """Train with a checkpoint after every step: stop at step ``stop_at`` (0: never), or finish and save the
    weights and the steps this run took (a rerun resumes from the checkpoint it finds)."""
    from exitrl.core.checkpoint import Checkpoints
    from exitrl.core.distributed import start, stop

    world, device = join(rank, size, port)
    start(device, sharding)
    model, tokenizer, data = encoder(backbone, glue_dir, dropout)

    steps: list[int] = []

    def on_step(step, loss, last) -> None:
        if step == stop_at:
            raise Killed
        steps.append(step)

    try:
        train(model, tokenizer, data, device, on_step, Checkpoints(Path(out) / "checkpoint.pt", 0.0, work="w"))
        if world.is_main:
            torch.save({"weights": model.state_dict(), "steps": steps}, Path(out) / "weights.pt")
    except Killed:
        pass
    stop()


def sharded(rank: int, size: int, port: int, backbone: str, glue_dir: str, out: str) -> None:
    """Train the encoder with ``distributed.sharding=fsdp`` (one process: the plain path); save losses and weights."""
    from exitrl.core.distributed import start, stop

    world, device = join(rank, size, port)
    start(device, "fsdp")
    model, tokenizer, data = encoder(backbone, glue_dir)
    losses: list[float] = []
    train(model, tokenizer, data, device, lambda step, loss, last: losses.append(loss.item()))
    if world.is_main:
        torch.save({"losses": losses, "weights": model.state_dict()}, Path(out) / f"sharded_{size}.pt")
    stop()
