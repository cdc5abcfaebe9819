"""ConsistentEE's exit policy trained with REINFORCE, on the batched trace env.

Read top to bottom: the policy network, the deployable `ExitPolicy` it becomes, then the training loop.

Facts from the paper and its official code:
* one small 2-layer MLP per layer, π_l = sigmoid(MLP_l(x_l)) = P(exit at l);
* log P(exit at l) = Σ_{t<l} log(1 - π_t) + log π_l; an episode that reaches layer L continuing everywhere has
  log-prob Σ_{t≤L} log(1 - π_t) and predicts with layer L (the env forces the exit there);
* K repeated samples per example (K = 8), the per-example mean reward as baseline;
* ε-greedy exploration, ε_t = ε_end + (ε_start - ε_end)·exp(-step / decay);
* inference exits at the first layer with π_l > 0.5.

Inputs (``features``): ``state`` (default, the paper's: the layer's pooled state), ``confidence`` (layer position
and the exit head's probabilities, max-prob and entropy), ``observation`` (both), ``history`` (confidence and the
walk's history: agreement streak, changes of max-prob and entropy, cos of consecutive states) or ``full`` (all),
standardised per layer with
training-trace statistics. A state-fed policy can learn which *training examples* an early head gets right, which
need not transfer to new ones: ``data.policy_split`` lets it learn on examples the backbone never saw (the README
has the measurements).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Curve, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.rule_prior import RulePrior, check_start, fit_rule, thresholds_to_json, zero_last_linear
from exitrl.agents.standardize import STD_FLOOR, fit_standardizer
from exitrl.core.checkpoint import set_rng_state
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.core.small_linear import small_linear
from exitrl.envs import TraceVectorEnv
from exitrl.envs.cost_conditioning import check_costs, gain_and_cost
from exitrl.evaluation.evaluate import evaluate_policy, log_eval
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy


class PerLayerExitNet(nn.Module):
    """One MLP per layer over standardised features; returns the exit logit."""

    def __init__(self, num_layers: int, input_dim: int, hidden: int = 128):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_layers, input_dim))
        self.register_buffer("std", torch.ones(num_layers, input_dim))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)) for _ in range(num_layers)
        )

    def forward(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """Exit logits ``[B]`` for rows at 0-based ``layer``."""
        x = (features - self.mean[layer]) / self.std[layer]
        first, tanh, last = self.mlps[layer]
        return small_linear(tanh(first(x)), last).squeeze(-1)  # the 1-output layer fused under torch.compile


class ReinforcePolicy(ModuleExitPolicy):
    """Deployable form: exit at the first layer whose π_l exceeds ``threshold`` (0.5 in ConsistentEE). With
    ``rule_thresholds`` (``agent.start=rule``) the net is a residual on the per-layer max-prob rule
    (`exitrl.agents.rule_prior`). A cost-conditioned policy (``agent.train_costs``) also reads α, and decides at
    ``cost_weight`` (movable after fitting: `exitrl.envs.cost_conditioning`)."""

    name = "reinforce"
    graph_safe = True

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, hidden: int = 128,
                 features: str = "state", threshold: float = 0.5, rule_thresholds: list[float | None] | None = None,
                 cost_conditioned: bool = False, cost_weight: float = 0.0):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = features
        self.uses_history = view_reads_history(features)
        self.threshold = threshold
        self.cost_conditioned, self.cost_weight = bool(cost_conditioned), float(cost_weight)
        self._config = {"num_layers": num_layers, "hidden_size": hidden_size, "num_classes": num_classes,
                        "hidden": hidden, "features": features, "threshold": threshold}
        self.net = PerLayerExitNet(num_layers, self.layout.feature_size(features) + self.cost_conditioned, hidden)
        self.module = self.net
        self.prior = None
        if rule_thresholds is not None:
            self.prior = RulePrior(rule_thresholds)
            self._config["rule_thresholds"] = list(rule_thresholds)
        if cost_conditioned:
            self._config["cost_conditioned"] = True

    def to(self, device):
        super().to(device)
        if self.prior is not None:
            self.prior.to(device)
        return self

    def with_cost(self, features: torch.Tensor, cost: float | torch.Tensor | None) -> torch.Tensor:
        """The net's input: ``features``, and α as the last column when the policy is cost-conditioned."""
        if not self.cost_conditioned:
            return features
        cost = self.cost_weight if cost is None else cost
        column = torch.as_tensor(cost, dtype=features.dtype, device=features.device).expand(features.shape[:-1])
        return torch.cat([features, column[..., None]], -1)

    def exit_logit(self, obs: torch.Tensor, layer: int, cost: torch.Tensor | None = None) -> torch.Tensor:
        logit = self.net(self.with_cost(self.layout.select(obs, self.features), cost), layer)
        if self.prior is not None:
            logit = logit + self.prior(obs[..., self.layout.max_prob], layer)
        return logit

    def exit_probability(self, obs: torch.Tensor, layer: int, cost: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.exit_logit(obs, layer, cost))

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        logit = self.net(self.with_cost(batch.features(self.layout, self.features), None), batch.layer - 1)
        if self.prior is not None:
            logit = logit + self.prior(batch.confidence("maxprob"), batch.layer - 1)
        return torch.sigmoid(logit) > self.threshold

    def config(self) -> dict:
        config = dict(self._config)
        if self.cost_conditioned:
            config["cost_weight"] = self.cost_weight
        return config


@dataclass
class ReinforceConfig:
    lr: float = 3e-4
    batch_size: int = 32  # examples per update
    samples: int = 8  # K repeated samples per example
    epochs: int = 30
    hidden: int = 128
    features: str = "state"
    eps_start: float = 0.3
    eps_end: float = 0.02
    eps_decay: float = 1000.0  # updates
    clip_norm: float = 1.0
    start: str = "scratch"  # scratch (ConsistentEE) | rule: a residual on the best per-layer max-prob rule
    train_costs: list[float] = field(default_factory=list)  # α values: one policy conditioned on α ([]: off)
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)
        check_start(self.start)
        self.train_costs = check_costs(self.train_costs)


def train_reinforce(cfg: ReinforceConfig, inputs: FitInputs, log_every: int = 20) -> tuple[ReinforcePolicy, dict]:
    """Train the per-layer exit policy on ``inputs.learn``; evaluate on dev after every epoch."""
    torch.manual_seed(cfg.seed)
    device, writer, metric = inputs.device, inputs.writer, inputs.metric
    train = inputs.learn.to(device)
    dev = inputs.dev
    if len(train) < cfg.batch_size:
        raise ValueError(f"REINFORCE needs at least agent.batch_size={cfg.batch_size} training examples, the split has "
                         f"{len(train)}; lower agent.batch_size or give it more data.")
    dev = dev.to(device) if dev is not None else None
    num_layers, samples = train.num_layers, cfg.samples
    env = TraceVectorEnv(train, cfg.batch_size * samples, inputs.reward, device=device, autoreset=False,
                         seed=cfg.seed)
    rule = fit_rule(train, inputs.reward) if cfg.start == "rule" else None
    conditioned = bool(cfg.train_costs)
    alpha = float(inputs.reward.kwargs.get("alpha", 0.0)) if conditioned else 0.0
    policy = ReinforcePolicy(num_layers, train.hidden_size, train.num_classes, cfg.hidden, cfg.features,
                             rule_thresholds=thresholds_to_json(rule[0]) if rule else None,
                             cost_conditioned=conditioned, cost_weight=alpha).to(device)
    table = env.trace.observations()
    costs = torch.tensor(cfg.train_costs or [0.0], device=device)
    fit_standardizer(policy.net, policy.with_cost(policy.layout.select(table, cfg.features), costs.mean()))
    if conditioned:  # α's column: standardised over the values it is drawn from; paid G − α·C
        policy.net.std[:, -1] = costs.std().clamp_min(STD_FLOOR) if len(costs) > 1 else 1.0
        gain_table, cost_table = (t.to(device) for t in gain_and_cost(train, inputs.reward))
    if rule is not None:  # the untrained policy is the rule: the residual starts at zero
        for mlp in policy.net.mlps:
            zero_last_linear(mlp)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.lr)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    history, step, start = [], 0, time.time()
    # 0. A checkpoint found (a killed run's) puts every piece of state back, mid-epoch included.
    checkpoints, resumed = inputs.checkpoints, None
    if checkpoints is not None and (resumed := checkpoints.load()) is not None:
        policy.net.load_state_dict(resumed["policy"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["epoch_generator"])
        env.set_generator_state(resumed["env_generator"])
        history, step = resumed["history"], resumed["step"]
        set_rng_state(resumed["rng"])

    per_epoch = (len(train) - cfg.batch_size) // cfg.batch_size + 1
    bar = progress(total=cfg.epochs * per_epoch, desc="reinforce", unit="update", initial=step)
    for epoch in range(resumed["epoch"] if resumed else 1, cfg.epochs + 1):
        epoch_generator = generator.get_state()
        order = torch.randperm(len(train), generator=generator).to(device)
        starts = range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)
        done = resumed["batches"] if resumed and epoch == resumed["epoch"] else 0
        for batch_number, first in enumerate(starts[done:], start=done):
            # 1. K copies of each example in the batch walk up the layers together.
            examples = order[first:first + cfg.batch_size]
            rows = examples.repeat_interleave(samples)
            obs, _ = env.reset(options={"indices": rows})
            # a cost-conditioned policy: one α per example (its K samples share it, so their mean stays a baseline)
            cost = (costs[torch.randint(len(costs), (cfg.batch_size,), device=device)].repeat_interleave(samples)
                    if conditioned else None)
            epsilon = cfg.eps_end + (cfg.eps_start - cfg.eps_end) * math.exp(-step / cfg.eps_decay)
            log_prob = torch.zeros(env.num_envs, device=device)
            returns = torch.zeros(env.num_envs, device=device)
            entropy_sum, decisions = torch.zeros((), device=device), torch.zeros((), device=device)
            exit_layer = torch.zeros(env.num_envs, dtype=torch.long, device=device)
            for layer in range(num_layers):
                alive = ~env.finished
                pi = policy.exit_probability(obs, layer, cost).clamp(1e-6, 1 - 1e-6)
                # 2. ε-greedy: a uniformly random action with probability ε, else a sample from π.
                explore = torch.rand(env.num_envs, device=device) < epsilon
                action = torch.where(explore, torch.rand(env.num_envs, device=device) < 0.5,
                                     torch.rand(env.num_envs, device=device) < pi)
                step_log_prob = torch.where(action, pi.log(), (1 - pi).log())
                log_prob = log_prob + torch.where(alive, step_log_prob, 0.0)
                bernoulli_entropy = -(pi * pi.log() + (1 - pi) * (1 - pi).log())
                entropy_sum = entropy_sum + (bernoulli_entropy * alive).sum()
                decisions = decisions + alive.sum()  # stays on the device: no host sync per step
                obs, reward_t, _, _, info = env.step(action)
                returns += reward_t
                exit_layer = torch.maximum(exit_layer, info["exit_layer"])
            if conditioned:  # paid at the example's own α
                returns = gain_table[rows, exit_layer - 1] - cost * cost_table[rows, exit_layer - 1]
            # 3. REINFORCE with the per-example mean over its K samples as baseline.
            grouped = returns.view(cfg.batch_size, samples)
            advantage = (grouped - grouped.mean(1, keepdim=True)).view(-1)
            loss = -(advantage * log_prob).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.net.parameters(), cfg.clip_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            if writer is not None and (step % log_every == 0 or first == starts[-1]):
                writer.add_scalar("train/reward", returns.mean().item(), step)
                writer.add_scalar("train/policy_loss", loss.item(), step)
                writer.add_scalar("train/entropy", (entropy_sum / decisions.clamp_min(1)).item(), step)
                writer.add_scalar("train/epsilon", epsilon, step)
                writer.add_scalar("train/avg_exit_layer", exit_layer.float().mean().item(), step)
            if checkpoints is not None and checkpoints.due():
                checkpoints.save({"epoch": epoch, "batches": batch_number + 1, "epoch_generator": epoch_generator,
                                  "env_generator": env.generator_state(), "policy": policy.net.state_dict(),
                                  "optimizer": optimizer.state_dict(), "history": history, "step": step})
        if dev is not None:
            metrics = evaluate_policy(policy, dev, metric)
            metrics.update(epoch=epoch, step=step)
            history.append(metrics)
            log_eval(writer, metrics, step)
            bar.set_postfix(epoch=epoch, dev=f"{metrics['score']:.3f}", exit=f"{metrics['avg_exit_layer']:.2f}")
    bar.close()
    info = {"config": asdict(cfg), "updates": step, "train_seconds": round(time.time() - start, 2), "history": history}
    if rule is not None:
        info["rule"] = {"thresholds": thresholds_to_json(rule[0]), "learn_reward": rule[1]}
    if checkpoints is not None:  # the run removes the file once its record is written
        info["checkpoints"] = checkpoints.summary()
    return policy, info


AGENT = register(AgentSpec(
    "reinforce", ReinforceConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_reinforce,
    "ConsistentEE: per-layer MLP pi_l = P(exit), REINFORCE with K samples per example and their mean as baseline",
    curve=Curve("threshold", (0.1, 0.3, 0.5, 0.7, 0.9))))
