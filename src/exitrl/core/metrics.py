"""The numbers of the metric contract, from exit layers and predictions: the task metric (accuracy, or F1 of the
positive class for MRPC), mean exit layer, layer speedup L / mean exit layer, saved layers 1 − mean / L and the
histogram of exit layers. Every evaluation, trade-off curve and oracle computes them here."""

from __future__ import annotations

import torch

METRICS = ("accuracy", "f1")
EVAL_KEYS = ("accuracy", "score", "avg_exit_layer", "speedup", "saved_layers")  # the eval/* TensorBoard scalars


def task_metric(predictions: torch.Tensor, labels: torch.Tensor, metric: str = "accuracy") -> float:
    predictions, labels = predictions.cpu(), labels.cpu()
    if metric == "accuracy":
        return float((predictions == labels).float().mean())
    if metric == "f1":
        tp = float(((predictions == 1) & (labels == 1)).sum())
        fp = float(((predictions == 1) & (labels != 1)).sum())
        fn = float(((predictions != 1) & (labels == 1)).sum())
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(METRICS)}.")


def summarize_exits(exit_layers: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, num_layers: int,
                    metric: str = "accuracy") -> dict:
    """The contract's numbers from 1-indexed exit layers and the predictions made there."""
    mean_layer = float(exit_layers.float().mean())
    return {
        "metric": metric,
        "score": task_metric(predictions, labels, metric),
        "accuracy": task_metric(predictions, labels, "accuracy"),
        "avg_exit_layer": mean_layer,
        "speedup": num_layers / mean_layer,
        "saved_layers": 1.0 - mean_layer / num_layers,
        "exit_histogram": torch.bincount(exit_layers.cpu() - 1, minlength=num_layers).tolist(),
        "num_examples": int(labels.shape[0]),
    }


def log_eval(writer, metrics: dict, step: int) -> None:
    """The same eval/* scalars for every agent, so TensorBoard groups them across runs."""
    if writer is not None:
        for key in EVAL_KEYS:
            writer.add_scalar(f"eval/{key}", metrics[key], step)
