"""Agent names for ``agent=<name>``: each maps to a function that returns a trained or fixed `ExitPolicy`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.patience import PatiencePolicy
from exitrl.agents.reinforce import ReinforceConfig, train_reinforce
from exitrl.agents.static import StaticPolicy
from exitrl.options import checked_options
from exitrl.policy import ExitPolicy
from exitrl.trace import Trace


@dataclass
class AgentContext:
    """What any agent may use: the trace, the reward choice, the device, a TensorBoard writer."""

    trace: Trace
    reward: str | None
    reward_fn: str | None
    reward_kwargs: dict
    device: object
    writer: object
    metric: str
    seed: int
    log_dir: object = None  # the run's TensorBoard folder, for agents with a logger of their own (SB3)

    @property
    def policy_split(self) -> str:
        """Where learned policies train: the held-out ``policy`` split when there is one, else ``train``."""
        return "policy" if "policy" in self.trace.splits else "train"


def _reinforce(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    config = ReinforceConfig(**checked_options(cfg, ReinforceConfig, "agent=reinforce"), seed=ctx.seed)
    train = ctx.trace[ctx.policy_split].to(ctx.device)
    dev = ctx.trace["dev"].to(ctx.device) if "dev" in ctx.trace.splits else None
    return train_reinforce(train, dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn, ctx.device,
                           ctx.writer, ctx.metric)


def _ppo(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.ppo import PPOConfig, train_ppo  # SB3 is imported only when PPO is asked for

    config = PPOConfig(**checked_options(cfg, PPOConfig, "agent=ppo"), seed=ctx.seed)
    train = ctx.trace[ctx.policy_split]
    dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
    return train_ppo(train, dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn, ctx.writer, ctx.log_dir,
                     ctx.metric)


def _ppo_torchrl(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.ppo_torchrl import TorchRLPPOConfig, train_ppo_torchrl  # TorchRL only when asked for

    config = TorchRLPPOConfig(**checked_options(cfg, TorchRLPPOConfig, "agent=ppo_torchrl"), seed=ctx.seed)
    dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
    return train_ppo_torchrl(ctx.trace[ctx.policy_split], dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn,
                             ctx.device, ctx.writer, ctx.metric)


def _linucb(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.linucb import LinUCBConfig, train_linucb

    config = LinUCBConfig(**checked_options(cfg, LinUCBConfig, "agent=linucb"), seed=ctx.seed)
    dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
    return train_linucb(ctx.trace[ctx.policy_split], dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn,
                        ctx.device, ctx.writer, ctx.metric)


def _threshold_bandit(rule: str):
    def build(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
        from exitrl.agents.threshold_bandit import BanditConfig, train_threshold_bandit

        options = checked_options(cfg, BanditConfig, f"agent=bandit_{rule}")
        options.pop("rule", None)
        config = BanditConfig(**options, rule=rule, seed=ctx.seed)
        dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
        return train_threshold_bandit(ctx.trace[ctx.policy_split], dev, config, ctx.reward, ctx.reward_kwargs,
                                      ctx.reward_fn, ctx.writer, ctx.metric)

    return build


# Fixed rules: nothing to train; their options are their constructor's arguments.
FIXED_RULES: dict[str, type[ExitPolicy]] = {
    "confidence": ConfidencePolicy,
    "static": StaticPolicy,
    "patience": PatiencePolicy,
}


def _fixed_rule(name: str):
    def build(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
        return FIXED_RULES[name](**checked_options(cfg, FIXED_RULES[name], f"agent={name}")), {}

    return build


AGENTS: dict[str, Callable[[dict, AgentContext], tuple[ExitPolicy, dict]]] = {
    "reinforce": _reinforce,
    "ppo": _ppo,
    "ppo_torchrl": _ppo_torchrl,
    "bandit_ucb": _threshold_bandit("ucb"),
    "bandit_thompson": _threshold_bandit("thompson"),
    "linucb": _linucb,
    **{name: _fixed_rule(name) for name in FIXED_RULES},
}


# Each learned agent's option dataclass, so a bad ``agent.<key>`` fails before any fine-tuning starts.
AGENT_OPTIONS = {
    "reinforce": "exitrl.agents.reinforce:ReinforceConfig",
    "ppo": "exitrl.agents.ppo:PPOConfig",
    "ppo_torchrl": "exitrl.agents.ppo_torchrl:TorchRLPPOConfig",
    "bandit_ucb": "exitrl.agents.threshold_bandit:BanditConfig",
    "bandit_thompson": "exitrl.agents.threshold_bandit:BanditConfig",
    "linucb": "exitrl.agents.linucb:LinUCBConfig",
}


def check_agent(name: str, cfg: dict) -> None:
    """Raise a ValueError naming the valid choices for an unknown agent or an unknown agent option."""
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}; valid agents: {', '.join(AGENTS)}.")
    if name in AGENT_OPTIONS:
        module, _, qualname = AGENT_OPTIONS[name].partition(":")
        checked_options(cfg, getattr(importlib.import_module(module), qualname), f"agent={name}")
    else:  # a fixed rule: build it once, so that bad values (an unknown measure, a layer < 1) fail here too
        FIXED_RULES[name](**checked_options(cfg, FIXED_RULES[name], f"agent={name}"))


def build_agent(name: str, cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    check_agent(name, cfg)
    return AGENTS[name](cfg, ctx)
