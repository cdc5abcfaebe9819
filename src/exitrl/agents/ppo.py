"""PPO from Stable-Baselines3 on `exitrl/EarlyExit-v0`, wrapped as an `ExitPolicy`.

Read top to bottom: the deployable policy (an SB3 actor-critic reading one feature view of the observation), the
evaluation callback that puts exitrl's eval keys beside SB3's own in the run's TensorBoard folder, then training.

Episodes are undiscounted (gamma = 1): the only reward comes at the exit, and every layer is one step. With
``agent.train_costs`` each episode draws its α, the actor reads it last and the exit pays G − α·C
(`exitrl.envs.cost_conditioning`); the policy is deployed at the run's α. SB3 logs its usual keys
(rollout/ep_rew_mean, train/approx_kl, train/entropy_loss, ...) into the same folder.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.policies import ActorCriticPolicy

from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.rule_prior import check_start, clone_rule, fit_rule, max_prob_table, thresholds_to_json
from exitrl.core.checkpoint import Checkpoints, set_rng_state
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.envs import EarlyExitEnv, observation_box
from exitrl.envs.cost_conditioning import check_costs
from exitrl.evaluation.evaluate import evaluate_policy, log_eval
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy
from exitrl.traces.trace import SplitTrace

SB3_FILE = "ppo_sb3.zip"


class SB3ExitPolicy(ModuleExitPolicy):
    """Exit where the SB3 actor's most likely action is 'exit' (deterministic inference). A cost-conditioned actor
    (``agent.train_costs``) reads α as its last input and decides at ``cost_weight``, movable after fitting."""

    name = "ppo"

    def __init__(self, hidden_size: int, num_classes: int, features: str = "state", net_arch=(64, 64),
                 actor: ActorCriticPolicy | None = None, cost_conditioned: bool = False, cost_weight: float = 0.0):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = features
        self.uses_history = view_reads_history(features)
        self.net_arch = list(net_arch)
        self.cost_conditioned, self.cost_weight = bool(cost_conditioned), float(cost_weight)
        inputs = self.layout.feature_size(features) + self.cost_conditioned
        self.actor = actor or ActorCriticPolicy(observation_box(inputs), gym.spaces.Discrete(2), lambda _: 0.0,
                                                net_arch=self.net_arch)
        self.actor.set_training_mode(False)
        self.module = self.actor
        self.model: PPO | None = None  # the SB3 algorithm that trained the actor (not part of policy.pt)

    def __deepcopy__(self, memo: dict) -> SB3ExitPolicy:
        """A copy of the policy, without the SB3 algorithm that trained it (its envs hold locks and cannot be
        copied; a copy only decides)."""
        return SB3ExitPolicy(self.layout.hidden_size, self.layout.num_classes, self.features, self.net_arch,
                             actor=copy.deepcopy(self.actor, memo), cost_conditioned=self.cost_conditioned,
                             cost_weight=self.cost_weight)

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        obs = batch.features(self.layout, self.features).to(self.actor.device)
        if self.cost_conditioned:  # the α it decides at, as the env's last column
            obs = torch.cat([obs, torch.full_like(obs[:, :1], self.cost_weight)], 1)
        probs = self.actor.get_distribution(obs).distribution.probs
        return (probs[:, 1] > probs[:, 0]).to(batch.states.device)

    def config(self) -> dict:
        config = {"hidden_size": self.layout.hidden_size, "num_classes": self.layout.num_classes,
                  "features": self.features, "net_arch": self.net_arch}
        if self.cost_conditioned:
            config.update(cost_conditioned=True, cost_weight=self.cost_weight)
        return config

    def save_native(self, folder: str | Path) -> list[str]:
        """``ppo_sb3.zip``: the whole SB3 algorithm, for ``PPO.load`` and ``learn`` (continued training)."""
        if self.model is None:
            return []
        self.model.save(Path(folder) / SB3_FILE)
        return [SB3_FILE]


class ExitrlEvalCallback(BaseCallback):
    """Evaluate on dev with the metric contract every ``every`` timesteps; write eval/* beside SB3's keys; with
    ``checkpoints``, save the whole training state at the start of a rollout when one is due."""

    def __init__(self, policy: SB3ExitPolicy, dev: SplitTrace | None, writer, metric: str, every: int,
                 checkpoints: Checkpoints | None = None):
        super().__init__()
        self.exit_policy, self.dev, self.writer, self.metric, self.every = policy, dev, writer, metric, every
        self.checkpoints = checkpoints
        self.history: list[dict] = []
        self._next = every

    def _on_rollout_start(self) -> None:
        if self.checkpoints is not None and self.checkpoints.due():
            self.checkpoints.save({"sb3": training_state(self.model), "history": self.history, "next": self._next})

    def _on_step(self) -> bool:
        if self.dev is not None and self.num_timesteps >= self._next:
            self._next += self.every
            self.evaluate()
        return True

    def evaluate(self) -> None:
        metrics = evaluate_policy(self.exit_policy, self.dev, self.metric)
        metrics["timesteps"] = self.num_timesteps
        self.history.append(metrics)
        log_eval(self.writer, metrics, self.num_timesteps)


class ProgressCallback(BaseCallback):
    """exitrl's progress (`exitrl.core.progress`: a bar on a terminal, a line every 30 s in a log) over the
    timesteps, with the last dev score of ``evaluation``; SB3's own bar would flood a log file."""

    def __init__(self, total: int, evaluation: ExitrlEvalCallback | None = None):
        super().__init__()
        self.total, self.evaluation, self.bar, self.shown = total, evaluation, None, 0

    def _on_training_start(self) -> None:
        self.bar = progress(total=self.total, desc="ppo", unit="step", initial=self.num_timesteps)

    def _on_step(self) -> bool:
        self.bar.update(self.num_timesteps - self.bar.n)
        if self.evaluation is not None and len(self.evaluation.history) != self.shown:
            self.shown = len(self.evaluation.history)
            last = self.evaluation.history[-1]
            self.bar.set_postfix(dev=f"{last['score']:.3f}", exit=f"{last['avg_exit_layer']:.2f}", refresh=False)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


@dataclass
class PPOConfig:
    total_timesteps: int = 200_000
    n_envs: int = 16
    n_steps: int = 128  # per env per rollout
    batch_size: int = 512
    n_epochs: int = 4
    lr: float = 3e-4
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    features: str = "state"
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    eval_every: int = 20_000  # timesteps
    start: str = "scratch"  # scratch | rule: the actor is first fitted to the best per-layer max-prob rule's decisions
    train_costs: list[float] = field(default_factory=list)  # α values: one policy conditioned on α ([]: off)
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)
        check_start(self.start)
        self.train_costs = check_costs(self.train_costs)


def training_state(model: PPO) -> dict:
    """Everything SB3 PPO's next rollout depends on, between two rollouts: weights, optimiser, counters, the last
    observations, the episode statistics, and each env's example, layer, generator and episode-in-progress."""
    envs = []
    for monitor in model.get_env().envs:
        env = monitor.unwrapped
        envs.append({"index": env._index, "layer": env._layer, "cost_weight": env.cost_weight,
                     "np_random": env.np_random.bit_generator.state,
                     "monitor": {k: copy.deepcopy(getattr(monitor, k)) for k in MONITOR_STATE}})
    return {"policy": model.policy.state_dict(), "optimizer": model.policy.optimizer.state_dict(),
            "num_timesteps": model.num_timesteps, "n_updates": model._n_updates, "episode_num": model._episode_num,
            "last_obs": model._last_obs, "last_episode_starts": model._last_episode_starts,
            "ep_info_buffer": list(model.ep_info_buffer), "ep_success_buffer": list(model.ep_success_buffer),
            "progress_remaining": model._current_progress_remaining, "envs": envs}


MONITOR_STATE = ("rewards", "needs_reset", "episode_returns", "episode_lengths", "episode_times", "total_steps")


def restore_training_state(model: PPO, state: dict) -> None:
    model.policy.load_state_dict(state["policy"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    model.num_timesteps, model._n_updates = state["num_timesteps"], state["n_updates"]
    model._episode_num = state["episode_num"]
    model._last_obs, model._last_episode_starts = state["last_obs"], state["last_episode_starts"]
    model.ep_info_buffer = deque(state["ep_info_buffer"], maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(state["ep_success_buffer"], maxlen=model._stats_window_size)
    model._current_progress_remaining = state["progress_remaining"]
    for monitor, saved in zip(model.get_env().envs, state["envs"]):
        env = monitor.unwrapped
        env._index, env._layer = saved["index"], saved["layer"]
        env.cost_weight = saved.get("cost_weight", 0.0)
        env.np_random.bit_generator.state = saved["np_random"]
        for key, value in saved["monitor"].items():
            setattr(monitor, key, value)


CLONE_PAIRS = 16_384  # (row, layer) pairs the actor is cloned on: enough for a 2-layer MLP, seconds on a CPU


def start_from_rule(model: PPO, train: SplitTrace, cfg: PPOConfig, reward) -> dict:
    """Fit SB3's actor to the rule's decisions on (row, layer) pairs of the learn split (behaviour cloning: SB3
    owns the network, so the rule cannot be added to its logits as REINFORCE's and TorchRL's residual is)."""
    thresholds, learn_reward = fit_rule(train, reward)
    layout = ObservationLayout(train.hidden_size, train.num_classes)
    table, max_prob = train.observations(), max_prob_table(train)  # [N, L, D], [N, L]
    n, num_layers = max_prob.shape
    pick = torch.randperm(n * num_layers, generator=torch.Generator().manual_seed(cfg.seed))[:CLONE_PAIRS]
    rows, layers = pick // num_layers, pick % num_layers
    actor = model.policy
    features = layout.select(table[rows, layers], cfg.features).float()
    if cfg.train_costs:  # cloned at the run's own α, where the rule was fitted
        alpha = float(reward.kwargs.get("alpha", 0.0))
        features = torch.cat([features, torch.full_like(features[:, :1], alpha)], 1)
    features = features.to(actor.device)

    def exit_logits(x: torch.Tensor, _layers: torch.Tensor) -> torch.Tensor:
        logits = actor.get_distribution(x).distribution.logits
        return logits[:, 1] - logits[:, 0]

    actor.set_training_mode(True)
    agreement = clone_rule(exit_logits, actor.parameters(), features, layers.to(actor.device),
                           max_prob[rows, layers].to(actor.device), thresholds)
    return {"thresholds": thresholds_to_json(thresholds), "learn_reward": learn_reward, "clone_pairs": len(pick),
            "clone_agreement": agreement}


def train_ppo(cfg: PPOConfig, inputs: FitInputs) -> tuple[SB3ExitPolicy, dict]:
    """Train SB3 PPO on ``cfg.n_envs`` Gymnasium envs over ``inputs.learn``; evaluate on dev as it goes."""
    start = time.time()
    train, dev, writer, log_dir, metric = inputs.learn, inputs.dev, inputs.writer, inputs.log_dir, inputs.metric
    base = EarlyExitEnv(train.to("cpu"), inputs.reward, costs=cfg.train_costs or None)  # rewards checked here, once
    layout, conditioned = base.layout, bool(cfg.train_costs)
    box = observation_box(layout.feature_size(cfg.features) + conditioned)

    def view(obs: np.ndarray) -> np.ndarray:
        """The feature view the actor reads; a cost-conditioned episode's α stays last."""
        if not conditioned:
            return layout.select(obs, cfg.features)
        return np.append(layout.select(obs[:-1], cfg.features), obs[-1:])

    def make_env() -> gym.Env:
        return gym.wrappers.TransformObservation(base.spawn(), view, box)

    envs = make_vec_env(make_env, n_envs=cfg.n_envs, seed=cfg.seed)
    model = PPO("MlpPolicy", envs, learning_rate=cfg.lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                n_epochs=cfg.n_epochs, gamma=1.0, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
                ent_coef=cfg.ent_coef, policy_kwargs={"net_arch": list(cfg.net_arch)}, seed=cfg.seed,
                device="cpu", verbose=0)
    # SB3's keys go to the run's TensorBoard folder; with no folder, nowhere (SB3 would make a temp folder per run)
    model.set_logger(configure(str(log_dir), ["tensorboard"]) if log_dir is not None else Logger(None, []))
    checkpoints = inputs.checkpoints
    resumed = checkpoints.load() if checkpoints is not None else None
    rule = start_from_rule(model, train, cfg, inputs.reward) if cfg.start == "rule" and resumed is None else None
    alpha = float(inputs.reward.kwargs.get("alpha", 0.0)) if conditioned else 0.0  # where it is deployed
    policy = SB3ExitPolicy(train.hidden_size, train.num_classes, cfg.features, cfg.net_arch, actor=model.policy,
                           cost_conditioned=conditioned, cost_weight=alpha)
    policy.model = model
    dev_cpu = dev.to("cpu") if dev is not None else None
    callback = ExitrlEvalCallback(policy, dev_cpu, writer, metric, cfg.eval_every, checkpoints)
    if resumed is not None:  # a killed run's state, put back between the same two rollouts
        restore_training_state(model, resumed["sb3"])
        callback.history, callback._next = resumed["history"], resumed["next"]
        set_rng_state(resumed["rng"])
    model.learn(total_timesteps=cfg.total_timesteps - model.num_timesteps if resumed else cfg.total_timesteps,
                callback=CallbackList([callback, ProgressCallback(cfg.total_timesteps, callback)]),
                reset_num_timesteps=resumed is None)
    if dev_cpu is not None:
        callback.evaluate()
    policy.actor.set_training_mode(False)
    # SB3 keeps the last forward's distribution; after a training step it is part of an autograd graph, which
    # deepcopy (rule guards, moving a cost-conditioned policy along α) refuses
    policy.actor.action_dist.distribution = None
    info = {"config": asdict(cfg), "timesteps": int(model.num_timesteps), "updates": int(model.num_timesteps),
            "train_seconds": round(time.time() - start, 2), "history": callback.history}
    if rule is not None:
        info["rule"] = rule
    if checkpoints is not None:  # the run removes the file once its record is written
        info["checkpoints"] = checkpoints.summary()
    return policy, info


AGENT = register(AgentSpec(
    "ppo", PPOConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_ppo,
    "Stable-Baselines3 PPO on exitrl/EarlyExit-v0 (n_envs DummyVecEnv copies sharing one trace)"))
