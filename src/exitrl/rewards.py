"""Rewards for exiting: functions of a batched `RewardContext`, chosen by config or by import path.

A reward is paid once per episode, when the example exits; continuing pays 0. A `RewardSpec` names one (a
built-in name or an import path, plus keyword arguments) and is the one form in which a reward travels from the
config to envs and agents. The built-ins' keyword defaults below are the only defaults (the ``reward`` config
group reads them). Every reward depends only on
(example, exit layer), so envs evaluate it once for every pair and replay it as a lookup; a reward that raises
or gives NaN/inf is therefore caught before any training step, with the offending rows named.

Depth convention: ``depth="layer"`` uses the 1-indexed exit layer l (as ConsistentEE's code, whose α lies in
about 0.01-0.09 for 12 layers); ``depth="fraction"`` uses l / L, which makes α comparable across depths.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exitrl.core.observation import exit_predictions
from exitrl.core.options import check_value

DEPTHS = ("layer", "fraction")


class RewardError(RuntimeError):
    """A reward function failed or returned non-finite values."""


@dataclass
class RewardContext:
    """What a reward may look at, for a batch of B exits.

    exit_layer: 1-indexed exit layer ``[B]``; num_layers: L; log_probs: exit head's log-softmax at the exit
    layer ``[B, C]``; label ``[B]``; memorized_layer ``[B]`` (1-indexed, ConsistentEE Eq. 7); final_prediction
    ``[B]``: what the last layer emits (the full model's answer, which a label-free consistency reward matches).
    For a token exit (a causal LM's: `exitrl.core.observation.TokenExit`) ``log_probs`` holds the top k and the rest,
    and ``token_prediction`` / ``token_label_log_prob`` the emitted token and log p_l(next token): read them through
    ``prediction``, ``correct``, ``label_log_prob`` and ``max_prob``, which work for both kinds.
    """

    exit_layer: torch.Tensor
    num_layers: int
    log_probs: torch.Tensor
    label: torch.Tensor
    memorized_layer: torch.Tensor
    final_prediction: torch.Tensor | None = None
    token_prediction: torch.Tensor | None = None
    token_label_log_prob: torch.Tensor | None = None

    @property
    def prediction(self) -> torch.Tensor:
        return self.log_probs.argmax(-1) if self.token_prediction is None else self.token_prediction

    @property
    def correct(self) -> torch.Tensor:
        return self.prediction == self.label

    @property
    def agrees_with_final(self) -> torch.Tensor:
        """Whether the exit emits what the last layer emits."""
        return self.prediction == self.final_prediction

    @property
    def label_log_prob(self) -> torch.Tensor:
        if self.token_label_log_prob is not None:
            return self.token_label_log_prob
        return self.log_probs.gather(1, self.label[:, None]).squeeze(1)

    @property
    def max_prob(self) -> torch.Tensor:
        if self.token_prediction is not None:  # the top-1 of a token exit (the rest's mass is not one token)
            return self.log_probs[:, 0].exp()
        return self.log_probs.exp().max(-1).values

    def depth(self, convention: str = "layer") -> torch.Tensor:
        if convention not in DEPTHS:
            raise ValueError(f"Unknown depth convention {convention!r}; valid: {', '.join(DEPTHS)}.")
        layer = self.exit_layer.float()
        return layer if convention == "layer" else layer / self.num_layers


def vanilla(ctx: RewardContext, alpha: float = 0.04, depth: str = "layer") -> torch.Tensor:
    """R = log p_l(y|x) - α·depth(l)."""
    return ctx.label_log_prob - alpha * ctx.depth(depth)


def hardness(ctx: RewardContext, alpha: float = 0.04, depth: str = "layer") -> torch.Tensor:
    """ConsistentEE hardness-guided: R = log p_l(y|x) - α·depth(l)·(1 - m/L); hard examples pay no depth cost."""
    easiness = 1.0 - ctx.memorized_layer.float() / ctx.num_layers
    return ctx.label_log_prob - alpha * ctx.depth(depth) * easiness


def confidence(ctx: RewardContext, alpha: float = 0.02, depth: str = "layer") -> torch.Tensor:
    """Label-free: R = max_c p_l(c|x) - α·depth(l). It uses no label, so it can be computed on a new domain's
    unlabelled traffic (online adaptation, as the bandit exit methods do)."""
    return ctx.max_prob - alpha * ctx.depth(depth)


def consistency(ctx: RewardContext, alpha: float = 0.02, depth: str = "layer") -> torch.Tensor:
    """Label-free: R = 1[the exit emits what the last layer emits] - α·depth(l). What greedy decoding needs: an
    exit that agrees with the full model leaves the generated text unchanged."""
    return ctx.agrees_with_final.float() - alpha * ctx.depth(depth)


def correct(ctx: RewardContext, alpha: float = 0.02, depth: str = "layer") -> torch.Tensor:
    """R = 1[the exit is right] - α·depth(l): the gain the reported accuracy counts, minus the cost. Unlike the
    log-probability rewards it does not punish a deep head's confident mistake more than it pays its accuracy, so
    its best policy is the one the accuracy / speed trade-off asks for."""
    return ctx.correct.float() - alpha * ctx.depth(depth)


BUILTIN_REWARDS: dict[str, Callable[..., torch.Tensor]] = {"vanilla": vanilla, "hardness": hardness,
                                                           "confidence": confidence, "consistency": consistency,
                                                           "correct": correct}


def resolve_reward(name: str | None = None, fn: str | None = None) -> Callable[..., torch.Tensor]:
    """A built-in reward by ``name``, or a user reward by import path ``package.module:function``."""
    if fn:
        module_name, sep, attr = fn.partition(":")
        if not sep or not module_name or not attr:
            raise RewardError(f"reward.fn={fn!r} must be an import path 'package.module:function'.")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardError(f"reward.fn={fn!r}: cannot import {module_name!r} ({err}). Is it on PYTHONPATH?") from err
        reward = getattr(module, attr, None)
        if not callable(reward):
            raise RewardError(f"reward.fn={fn!r}: {module_name} has no callable {attr!r}.")
        return reward
    if name not in BUILTIN_REWARDS:
        raise RewardError(f"Unknown reward {name!r}; valid: {', '.join(BUILTIN_REWARDS)}, or reward=custom with "
                          "reward.fn=package.module:function.")
    return BUILTIN_REWARDS[name]


def call_reward(reward: Callable[..., torch.Tensor], ctx: RewardContext, kwargs: dict | None = None) -> torch.Tensor:
    """Call ``reward`` and check it returns B finite numbers; any failure is a `RewardError` that says where."""
    name = getattr(reward, "__qualname__", repr(reward))
    try:
        out = reward(ctx, **(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - surface the user's error with context
        raise RewardError(f"Reward {name} raised {type(err).__name__}: {err}") from err
    try:
        out = torch.as_tensor(out, dtype=torch.float32, device=ctx.exit_layer.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(f"Reward {name} returned {type(out).__name__}; it must return a tensor of shape "
                          f"({ctx.exit_layer.shape[0]},).") from err
    batch = ctx.exit_layer.shape[0]
    if out.shape != (batch,):
        raise RewardError(f"Reward {name} returned shape {tuple(out.shape)}; it must return one value per exit, "
                          f"shape ({batch},).")
    bad = ~torch.isfinite(out)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise RewardError(
            f"Reward {name} returned {int(bad.sum())} non-finite value(s) (NaN/inf), e.g. at rows {rows} "
            f"(exit layers {ctx.exit_layer[rows].tolist()}, first value {out[rows[0]].item()}). Training stopped; "
            "the backbone and trace caches are kept. Fix the reward (e.g. clamp log-probs) and rerun."
        )
    return out


def reward_table(reward: Callable[..., torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
                 memorized: torch.Tensor, kwargs: dict | None = None, token=None,
                 label_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``R[n, l-1]`` = reward for example n exiting at layer l, for every n and l, validated once. ``token`` and
    ``label_log_probs`` (``[N, L]``): a token trace's `TokenExit` tables and log p_l(label)."""
    n, num_layers, _ = logits.shape
    layers = torch.arange(1, num_layers + 1, device=logits.device).repeat(n)
    rows = torch.arange(n, device=logits.device).repeat_interleave(num_layers)
    predictions = exit_predictions(logits, token)  # [N, L]
    ctx = RewardContext(
        exit_layer=layers,
        num_layers=num_layers,
        log_probs=torch.log_softmax(logits.float(), -1).reshape(n * num_layers, -1),
        label=labels[rows],
        memorized_layer=memorized[rows],
        final_prediction=predictions[:, -1][rows],
        token_prediction=None if token is None else predictions.reshape(-1),
        token_label_log_prob=None if label_log_probs is None else label_log_probs.float().reshape(-1),
    )
    return call_reward(reward, ctx, kwargs).reshape(n, num_layers)


@dataclass(frozen=True)
class RewardSpec:
    """Which reward to pay: a built-in ``name`` or a user function by import path ``fn``
    (``package.module:function``, which wins over ``name``), called with ``kwargs``."""

    name: str | None = "hardness"
    fn: str | None = None
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def coerce(cls, reward: RewardSpec | str | None) -> RewardSpec:
        """A spec from a spec, a built-in name, an import path (it has a ':') or None (the default)."""
        if isinstance(reward, RewardSpec):
            return reward
        if reward is None:
            return cls()
        return cls(None, reward) if ":" in reward else cls(reward)

    @classmethod
    def from_config(cls, section: dict) -> RewardSpec:
        """From the ``reward`` config group: ``name``, ``fn``, ``kwargs`` and any other key as a keyword argument."""
        kwargs = {k: v for k, v in section.items() if k not in ("name", "fn", "kwargs")}
        kwargs.update(section.get("kwargs") or {})
        fn = section.get("fn")
        return cls(None if fn else section.get("name"), fn, kwargs)

    @property
    def label(self) -> str:
        """The reward's name as runs and hyperparameters show it."""
        return self.fn or str(self.name)

    def resolve(self) -> Callable[..., torch.Tensor]:
        return resolve_reward(self.name, self.fn)

    def check(self) -> RewardSpec:
        """Before any work: the reward resolves, takes every keyword argument given, and the built-ins' ``alpha``
        is a finite number >= 0 and ``depth`` a known convention. Returns the spec."""
        reward = self.resolve()
        parameters = inspect.signature(reward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unexpected = sorted(k for k in self.kwargs if k not in parameters and not takes_any)
        if unexpected:
            hint = (" reward.fn=... without reward=custom keeps the built-in reward's alpha and depth: use "
                    "reward=custom reward.fn=... and pass your own arguments as reward.kwargs.<name>=..."
                    if self.fn and set(unexpected) & {"alpha", "depth"} else "")
            raise RewardError(f"Reward {self.label} takes no argument(s) {unexpected}; it takes "
                              f"{[p for p in parameters if p != next(iter(parameters))]}.{hint}")
        if not self.fn:
            if "alpha" in self.kwargs:
                check_value("reward.alpha", self.kwargs["alpha"], float)
            if self.kwargs.get("depth", "layer") not in DEPTHS:
                raise RewardError(f"reward.depth={self.kwargs['depth']!r}: valid: {', '.join(DEPTHS)}.")
        return self

    def table(self, logits: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor, token=None,
              label_log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``R[n, l-1]`` for every example and exit layer, validated once (see `reward_table`)."""
        return reward_table(self.resolve(), logits, labels, memorized, self.kwargs, token, label_log_probs)

    def record(self) -> dict:
        """What a run record keeps: ``{"name", "fn", **kwargs}``."""
        return {"name": self.name, "fn": self.fn, **self.kwargs}


__all__ = [
    "BUILTIN_REWARDS", "DEPTHS", "RewardContext", "RewardError", "RewardSpec", "call_reward", "confidence",
    "consistency", "correct", "hardness", "resolve_reward", "reward_table", "vanilla",
]
