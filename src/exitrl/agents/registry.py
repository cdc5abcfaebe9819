"""Agent names for ``agent=<name>``: each maps to a function that returns a trained or fixed `ExitPolicy`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.reinforce import ReinforceConfig, train_reinforce
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
    config = ReinforceConfig(**_options(cfg, ReinforceConfig, "reinforce"), seed=ctx.seed)
    train = ctx.trace[ctx.policy_split].to(ctx.device)
    dev = ctx.trace["dev"].to(ctx.device) if "dev" in ctx.trace.splits else None
    return train_reinforce(train, dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn, ctx.device,
                           ctx.writer, ctx.metric)


def _ppo(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.ppo import PPOConfig, train_ppo  # SB3 is imported only when PPO is asked for

    config = PPOConfig(**_options(cfg, PPOConfig, "ppo"), seed=ctx.seed)
    train = ctx.trace[ctx.policy_split]
    dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
    return train_ppo(train, dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn, ctx.writer, ctx.log_dir,
                     ctx.metric)


def _options(cfg: dict, config_class, agent: str) -> dict:
    """Agent options for ``config_class``; an unknown key is an error that lists the valid ones."""
    names = {f.name for f in fields(config_class)} - {"seed"}
    unknown = sorted(set(cfg) - names - {"name"})
    if unknown:
        raise ValueError(f"agent={agent}: unknown option(s) {unknown}; valid: {sorted(names)}.")
    return {k: v for k, v in cfg.items() if k in names}


def _ppo_torchrl(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.ppo_torchrl import TorchRLPPOConfig, train_ppo_torchrl  # TorchRL only when asked for

    config = TorchRLPPOConfig(**_options(cfg, TorchRLPPOConfig, "ppo_torchrl"), seed=ctx.seed)
    dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
    return train_ppo_torchrl(ctx.trace[ctx.policy_split], dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn,
                             ctx.device, ctx.writer, ctx.metric)


def _threshold_bandit(rule: str):
    def build(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
        from exitrl.agents.threshold_bandit import BanditConfig, train_threshold_bandit

        options = _options(cfg, BanditConfig, f"bandit_{rule}")
        options.pop("rule", None)
        config = BanditConfig(**options, rule=rule, seed=ctx.seed)
        dev = ctx.trace["dev"] if "dev" in ctx.trace.splits else None
        return train_threshold_bandit(ctx.trace[ctx.policy_split], dev, config, ctx.reward, ctx.reward_kwargs,
                                      ctx.reward_fn, ctx.writer, ctx.metric)

    return build


def _confidence(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    return ConfidencePolicy(cfg.get("threshold", 0.9)), {}


AGENTS: dict[str, Callable[[dict, AgentContext], tuple[ExitPolicy, dict]]] = {
    "reinforce": _reinforce,
    "ppo": _ppo,
    "ppo_torchrl": _ppo_torchrl,
    "bandit_ucb": _threshold_bandit("ucb"),
    "bandit_thompson": _threshold_bandit("thompson"),
    "confidence": _confidence,
}


def build_agent(name: str, cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}; valid agents: {', '.join(AGENTS)}.")
    return AGENTS[name](cfg, ctx)
