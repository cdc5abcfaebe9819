"""ConsistentEE stage 4: train the backbone and exit heads with CE only at each example's exit layer, the exit
layer chosen by a frozen `ExitPolicy` from the states the backbone produces at that moment.

Each head is then trained on the examples the policy sends to it, so heads stop spending capacity on examples
they will never answer (the paper's argument against training every head on every example).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from exitrl.backbones.batching import iterate_batches, tokenize_split
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.objectives import exit_layer_ce
from exitrl.device import autocast
from exitrl.evaluate import run_policy
from exitrl.policy import ExitPolicy
from exitrl.trace import SplitTrace


@dataclass
class CotrainConfig:
    rounds: int = 1  # cycles of (train backbone under the policy, rebuild trace, retrain policy)
    epochs: int = 1  # backbone epochs per round
    lr: float = 3e-5  # ConsistentEE's joint learning rate
    head_lr: float = 3e-5  # the heads are trained already; the paper uses one joint rate
    batch_size: int = 16
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0


def drop_unreached(model: MultiExitModel, exit_layers: torch.Tensor) -> None:
    """Clear the gradients of layers above the deepest exit and of heads no row exited at: they got no signal
    (only zeros from stacking), and AdamW would otherwise still move them (weight decay, momentum)."""
    histogram = torch.bincount(exit_layers.cpu() - 1, minlength=model.num_layers)
    deepest = int(histogram.nonzero().max()) + 1
    unreached = [model.layers[i] for i in range(deepest, model.num_layers)]
    if not model.shared_heads:  # a shared head (LayerSkip) got signal from every layer where rows exited
        unreached += [model.heads[i] for i in range(model.num_layers) if histogram[i] == 0]
    for module in unreached:
        for parameter in module.parameters():
            parameter.grad = None


def cotrain_backbone(model: MultiExitModel, tokenizer, train_split, policy: ExitPolicy, cfg: CotrainConfig,
                     device: torch.device, max_length: int = 128, writer=None, step: int = 0) -> dict:
    """``cfg.epochs`` epochs over ``train_split`` (a `datasets` split); returns the exit-layer histogram seen and
    the last step, so that successive rounds log on one TensorBoard axis."""
    examples = tokenize_split(tokenizer, train_split, max_length)
    model.to(device).train()
    policy = policy.to(device)
    head_ids = {id(p) for p in model.heads.parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": list(model.heads.parameters()),
                                   "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed + step)
    exits = torch.zeros(model.num_layers, dtype=torch.long)
    total = cfg.epochs * ((len(examples) + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=total, desc="co-train backbone (CE at exit layer)", unit="batch")
    for _ in range(cfg.epochs):
        for batch in iterate_batches(tokenizer, examples, cfg.batch_size, device, shuffle=True, generator=generator):
            labels = batch.pop("labels")
            with autocast(device):
                out = model(**batch)
            seen = SplitTrace.from_logits(out.pooled.detach().float(), out.logits.detach().float(), labels)
            exit_layers, _ = run_policy(policy, seen)  # the frozen policy picks where each example exits
            loss = exit_layer_ce(out.logits.float(), labels, exit_layers - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            drop_unreached(model, exit_layers)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            step += 1
            exits += torch.bincount(exit_layers.cpu() - 1, minlength=model.num_layers)
            bar.update(1)
            if writer is not None and (step % 10 == 0 or bar.n == total):
                writer.add_scalar("cotrain/loss", loss.item(), step)
                writer.add_scalar("cotrain/avg_exit_layer", exit_layers.float().mean().item(), step)
    bar.close()
    model.eval()
    return {"exit_histogram": exits.tolist(), "step": step}
