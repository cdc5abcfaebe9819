"""The Python API beside the CLIs' own (``exitrl.train``, ``exitrl.sweep``, ``exitrl.compare``): a Gymnasium env
or a trace for a task, built by the same pipeline and defaults as ``python -m exitrl.train``."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
from omegaconf import DictConfig, OmegaConf

from exitrl.cli import compose_config, overrides_from
from exitrl.core.device import pick_device
from exitrl.core.splits import HELD_OUT
from exitrl.envs import ENV_ID
from exitrl.experiments.pipeline import Prepared, prepare
from exitrl.experiments.runs import Run
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import Trace

SPLIT_NAMES = {"train": "train", "dev": "dev", "held_out": HELD_OUT, HELD_OUT: HELD_OUT}


def prepared_task(env: str, overrides: list[str] = (), **options) -> tuple[DictConfig, Prepared]:
    """Fine-tune (or reuse) the backbone of ``env`` and trace it (or reuse the trace), as a train run would."""
    cfg = compose_config([f"env={env}", *overrides, *overrides_from(options)])
    return cfg, prepare(cfg, pick_device(cfg.device))


def task_trace(env: str = "rte", overrides: list[str] = (), **options) -> Trace:
    """The trace a train run on ``env`` with these options would use."""
    return prepared_task(env, overrides, **options)[1].trace


def load_trace(source: str | Path, **options) -> Trace:
    """A trace from a run folder (exported or cached), a trace file, or a task name (``options`` as in `train`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Run.load(path).trace(options.get("cache_dir"))
    if path.is_file():
        return Trace.load(path)
    return task_trace(str(source), **options)


def make_env(env: str = "rte", split: str = "train", reward: RewardSpec | str | dict | None = None,
             **options) -> gym.Env:
    """The registered ``exitrl/EarlyExit-v0`` env over one split (``train``, ``dev`` or ``held_out``) of ``env``'s
    trace. ``reward`` is a `RewardSpec`, a built-in name, an import path, or overrides of the config's reward
    (``{"alpha": 0.02}``); None keeps the config's."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"Unknown split {split!r}; valid: train, dev, held_out.")
    if isinstance(reward, dict):
        options, reward = {**options, "reward": reward}, None
    cfg, prepared = prepared_task(env, **options)
    trace = prepared.trace
    spec = RewardSpec.coerce(reward) if reward is not None else RewardSpec.from_config(
        OmegaConf.to_container(cfg.reward, resolve=True))
    return gym.make(ENV_ID, trace=trace[SPLIT_NAMES[split]], reward=spec)
