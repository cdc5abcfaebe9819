"""PPO written with TorchRL (ClipPPOLoss, GAE, a collector) on the batched trace env, on the GPU when present.

Read top to bottom: the actor and critic (MLPs over one feature view of the observation), the deployable
`ExitPolicy` built from the actor, then the collect / advantage / minibatch-update loop. Episodes are undiscounted
(gamma = 1): the reward comes at the exit and each layer is one step. With ``agent.train_costs`` each episode draws
its α, actor and critic read it as one more input and the episode is paid G − α·C
(`exitrl.envs.cost_conditioning`): one policy for the whole trade-off, deployed at the run's α (``cost_weight``).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.rule_prior import RulePrior, check_start, fit_rule, thresholds_to_json, zero_last_linear
from exitrl.core.checkpoint import set_rng_state
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.envs.cost_conditioning import check_costs
from exitrl.envs.torchrl_env import TorchRLEarlyExitEnv
from exitrl.evaluation.evaluate import evaluate_policy, log_eval
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy


class FeatureView(nn.Module):
    """Selects the feature view (state / confidence / observation) that actor and critic read; a cost-conditioned
    observation's last column (its α) is kept after the view."""

    def __init__(self, layout: ObservationLayout, features: str, cost_conditioned: bool = False):
        super().__init__()
        self.layout, self.features, self.cost_conditioned = layout, features, bool(cost_conditioned)

    @property
    def size(self) -> int:
        return self.layout.feature_size(self.features) + self.cost_conditioned

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if not self.cost_conditioned:
            return self.layout.select(observation, self.features)
        return torch.cat([self.layout.select(observation[..., :-1], self.features), observation[..., -1:]], -1)


class ActionLogits(nn.Module):
    """[continue, exit] logits from the observation: the MLP over the feature view, plus (``agent.start=rule``)
    the rule's exit logit on the 'exit' side (`exitrl.agents.rule_prior`)."""

    def __init__(self, layout: ObservationLayout, view: FeatureView, logits_net: nn.Module,
                 prior: RulePrior | None):
        super().__init__()
        self.layout, self.view, self.logits_net, self.prior = layout, view, logits_net, prior

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        logits = self.logits_net(self.view(observation))
        if self.prior is None:
            return logits
        num_layers = self.prior.thresholds.numel()  # the observation carries the layer as a fraction of L
        layer = (observation[..., self.layout.position] * num_layers).round().long().clamp(1, num_layers) - 1
        rule = self.prior(observation[..., self.layout.max_prob], layer)
        return logits + torch.stack([torch.zeros_like(rule), rule], -1)


class TorchRLExitPolicy(ModuleExitPolicy):
    """Exit where the actor's logits favour 'exit' (deterministic inference). A cost-conditioned actor
    (``agent.train_costs``) decides at ``cost_weight``, which can be moved after fitting."""

    name = "ppo_torchrl"
    graph_safe = True

    def __init__(self, hidden_size: int, num_classes: int, features: str = "state", num_cells=(64, 64),
                 rule_thresholds: list[float | None] | None = None, cost_conditioned: bool = False,
                 cost_weight: float = 0.0):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = features
        self.uses_history = view_reads_history(features)
        self.num_cells = list(num_cells)
        self.cost_conditioned, self.cost_weight = bool(cost_conditioned), float(cost_weight)
        self.view = FeatureView(self.layout, features, cost_conditioned)
        self.logits_net = MLP(in_features=self.view.size, out_features=2,
                              num_cells=self.num_cells, activation_class=nn.Tanh)
        self.module = self.logits_net
        self.rule_thresholds = None if rule_thresholds is None else list(rule_thresholds)
        prior = RulePrior(rule_thresholds) if rule_thresholds is not None else None
        self.logits = ActionLogits(self.layout, self.view, self.logits_net, prior)

    def to(self, device):
        self.logits.to(device)
        return self

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        device = next(self.logits_net.parameters()).device
        observations = batch.observations.to(device)
        if self.cost_conditioned:  # the α it decides at, as the env's last column
            observations = torch.cat([observations, torch.full_like(observations[:, :1], self.cost_weight)], 1)
        logits = self.logits(observations)
        return (logits[:, 1] > logits[:, 0]).to(batch.states.device)

    def config(self) -> dict:
        config = {"hidden_size": self.layout.hidden_size, "num_classes": self.layout.num_classes,
                  "features": self.features, "num_cells": self.num_cells}
        if self.rule_thresholds is not None:
            config["rule_thresholds"] = self.rule_thresholds
        if self.cost_conditioned:
            config.update(cost_conditioned=True, cost_weight=self.cost_weight)
        return config


@dataclass
class TorchRLPPOConfig:
    total_frames: int = 409_600  # 25 batches
    num_envs: int = 1024
    frames_per_batch: int = 16_384
    minibatch_size: int = 4096
    n_epochs: int = 4
    lr: float = 3e-4
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.01
    features: str = "state"
    num_cells: list[int] = field(default_factory=lambda: [64, 64])
    start: str = "scratch"  # scratch | rule: the actor is a residual on the best per-layer max-prob rule
    train_costs: list[float] = field(default_factory=list)  # α values: one policy conditioned on α ([]: off)
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)
        check_start(self.start)
        self.train_costs = check_costs(self.train_costs)


def train_ppo_torchrl(cfg: TorchRLPPOConfig, inputs: FitInputs) -> tuple[TorchRLExitPolicy, dict]:
    """Train TorchRL PPO on ``cfg.num_envs`` batched episodes over ``inputs.learn``; evaluate on dev per batch."""
    torch.manual_seed(cfg.seed)
    start = time.time()
    train, dev, device, writer, metric = inputs.learn, inputs.dev, inputs.device, inputs.writer, inputs.metric
    env = TorchRLEarlyExitEnv(train, cfg.num_envs, inputs.reward, device=device, seed=cfg.seed,
                              costs=cfg.train_costs or None)
    rule = fit_rule(train, inputs.reward) if cfg.start == "rule" else None
    conditioned = bool(cfg.train_costs)
    alpha = float(inputs.reward.kwargs.get("alpha", 0.0)) if conditioned else 0.0  # where it is deployed
    policy = TorchRLExitPolicy(train.hidden_size, train.num_classes, cfg.features, cfg.num_cells,
                               rule_thresholds=thresholds_to_json(rule[0]) if rule else None,
                               cost_conditioned=conditioned, cost_weight=alpha).to(device)
    if rule is not None:  # the untrained actor is the rule: the residual starts at zero
        zero_last_linear(policy.logits_net)
    view = TensorDictModule(policy.view, in_keys=["observation"], out_keys=["features"])
    actor = ProbabilisticActor(
        TensorDictModule(policy.logits, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], distribution_class=torch.distributions.Categorical, return_log_prob=True,
        spec=env.action_spec,
    )
    critic_net = MLP(in_features=policy.view.size, out_features=1, num_cells=cfg.num_cells,
                     activation_class=nn.Tanh).to(device)
    critic = TensorDictSequential(view, ValueOperator(critic_net, in_keys=["features"]))
    advantage = GAE(gamma=1.0, lmbda=cfg.gae_lambda, value_network=critic, average_gae=True)
    loss_fn = ClipPPOLoss(actor, critic, clip_epsilon=cfg.clip_epsilon, entropy_coeff=cfg.entropy_coef)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=cfg.lr)
    history, frames, updates = [], 0, 0
    # 0. A checkpoint found (a killed run's) puts back the networks, the optimiser, the counters, the RNGs and every
    # env row's episode in progress, so the new collector continues where the killed one stopped.
    checkpoints, resumed = inputs.checkpoints, None
    if checkpoints is not None and (resumed := checkpoints.load()) is not None:
        loss_fn.load_state_dict(resumed["loss"])
        optimizer.load_state_dict(resumed["optimizer"])
        env.restore(resumed["env"])
        history, frames, updates = resumed["history"], resumed["frames"], resumed["updates"]
        set_rng_state(resumed["rng"])
    quiet = {"auto_register_policy_transforms": False}  # a feed-forward policy needs no InitTracker (torchrl ≥ 0.13)
    collector = Collector(create_env_fn=env, policy=actor, frames_per_batch=cfg.frames_per_batch,
                          total_frames=cfg.total_frames - frames, device=device,
                          **{k: v for k, v in quiet.items() if k in inspect.signature(Collector).parameters})
    bar = progress(total=cfg.total_frames, desc="ppo_torchrl", unit="frame", initial=frames)
    for data in collector:
        frames += data.numel()
        bar.update(data.numel())
        for _ in range(cfg.n_epochs):
            with torch.no_grad():
                advantage(data)
            flat = data.reshape(-1)
            order = torch.randperm(flat.numel(), device=flat.device)
            for first in range(0, flat.numel(), cfg.minibatch_size):
                losses = loss_fn(flat[order[first:first + cfg.minibatch_size]])
                total = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(loss_fn.parameters(), 1.0)
                optimizer.step()
                updates += 1
        if writer is not None:
            done = data["next", "done"].squeeze(-1)
            writer.add_scalar("train/reward", data["next", "reward"][done].mean().item(), frames)
            writer.add_scalar("train/policy_loss", losses["loss_objective"].item(), frames)
            writer.add_scalar("train/entropy", losses["entropy"].mean().item(), frames)
        if dev is not None:
            metrics = {**evaluate_policy(policy, dev.to(device), metric), "frames": frames}
            history.append(metrics)
            log_eval(writer, metrics, frames)
            bar.set_postfix(dev=f"{metrics['score']:.3f}", exit=f"{metrics['avg_exit_layer']:.2f}")
        if checkpoints is not None and checkpoints.due() and frames < cfg.total_frames:
            checkpoints.save({"loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                              "env": env.inner.state(), "history": history, "frames": frames, "updates": updates})
    collector.shutdown()
    bar.close()
    info = {"config": asdict(cfg), "frames": frames, "updates": updates,
            "train_seconds": round(time.time() - start, 2), "history": history}
    if rule is not None:
        info["rule"] = {"thresholds": thresholds_to_json(rule[0]), "learn_reward": rule[1]}
    if checkpoints is not None:  # the run removes the file once its record is written
        info["checkpoints"] = checkpoints.summary()
    return policy, info


AGENT = register(AgentSpec(
    "ppo_torchrl", TorchRLPPOConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_ppo_torchrl,
    "TorchRL PPO (ClipPPOLoss, GAE, a collector) on the batched trace env; GPU when present"))
