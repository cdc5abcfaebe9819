"""ConsistentEE's iterative training around any agent (``backbone.mode=cotrain``).

Round 0 is the ordinary run: a policy trained on the frozen backbone's trace. Each further round (1) trains the
backbone and heads with CE only at the exit layers the frozen policy picks, (2) rebuilds the trace, which
recomputes every example's memorized layer, and (3) trains a fresh policy of the same agent on the new trace.
Per-layer train and dev accuracy and the policy's dev result are logged for every round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from exitrl.backbones.cotrain import CotrainConfig, cotrain_backbone
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.data import TaskData
from exitrl.evaluate import evaluate_policy
from exitrl.policy import ExitPolicy
from exitrl.trace import Trace, load_or_build_trace

log = logging.getLogger(__name__)


def round_record(index: int, trace: Trace, policy: ExitPolicy, metric: str, seconds: float, **extra) -> dict:
    record = {"round": index, "train_per_layer": trace["train"].per_layer_accuracy(), **extra,
              "seconds": round(seconds, 1)}
    if "dev" in trace.splits:
        record["dev_per_layer"] = trace["dev"].per_layer_accuracy()
        record["policy_dev"] = evaluate_policy(policy, trace["dev"], metric)
    return record


def log_round(writer, record: dict) -> None:
    index = record["round"]
    for i, accuracy in enumerate(record["train_per_layer"]):
        writer.add_scalar(f"cotrain/train_accuracy_layer{i + 1}", accuracy, index)
    for i, accuracy in enumerate(record.get("dev_per_layer", [])):
        writer.add_scalar(f"cotrain/dev_accuracy_layer{i + 1}", accuracy, index)
    for key in ("score", "speedup"):
        if "policy_dev" in record:
            writer.add_scalar(f"cotrain/policy_dev_{key}", record["policy_dev"][key], index)


def cotrain_rounds(model: MultiExitModel, tokenizer, data: TaskData, trace: Trace, policy: ExitPolicy,
                   train_agent: Callable[[Trace, object], tuple[ExitPolicy, dict]], cfg: CotrainConfig,
                   cache_dir: str | Path, device, max_length: int, run_dir: Path, writer,
                   metric: str) -> tuple[Trace, ExitPolicy, dict, list[dict]]:
    """Run ``cfg.rounds`` rounds after round 0; ``train_agent(trace, writer)`` trains a policy on a trace.
    Returns the last trace, policy, agent record, and one record per round (round 0 included)."""
    records = [round_record(0, trace, policy, metric, 0.0)]
    log_round(writer, records[0])
    agent_info, step = {}, 0
    objective = trace.meta.get("objective", "weighted_ce")  # the recipe the backbone was fine-tuned with
    for index in range(1, cfg.rounds + 1):
        start = time.time()
        seen = cotrain_backbone(model, tokenizer, data.splits["train"], policy, cfg, device, max_length, writer, step)
        step = seen["step"]
        trace = load_or_build_trace(model, tokenizer, data, cache_dir, device, max_length, objective=objective)
        round_writer = SummaryWriter(str(run_dir / "tensorboard" / f"cotrain_round{index}"))
        policy, agent_info = train_agent(trace, round_writer)
        round_writer.close()
        records.append(round_record(index, trace, policy, metric, time.time() - start,
                                    cotrain_exit_histogram=seen["exit_histogram"]))
        log_round(writer, records[-1])
        log.info("co-training round %d: train per layer %s", index,
                 " ".join(f"{100 * a:.1f}" for a in records[-1]["train_per_layer"]))
    return trace, policy, agent_info, records
