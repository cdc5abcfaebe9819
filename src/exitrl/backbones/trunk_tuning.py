"""Light trunk tuning: the second arm of exit-ready LMs, measured beside frozen-trunk exit adapters.

The trunk gets low-rank deltas (`exitrl.backbones.trunk_lora`) trained so that every exit's next-token
distribution matches the *original* model's last layer, while the tuned last layer is held near the original by
an anchor term:

    loss = Σ_exits KL(p_orig,L ‖ p_E) + anchor · KL(p_orig,L ‖ p_L)

(per position, times temperature²). The teacher p_orig,L is the same model with its deltas switched off, under
``no_grad``: no second copy of the weights. Unlike the frozen arm, the full model's output may move; `last_layer_drift`
says how far (greedy agreement with the original model, and both perplexities on held-out text), to be reported
beside what the exits gain (`exitrl.backbones.exit_distillation.exit_agreement`). Exit adapters, when given, are
trained in the same steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exitrl.backbones.exit_adapters import ExitAdapters, check_exit_layers
from exitrl.backbones.exit_distillation import (
    KL_KINDS,
    BatchOrder,
    apply_gradients,
    check_sequences,
    check_settings,
    kl_sum,
    learning_rate,
    positions_of,
)
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.backbones.trunk_lora import TrunkLoRA
from exitrl.core.device import autocast


@dataclass
class TrunkTuneConfig:
    """How `tune_trunk` trains (checked on construction, each error naming its key)."""

    tokens: int = 1_000_000  # token positions to train on; steps = ceil(tokens / (batch × T))
    batch_size: int = 16
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    rank: int = 8
    alpha: float = 16.0
    anchor: float = 1.0  # weight of KL(original last ‖ tuned last): 0 lets the last layer go where the exits pull
    kl: str = "full"
    top_k: int = 64
    temperature: float = 1.0
    chunk: int = 1024  # positions per vocabulary-sized matrix in the loss
    clip_norm: float = 1.0
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        check_settings(self, ("tokens", "batch_size", "rank", "top_k", "chunk", "log_every"),
                       (("lr", self.lr > 0, "> 0"), ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                        ("alpha", self.alpha > 0, "> 0"), ("anchor", self.anchor >= 0, ">= 0"),
                        ("temperature", self.temperature > 0, "> 0"), ("clip_norm", self.clip_norm >= 0, ">= 0")))
        if self.kl not in KL_KINDS:
            raise ValueError(f"TrunkTuneConfig.kl must be one of {', '.join(KL_KINDS)}, got {self.kl!r}.")


def tune_trunk(model: MultiExitLM, exit_layers, sequences: torch.Tensor, cfg: TrunkTuneConfig,
               device: torch.device | str = "cpu", attention_mask: torch.Tensor | None = None,
               adapters: ExitAdapters | None = None, max_seconds: float | None = None) -> tuple[TrunkLoRA, dict]:
    """Wrap ``model`` with fresh deltas (`TrunkLoRA`) and train them (and ``adapters``, if given) on ``sequences``;
    the deltas stay wrapped and active when this returns. Returns the deltas and ``{"steps", "tokens", "seconds",
    "tokens_per_second", "losses", "finished"}``."""
    check_sequences(sequences, attention_mask)
    exits = check_exit_layers(exit_layers, model.num_layers)
    if adapters is not None:
        adapters.check_fits(model)
        if tuple(adapters.exit_layers) != exits:
            raise ValueError(f"adapters are for exits {list(adapters.exit_layers)}, exit_layers is {list(exits)}: "
                             "they must match.")
    device = torch.device(device)
    mask = torch.ones_like(sequences) if attention_mask is None else attention_mask.long()
    rows, length = sequences.shape
    steps = max(1, math.ceil(cfg.tokens / (cfg.batch_size * length)))
    order = BatchOrder(rows, cfg.batch_size, cfg.seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}  # the trunk's own, put back at the end
    model.requires_grad_(False)
    model.eval().to(device, torch.bfloat16 if device.type == "cuda" else None)
    torch.manual_seed(cfg.seed)
    lora = TrunkLoRA(model, cfg.rank, cfg.alpha)
    parameters = lora.parameters_to_train()
    attached = model.exit_adapters
    model.attach_exit_adapters(None)
    if adapters is not None:
        adapters.to(device).train()
        parameters += [p for p in adapters.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    losses, pending, step = [], [], 0
    began = time.perf_counter()
    try:
        while step < steps:
            if max_seconds is not None and time.perf_counter() - began >= max_seconds:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps)
            picked = order(step)
            pending.append(_tune_step(model, lora, adapters, exits, sequences[picked].to(device),
                                      mask[picked].to(device), cfg, device))
            apply_gradients(optimizer, parameters, cfg.clip_norm)
            step += 1
            if step % cfg.log_every == 0 or step == steps:
                losses.append({"step": step, "loss": float(torch.stack(pending).mean())})
                pending = []
    finally:
        model.attach_exit_adapters(attached)
        if adapters is not None:
            adapters.eval()
        lora.enabled(True)
        for parameter in model.parameters():
            if id(parameter) in flags:
                parameter.requires_grad_(flags[id(parameter)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    tokens = step * cfg.batch_size * length
    return lora, {"steps": step, "steps_planned": steps, "tokens": tokens, "seconds": round(seconds, 3),
                  "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None, "losses": losses,
                  "finished": step >= steps}


def _tune_step(model: MultiExitLM, lora: TrunkLoRA, adapters: ExitAdapters | None, exits: tuple[int, ...],
               ids: torch.Tensor, mask: torch.Tensor, cfg: TrunkTuneConfig, device: torch.device) -> torch.Tensor:
    """One batch's gradients in the deltas (and adapters); returns the loss (detached)."""
    keep = mask.bool()
    positions = positions_of(mask)
    with torch.no_grad(), autocast(device):  # the teacher: the original model, deltas off
        lora.enabled(False)
        hidden, inputs = model.embed(ids, mask, None, positions)
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, inputs)
        teacher = hidden[keep]
        lora.enabled(True)
    with autocast(device):
        hidden, inputs = model.embed(ids, mask, None, positions)
        outputs, weights = [], []
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, inputs)
            if index + 1 in exits:
                state = hidden if adapters is None else adapters.adapt(index + 1, hidden, inputs)
                outputs.append((index, state[keep]))
                weights.append(1.0)
        if cfg.anchor > 0:
            outputs.append((model.num_layers - 1, hidden[keep]))
            weights.append(cfg.anchor)
    count = teacher.shape[0]
    scale = cfg.temperature ** 2 / count
    total = torch.zeros((), device=device)
    grads = []
    for (index, state), weight in zip(outputs, weights):
        detached = state.detach().requires_grad_(True)
        for first in range(0, count, cfg.chunk):
            part = slice(first, first + cfg.chunk)
            with autocast(device):
                with torch.no_grad():
                    target = model.exit_logits(model.num_layers - 1, teacher[part])
                loss = kl_sum(model.exit_logits(index, detached[part]), target, cfg.kl, cfg.top_k,
                              cfg.temperature) * scale * weight
            loss.backward()
            total += loss.detach()
        grads.append(detached.grad)
    torch.autograd.backward([state for _, state in outputs], grads)
    return total


@torch.no_grad()
def last_layer_drift(model: MultiExitLM, lora: TrunkLoRA, sequences: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, batch_size: int = 8,
                     device: torch.device | str = "cpu", exit_layers=()) -> dict:
    """How far the deltas moved the full model on ``sequences`` (held-out text), teacher-forced: the share of
    positions where its greedy next token is the original model's, and the perplexity of the text under each; with
    ``exit_layers``, also how often each tuned exit's greedy token is the *original* last layer's (what the exits
    were trained for; `exit_agreement` compares with the tuned last layer instead)."""
    check_sequences(sequences, attention_mask)
    device = torch.device(device)
    exits = check_exit_layers(exit_layers, model.num_layers) if exit_layers else ()
    mask = torch.ones_like(sequences) if attention_mask is None else attention_mask.long()
    agree, counted, nll = 0, 0, {"original": 0.0, "tuned": 0.0}
    exits_agree = dict.fromkeys(exits, 0)
    try:
        for first in range(0, sequences.shape[0], batch_size):
            ids, rows = sequences[first:first + batch_size].to(device), mask[first:first + batch_size].to(device)
            valid = (rows[:, :-1] * rows[:, 1:]).bool()
            targets = ids[:, 1:]
            greedy, exit_greedy = {}, {}
            for name, on in (("original", False), ("tuned", True)):
                lora.enabled(on)
                with autocast(device):
                    hidden, inputs = model.embed(ids, rows, None, positions_of(rows))
                    for index in range(model.num_layers):
                        hidden = model.run_layer(index, hidden, inputs)
                        if on and index + 1 in exits:
                            exit_greedy[index + 1] = model.exit_logits(index, hidden, inputs)[:, :-1].argmax(-1)
                    logits = model.exit_logits(model.num_layers - 1, hidden)[:, :-1].float()
                greedy[name] = logits.argmax(-1)
                nll[name] += float(F.cross_entropy(logits[valid], targets[valid], reduction="sum"))
            agree += int(((greedy["original"] == greedy["tuned"]) & valid).sum())
            for exit_layer, tokens in exit_greedy.items():
                exits_agree[exit_layer] += int(((tokens == greedy["original"]) & valid).sum())
            counted += int(valid.sum())
    finally:
        lora.enabled(True)
    if counted == 0:
        raise ValueError("last_layer_drift: no position to compare (every row is padding, or one token long).")
    return {"agreement_with_original": agree / counted, "perplexity_original": math.exp(nll["original"] / counted),
            "perplexity_tuned": math.exp(nll["tuned"] / counted), "positions": counted,
            "exits_agree_with_original": {e: n / counted for e, n in exits_agree.items()}}
