"""ConsistentEE's iterative training around any agent (``backbone.mode=cotrain``).

Round 0 is the ordinary run: a policy trained on the frozen backbone's trace. Each further round (1) trains the
backbone and heads with CE only at each example's exit layer, the layer a frozen `ExitPolicy` picks from the states
the backbone produces at that moment (ConsistentEE stage 4: heads stop spending capacity on examples they will
never answer), (2) rebuilds the trace, which recomputes every example's memorized layer, and (3) trains a fresh
policy of the same agent on the new trace. Per-layer train and dev accuracy and the policy's dev result are logged
for every round. The backbone is trained by the same loop as fine-tuning (`exitrl.backbones.training`), with one
stage and constant learning rates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from exitrl.backbones.batching import tokenize_split
from exitrl.backbones.losses import exit_layer_ce, weighted_ce
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.recipes.base import Progress, Stage, body_parameters
from exitrl.backbones.training import train_stages
from exitrl.core.checkpoint import Checkpoints, set_rng_state
from exitrl.core.distributed import all_sum, barrier, current_world, same_everywhere
from exitrl.data import TaskData
from exitrl.evaluation.evaluate import evaluate_policy, run_policy
from exitrl.policy import ExitPolicy, policy_from_payload
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.trace import SplitTrace, Trace

log = logging.getLogger(__name__)


@dataclass
class CotrainConfig:
    rounds: int = 1  # cycles of (train backbone under the policy, rebuild trace, retrain policy)
    epochs: int = 1  # backbone epochs per round
    lr: float = 3e-5  # ConsistentEE's joint learning rate
    head_lr: float = 3e-5  # the heads are trained already; the paper uses one joint rate
    batch_size: int = 16
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    # remedies, for when the exit-layer CE alone hurts the heads (measured on RTE and SST-2): keep the ordinary
    # weighted CE over every head beside it, with this weight; and keep the embeddings and the first k layers fixed
    keep_weighted_ce: float = 0.0
    freeze_layers: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.keep_weighted_ce < 0:
            raise ValueError(f"cotrain.keep_weighted_ce must be >= 0, got {self.keep_weighted_ce}.")
        if int(self.freeze_layers) < 0:
            raise ValueError(f"cotrain.freeze_layers must be >= 0, got {self.freeze_layers}.")


def trainable_body(model: MultiExitModel, freeze_layers: int) -> list[torch.nn.Parameter]:
    """The body's parameters that co-training moves: all, or all but the embeddings and the first ``freeze_layers``
    layers (a layer shared across depth, as in ALBERT, is then frozen at every depth)."""
    if freeze_layers >= model.num_layers:
        raise ValueError(f"cotrain.freeze_layers={freeze_layers} would freeze all {model.num_layers} layers; use "
                         f"at most {model.num_layers - 1}.")
    if freeze_layers == 0:
        return body_parameters(model)
    frozen = {id(p) for module in (model.embeddings, *model.layers[:freeze_layers]) for p in module.parameters()}
    return [p for p in body_parameters(model) if id(p) not in frozen]


def drop_unreached(model: MultiExitModel, exit_layers: torch.Tensor, counted: bool = True) -> None:
    """Clear the gradients of layers above the deepest exit and of heads no row exited at: they got no signal
    (only zeros from stacking), and AdamW would otherwise still move them (weight decay, momentum). Under several
    processes "reached" means by a row of any process (their gradients were averaged), so all clear the same; a
    process's filler row (weight 0, ``counted`` False) reaches nothing."""
    local = torch.bincount(exit_layers - 1, minlength=model.num_layers) * int(counted)  # NCCL: stays on the GPU
    histogram = all_sum(local).cpu()
    deepest = int(histogram.nonzero().max()) + 1
    reached = {id(model.layers[i]) for i in range(deepest)}  # ALBERT shares one layer across depths
    unreached = [model.layers[i] for i in range(deepest, model.num_layers) if id(model.layers[i]) not in reached]
    if not model.shared_heads:  # a shared head (LayerSkip) got signal from every layer where rows exited
        unreached += [model.heads[i] for i in range(model.num_layers) if histogram[i] == 0]
    for module in unreached:
        for parameter in module.parameters():
            parameter.grad = None


def cotrain_backbone(model: MultiExitModel, tokenizer, train_split, policy: ExitPolicy, cfg: CotrainConfig,
                     device: torch.device, max_length: int = 128, writer=None, step: int = 0,
                     checkpoints: Checkpoints | None = None) -> dict:
    """``cfg.epochs`` epochs over ``train_split`` (a `datasets` split); returns the exit-layer histogram seen and
    the last step, so that successive rounds log on one TensorBoard axis. ``checkpoints``: as in `train_stages`."""
    examples = tokenize_split(tokenizer, train_split, max_length)
    model.to(device).train()
    policy = policy.to(device)
    carry = {"exits": torch.zeros(model.num_layers, dtype=torch.long)}  # saved with each checkpoint
    latest: dict[str, torch.Tensor] = {}

    def loss_at_exits(model: MultiExitModel, batch: dict, labels: torch.Tensor, progress: Progress) -> torch.Tensor:
        out = model(**batch)
        with torch.autocast(torch.device(device).type, enabled=False):  # the policy decides in full precision
            seen = SplitTrace.from_logits(out.pooled.detach().float(), out.logits.detach().float(), labels)
            exit_layers, _ = run_policy(policy, seen)  # the frozen policy picks where each example exits
            latest["exit_layers"] = exit_layers
            loss = exit_layer_ce(out.logits.float(), labels, exit_layers - 1)
            if cfg.keep_weighted_ce:
                loss = loss + cfg.keep_weighted_ce * weighted_ce(out.logits.float(), labels)
            return loss

    def count_and_log(step: int, loss: torch.Tensor, last: bool) -> None:
        exit_layers = latest["exit_layers"]
        carry["exits"].add_(torch.bincount(exit_layers.cpu() - 1, minlength=model.num_layers))
        if writer is not None and (step % 10 == 0 or last):
            writer.add_scalar("cotrain/loss", loss.item(), step)
            writer.add_scalar("cotrain/avg_exit_layer", exit_layers.float().mean().item(), step)

    moving = trainable_body(model, int(cfg.freeze_layers))  # the rest of the body is frozen by the stage

    def after_backward(trained: MultiExitModel, weight: float) -> None:
        if not cfg.keep_weighted_ce:  # with the weighted CE every layer and head gets signal
            drop_unreached(trained, latest["exit_layers"], counted=weight > 0)

    stage = Stage("cotrain", cfg.epochs, [{"params": moving, "lr": cfg.lr},
                                          {"params": list(model.heads.parameters()), "lr": cfg.head_lr}], loss_at_exits)
    step = train_stages(model, tokenizer, examples, [stage], batch_size=cfg.batch_size, device=device,
                        generator=torch.Generator().manual_seed(cfg.seed + step), clip_norm=cfg.clip_norm,
                        weight_decay=cfg.weight_decay, warmup_ratio=None, desc="co-train backbone (CE at exit layer)",
                        step=step, on_step=count_and_log,
                        after_backward=after_backward, checkpoints=checkpoints, carry=carry)
    return {"exit_histogram": carry["exits"].tolist(), "step": step}


def round_record(index: int, trace: Trace, policy: ExitPolicy, metric: str, seconds: float, **extra) -> dict:
    record = {"round": index, "train_per_layer": trace["train"].per_layer_accuracy(), **extra,
              "seconds": round(seconds, 1)}
    if "dev" in trace.splits:
        record["dev_per_layer"] = trace["dev"].per_layer_accuracy()
        record["policy_dev"] = evaluate_policy(policy, trace["dev"], metric)
    return record


def log_round(writer, record: dict) -> None:
    if writer is None:  # a process other than 0
        return
    index = record["round"]
    for i, accuracy in enumerate(record["train_per_layer"]):
        writer.add_scalar(f"cotrain/train_accuracy_layer{i + 1}", accuracy, index)
    for i, accuracy in enumerate(record.get("dev_per_layer", [])):
        writer.add_scalar(f"cotrain/dev_accuracy_layer{i + 1}", accuracy, index)
    for key in ("score", "speedup"):
        if "policy_dev" in record:
            writer.add_scalar(f"cotrain/policy_dev_{key}", record["policy_dev"][key], index)


def cotrain_rounds(model: MultiExitModel, tokenizer, data: TaskData, trace: Trace, policy: ExitPolicy,
                   train_agent: Callable[[Trace, object, Checkpoints | None], tuple[ExitPolicy, dict]],
                   cfg: CotrainConfig, cache_dir: str | Path, device, max_length: int, run_dir: Path, writer,
                   metric: str, checkpoints: Callable[[str], Checkpoints] | None = None,
                   ) -> tuple[Trace, ExitPolicy, dict, list[dict]]:
    """Run ``cfg.rounds`` rounds after round 0; ``train_agent(trace, writer, checkpoints)`` trains a policy on a
    trace. Returns the last trace, policy, agent record, and one record per round (round 0 included).

    ``checkpoints(name)`` gives the checkpoint file of one piece of work: ``rounds`` is saved after every round
    (the backbone, the policy, the records, every RNG); within a round the backbone's training and the agent's
    checkpoint as they do alone. A run that finds them continues from where it was killed. Under torchrun every
    process reads the same files (so all resume at the same round and step) and process 0 alone writes them."""
    main = current_world().is_main
    records = [round_record(0, trace, policy, metric, 0.0)]
    log_round(writer, records[0])
    agent_info, step, first = {}, 0, 1
    objective = trace.meta.get("objective", "weighted_ce")  # the recipe the backbone was fine-tuned with
    finished = checkpoints("rounds") if checkpoints is not None else None
    resumed = finished.load() if finished is not None else None
    same_everywhere(None if resumed is None else resumed["round"], "the co-training round checkpoint found")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        policy = policy_from_payload(resumed["policy"])
        agent_info, step, records = resumed["agent_info"], resumed["step"], resumed["records"]
        first = resumed["round"] + 1
        trace = load_or_build_trace(model, tokenizer, data, cache_dir, device, max_length, objective=objective)
        set_rng_state(resumed["rng"])
    for index in range(first, cfg.rounds + 1):
        start = time.time()
        backbone_checkpoints = checkpoints(f"backbone_round{index}") if checkpoints is not None else None
        agent_checkpoints = checkpoints(f"agent_round{index}") if checkpoints is not None else None
        seen = cotrain_backbone(model, tokenizer, data.splits["train"], policy, cfg, device, max_length, writer, step,
                                backbone_checkpoints)
        step = seen["step"]
        trace = load_or_build_trace(model, tokenizer, data, cache_dir, device, max_length, objective=objective)
        # process 0 (or the only process) logs the round's agent; other processes have no writer
        round_writer = SummaryWriter(str(run_dir / "tensorboard" / f"cotrain_round{index}")) if writer else None
        policy, agent_info = train_agent(trace, round_writer, agent_checkpoints)
        if round_writer is not None:
            round_writer.close()
        records.append(round_record(index, trace, policy, metric, time.time() - start,
                                    cotrain_exit_histogram=seen["exit_histogram"]))
        log_round(writer, records[-1])
        log.info("co-training round %d: train per layer %s", index,
                 " ".join(f"{100 * a:.1f}" for a in records[-1]["train_per_layer"]))
        if finished is not None and main:  # a round takes minutes: always worth one save (the caller clears the last)
            finished.save({"round": index, "model": model.state_dict(), "policy": policy.payload(),
                           "agent_info": agent_info, "step": step, "records": records})
        barrier()  # under torchrun: nobody starts the next round before process 0 has saved this one
        for done in (backbone_checkpoints, agent_checkpoints):
            if done is not None and main:
                done.clear()  # the round's result is in ``finished`` (or, after the last round, with the caller)
    return trace, policy, agent_info, records
