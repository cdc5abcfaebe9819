"""What every run leaves in TensorBoard, the same for every agent: the ``eval/*`` scalars, the ``exit/layer``
histogram, its hyperparameters and final metrics through the hparams plugin (so runs sort and filter by agent,
alpha, threshold, ...), and one custom-scalars layout that puts the same key of every agent on one chart."""

from __future__ import annotations

import torch
from torch.utils.tensorboard.summary import hparams

from exitrl.core.metrics import EVAL_KEYS, log_eval

LAYOUT = {
    "exit policy (every run)": {
        "task metric": ["Multiline", ["eval/score"]],
        "accuracy": ["Multiline", ["eval/accuracy"]],
        "layer speedup": ["Multiline", ["eval/speedup"]],
        "saved layers": ["Multiline", ["eval/saved_layers"]],
        "mean exit layer": ["Multiline", ["eval/avg_exit_layer"]],
    },
    "training (learned agents)": {
        "reward": ["Multiline", ["train/reward", "rollout/ep_rew_mean"]],
        "policy loss": ["Multiline", ["train/policy_loss", "train/policy_gradient_loss"]],
        "entropy": ["Multiline", ["train/entropy", "train/entropy_loss"]],
        "exit layer while training": ["Multiline", ["train/avg_exit_layer"]],
        "bandit regret": ["Multiline", ["train/regret", "train/regret_to_oracle"]],
    },
}


def flat_hparams(values: dict, prefix: str = "") -> dict:
    """Scalars only (the plugin takes int, float, str, bool); nested dicts become dotted keys, lists strings."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def log_run_summary(writer, result: dict, num_layers: int, hyperparameters: dict, step: int = 0) -> None:
    """Final ``eval/*`` scalars, the exit-layer histogram, hparams and the shared layout, into ``writer``'s run."""
    if writer is None:
        return
    log_eval(writer, result, step)
    layers = torch.cat([torch.full((c,), i + 1) for i, c in enumerate(result["exit_histogram"])])
    writer.add_histogram("exit/layer", layers, step, bins=torch.arange(0.5, num_layers + 1).tolist())
    experiment, start, end = hparams(flat_hparams(hyperparameters), {f"eval/{k}": result[k] for k in EVAL_KEYS})
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary)
    writer.add_custom_scalars(LAYOUT)
    writer.flush()
