"""The metric contract, one function for every policy: walk a policy over a trace split and summarise its exits
(`exitrl.core.metrics`: task metric, mean exit layer, speedup, saved layers, histogram). `oracle_bounds` gives the
analysis-only references: the consistency oracle (first layer whose prediction equals the last layer's; keeps the full
model's predictions, so its saving bounds every no-loss policy) and the correctness oracle.
"""

from __future__ import annotations

import torch

from exitrl.core.metrics import EVAL_KEYS, log_eval, summarize_exits, task_metric
from exitrl.evaluation.tradeoff import oracle_frontier
from exitrl.evaluation.walk import TraceSource, walk
from exitrl.policy import ExitPolicy
from exitrl.traces.trace import SplitTrace

__all__ = [  # the contract's numbers live in exitrl.core.metrics; evaluation re-exports them for its callers
    "EVAL_KEYS", "ORACLE_KINDS", "consistency_risks", "evaluate_policy", "log_eval", "oracle_bounds",
    "oracle_exit_layers", "run_policy", "summarize_exits", "task_metric",
]


@torch.no_grad()
def run_policy(policy: ExitPolicy, trace: SplitTrace, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk the trace layer by layer with compaction (`exitrl.evaluation.walk`, the runtime's loop); returns exit
    layers and
    predictions. The policy is moved to the trace's device (a policy trained on the GPU meets a CPU trace)."""
    device = trace.logits.device
    policy = policy.to(device)
    exit_layers = torch.empty(len(trace), dtype=torch.long, device=device)
    predictions = torch.empty(len(trace), dtype=torch.long, device=device)
    for start in range(0, len(trace), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(trace)), device=device)
        exits = walk(policy, TraceSource(trace, rows), rows.numel(), device, ids=rows, split_size=len(trace))
        exit_layers[rows], predictions[rows] = exits.layers, exits.predictions
    return exit_layers, predictions


def consistency_risks(predictions: torch.Tensor, trace: SplitTrace) -> dict:
    """CALM's two risks against the full model: ``disagreement`` (prediction differs from the last layer's) and
    ``loss_increase`` (0/1 loss over the full model's: wrong here where the full model was right)."""
    full = trace.prediction_table()[:, -1].to(predictions.device)
    labels = trace.labels.to(predictions.device)
    worse = (predictions != labels) & (full == labels)
    return {"disagreement": float((predictions != full).float().mean()),
            "loss_increase": float(worse.float().mean())}


def evaluate_policy(policy: ExitPolicy, trace: SplitTrace, metric: str = "accuracy") -> dict:
    """The metric contract, plus the consistency risks, for one policy on one split."""
    return evaluate_exits(policy, trace, metric)[0]


def evaluate_exits(policy: ExitPolicy, trace: SplitTrace, metric: str = "accuracy") -> tuple[dict, dict]:
    """`evaluate_policy`'s result and the per-example exits behind it (``layers`` int16 and ``predictions`` int32, on
    the CPU), which the honest comparison (`exitrl.evaluation.protocol`) resamples."""
    exit_layers, predictions = run_policy(policy, trace)
    result = summarize_exits(exit_layers, predictions, trace.labels, trace.num_layers, metric)
    result.update(consistency_risks(predictions, trace))
    result["deployable"] = policy.deployable
    return result, {"layers": exit_layers.cpu().to(torch.int16), "predictions": predictions.cpu().to(torch.int32)}


ORACLE_KINDS = ("consistency", "correctness")


def oracle_exit_layers(trace: SplitTrace, kind: str) -> torch.Tensor:
    """1-indexed exit layer of every row under an oracle: ``consistency`` = first layer agreeing with the last
    one, ``correctness`` = first correct layer (the last when none is)."""
    preds = trace.prediction_table()
    if kind == "consistency":
        return (preds == preds[:, -1:]).int().argmax(1) + 1  # the last layer always agrees with itself
    if kind == "correctness":
        correct = preds == trace.labels[:, None]
        return torch.where(correct.any(1), correct.int().argmax(1) + 1, trace.num_layers)
    raise ValueError(f"Unknown oracle kind {kind!r}; valid: {', '.join(ORACLE_KINDS)}.")


def oracle_bounds(trace: SplitTrace, metric: str = "accuracy") -> dict:
    """Full model, per-layer scores and the two oracles (analysis only, never deployable)."""
    preds = trace.prediction_table()  # [N, L]
    num_layers = trace.num_layers
    rows = torch.arange(len(trace), device=preds.device)
    bounds = {
        "full_model": summarize_exits(torch.full_like(trace.labels, num_layers), preds[:, -1], trace.labels,
                                      num_layers, metric),
        "per_layer_score": [task_metric(preds[:, i], trace.labels, metric) for i in range(num_layers)],
    }
    for kind in ORACLE_KINDS:
        layers = oracle_exit_layers(trace, kind)
        bounds[f"{kind}_oracle"] = summarize_exits(layers, preds[rows, layers - 1], trace.labels, num_layers, metric)
    bounds["oracle_frontier"] = oracle_frontier(trace, metric)
    return bounds
