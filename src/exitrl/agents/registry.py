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

    @property
    def policy_split(self) -> str:
        """Where learned policies train: the held-out ``policy`` split when there is one, else ``train``."""
        return "policy" if "policy" in self.trace.splits else "train"


def _reinforce(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    names = {f.name for f in fields(ReinforceConfig)}
    unknown = sorted(set(cfg) - names - {"name"})
    if unknown:
        raise ValueError(f"agent=reinforce: unknown option(s) {unknown}; valid: {sorted(names)}.")
    config = ReinforceConfig(**{k: v for k, v in cfg.items() if k in names and k != "seed"}, seed=ctx.seed)
    train = ctx.trace[ctx.policy_split].to(ctx.device)
    dev = ctx.trace["dev"].to(ctx.device) if "dev" in ctx.trace.splits else None
    return train_reinforce(train, dev, config, ctx.reward, ctx.reward_kwargs, ctx.reward_fn, ctx.device,
                           ctx.writer, ctx.metric)


def _confidence(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    return ConfidencePolicy(cfg.get("threshold", 0.9)), {}


AGENTS: dict[str, Callable[[dict, AgentContext], tuple[ExitPolicy, dict]]] = {
    "reinforce": _reinforce,
    "confidence": _confidence,
}


def build_agent(name: str, cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}; valid agents: {', '.join(AGENTS)}.")
    return AGENTS[name](cfg, ctx)
