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

LEARN_ON = ("auto", "train", "held_out")


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
    learn_on: str = "auto"  # auto (the held-out split when there is one, else train) | train | held_out

    @property
    def policy_split(self) -> str:
        """Where learned policies train (``learn_on``)."""
        if self.learn_on not in LEARN_ON:
            raise ValueError(f"Unknown learn_on {self.learn_on!r}; valid: {', '.join(LEARN_ON)}.")
        if self.learn_on == "held_out" and "policy" not in self.trace.splits:
            raise ValueError("learn_on=held_out needs a held-out split: add data.policy_split=0.2.")
        if self.learn_on == "train":
            return "train"
        return "policy" if "policy" in self.trace.splits else "train"

    @property
    def held_out(self):
        """The split the backbone never saw (``data.policy_split``), or None: calibration needs it."""
        return self.trace.splits.get("policy")


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


# Fixed rules: nothing to train; their options are their constructor's arguments (confidence also takes
# ``temperature``: per-exit temperature scaling fitted on the held-out split).
FIXED_RULES: dict[str, type[ExitPolicy]] = {
    "confidence": ConfidencePolicy,
    "static": StaticPolicy,
    "patience": PatiencePolicy,
}
TEMPERATURE_OPTION = "temperature"


def _fixed_rule_options(name: str, cfg: dict) -> tuple[dict, bool]:
    cfg = dict(cfg)
    temperature = bool(cfg.pop(TEMPERATURE_OPTION, False)) if name == "confidence" else False
    return checked_options(cfg, FIXED_RULES[name], f"agent={name}"), temperature


def _fixed_rule(name: str):
    def build(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
        options, temperature = _fixed_rule_options(name, cfg)
        policy = FIXED_RULES[name](**options)
        if not temperature:
            return policy, {}
        from exitrl.calibration import TemperatureScaledPolicy, fit_temperatures

        if ctx.held_out is None:
            raise ValueError("agent.temperature=true fits temperatures on examples the backbone never saw: add "
                             "data.policy_split=0.2.")
        temperatures = fit_temperatures(ctx.held_out.logits, ctx.held_out.labels)
        return TemperatureScaledPolicy(policy, temperatures), {"temperatures": temperatures.tolist()}

    return build


# Rules fitted or calibrated on the trace (no reward, no RL): options are their config dataclass's fields.
def _calm(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.calm import CalmConfig, fit_calm

    config = CalmConfig(**checked_options(cfg, CalmConfig, "agent=calm"), seed=ctx.seed)
    return fit_calm(config, ctx.trace["train"], ctx.held_out, ctx.device)


def _free(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.free import FreeConfig, fit_free

    config = FreeConfig(**checked_options(cfg, FreeConfig, "agent=free"), seed=ctx.seed)
    split = ctx.trace[ctx.policy_split]
    return fit_free(config, split, split.num_layers, ctx.held_out)


def _lte(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.lte import LteConfig, fit_lte

    config = LteConfig(**checked_options(cfg, LteConfig, "agent=lte"), seed=ctx.seed)
    return fit_lte(config, ctx.trace[ctx.policy_split], ctx.device)


def _oracle(cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    from exitrl.agents.oracle import OracleConfig, OraclePolicy

    config = OracleConfig(**checked_options(cfg, OracleConfig, "agent=oracle"))
    return OraclePolicy.for_split(ctx.trace["dev"], config.kind), {"analysis_only": True, "split": "dev"}


AGENTS: dict[str, Callable[[dict, AgentContext], tuple[ExitPolicy, dict]]] = {
    "reinforce": _reinforce,
    "ppo": _ppo,
    "ppo_torchrl": _ppo_torchrl,
    "bandit_ucb": _threshold_bandit("ucb"),
    "bandit_thompson": _threshold_bandit("thompson"),
    "linucb": _linucb,
    **{name: _fixed_rule(name) for name in FIXED_RULES},
    "calm": _calm,
    "free": _free,
    "lte": _lte,
    "oracle": _oracle,
}
LEARNED_AGENTS = ("reinforce", "ppo", "ppo_torchrl", "bandit_ucb", "bandit_thompson", "linucb")
RULES = tuple(name for name in AGENTS if name not in (*LEARNED_AGENTS, "oracle"))  # usable as ``baselines=``


# Each learned agent's option dataclass, so a bad ``agent.<key>`` fails before any fine-tuning starts.
AGENT_OPTIONS = {
    "reinforce": "exitrl.agents.reinforce:ReinforceConfig",
    "ppo": "exitrl.agents.ppo:PPOConfig",
    "ppo_torchrl": "exitrl.agents.ppo_torchrl:TorchRLPPOConfig",
    "bandit_ucb": "exitrl.agents.threshold_bandit:BanditConfig",
    "bandit_thompson": "exitrl.agents.threshold_bandit:BanditConfig",
    "linucb": "exitrl.agents.linucb:LinUCBConfig",
    "calm": "exitrl.agents.calm:CalmConfig",
    "free": "exitrl.agents.free:FreeConfig",
    "lte": "exitrl.agents.lte:LteConfig",
    "oracle": "exitrl.agents.oracle:OracleConfig",
}


def check_learn_on(learn_on: str, has_held_out: bool) -> None:
    """Fail before any fine-tuning on a bad ``learn_on``."""
    if learn_on not in LEARN_ON:
        raise ValueError(f"Unknown learn_on {learn_on!r}; valid: {', '.join(LEARN_ON)}.")
    if learn_on == "held_out" and not has_held_out:
        raise ValueError("learn_on=held_out needs a held-out split: add data.policy_split=0.2.")


def needs_held_out(name: str, cfg: dict) -> bool:
    """Whether the agent calibrates on examples the backbone never saw (CALM's certificate, temperatures)."""
    return (name == "calm" and cfg.get("threshold") is None) or bool(cfg.get(TEMPERATURE_OPTION))


def check_agent(name: str, cfg: dict) -> None:
    """Raise a ValueError naming the valid choices for an unknown agent or an unknown agent option."""
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}; valid agents: {', '.join(AGENTS)}.")
    if name in AGENT_OPTIONS:
        module, _, qualname = AGENT_OPTIONS[name].partition(":")
        options_class = getattr(importlib.import_module(module), qualname)
        options = checked_options(cfg, options_class, f"agent={name}")
        if name in ("calm", "free", "lte", "oracle"):  # their dataclasses check values too (an unknown measure, ...)
            options_class(**options)
    else:  # a fixed rule: build it once, so that bad values (an unknown measure, a layer < 1) fail here too
        options, _ = _fixed_rule_options(name, cfg)
        FIXED_RULES[name](**options)


def build_agent(name: str, cfg: dict, ctx: AgentContext) -> tuple[ExitPolicy, dict]:
    check_agent(name, cfg)
    return AGENTS[name](cfg, ctx)
