"""PPO from Stable-Baselines3 on `exitrl/EarlyExit-v0`, wrapped as an `ExitPolicy`.

Read top to bottom: the deployable policy (an SB3 actor-critic reading one feature view of the observation), the
evaluation callback that puts exitrl's eval keys beside SB3's own in the run's TensorBoard folder, then training.

Episodes are undiscounted (gamma = 1): the only reward comes at the exit, and every layer is one step.
SB3 logs its usual keys (rollout/ep_rew_mean, train/approx_kl, train/entropy_loss, ...) into the same folder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.policies import ActorCriticPolicy

from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.envs import EarlyExitEnv, observation_box
from exitrl.evaluate import evaluate_policy, log_eval
from exitrl.observation import ObservationLayout, check_features, view_reads_history
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy
from exitrl.trace import SplitTrace

SB3_FILE = "ppo_sb3.zip"


class SB3ExitPolicy(ModuleExitPolicy):
    """Exit where the SB3 actor's most likely action is 'exit' (deterministic inference)."""

    name = "ppo"

    def __init__(self, hidden_size: int, num_classes: int, features: str = "state", net_arch=(64, 64),
                 actor: ActorCriticPolicy | None = None):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = features
        self.uses_history = view_reads_history(features)
        self.net_arch = list(net_arch)
        self.actor = actor or ActorCriticPolicy(observation_box(self.layout.feature_size(features)),
                                                gym.spaces.Discrete(2), lambda _: 0.0, net_arch=self.net_arch)
        self.actor.set_training_mode(False)
        self.module = self.actor
        self.model: PPO | None = None  # the SB3 algorithm that trained the actor (not part of policy.pt)

    def __deepcopy__(self, memo: dict) -> SB3ExitPolicy:
        """A copy of the policy, without the SB3 algorithm that trained it (its envs hold locks and cannot be
        copied; a copy only decides)."""
        return SB3ExitPolicy(self.layout.hidden_size, self.layout.num_classes, self.features, self.net_arch,
                             actor=copy.deepcopy(self.actor, memo))

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        obs = self.layout.select(batch.observations, self.features).to(self.actor.device)
        probs = self.actor.get_distribution(obs).distribution.probs
        return (probs[:, 1] > probs[:, 0]).to(batch.states.device)

    def config(self) -> dict:
        return {"hidden_size": self.layout.hidden_size, "num_classes": self.layout.num_classes,
                "features": self.features, "net_arch": self.net_arch}

    def save_native(self, folder: str | Path) -> list[str]:
        """``ppo_sb3.zip``: the whole SB3 algorithm, for ``PPO.load`` and ``learn`` (continued training)."""
        if self.model is None:
            return []
        self.model.save(Path(folder) / SB3_FILE)
        return [SB3_FILE]


class ExitrlEvalCallback(BaseCallback):
    """Evaluate on dev with the metric contract every ``every`` timesteps; write eval/* beside SB3's keys."""

    def __init__(self, policy: SB3ExitPolicy, dev: SplitTrace | None, writer, metric: str, every: int):
        super().__init__()
        self.exit_policy, self.dev, self.writer, self.metric, self.every = policy, dev, writer, metric, every
        self.history: list[dict] = []
        self._next = every

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
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)


def train_ppo(cfg: PPOConfig, inputs: FitInputs) -> tuple[SB3ExitPolicy, dict]:
    """Train SB3 PPO on ``cfg.n_envs`` Gymnasium envs over ``inputs.learn``; evaluate on dev as it goes."""
    start = time.time()
    train, dev, writer, log_dir, metric = inputs.learn, inputs.dev, inputs.writer, inputs.log_dir, inputs.metric
    base = EarlyExitEnv(train.to("cpu"), inputs.reward)  # rewards checked here, once
    layout = base.layout
    box = observation_box(layout.feature_size(cfg.features))

    def make_env() -> gym.Env:
        return gym.wrappers.TransformObservation(base.spawn(), lambda obs: layout.select(obs, cfg.features), box)

    envs = make_vec_env(make_env, n_envs=cfg.n_envs, seed=cfg.seed)
    model = PPO("MlpPolicy", envs, learning_rate=cfg.lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                n_epochs=cfg.n_epochs, gamma=1.0, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
                ent_coef=cfg.ent_coef, policy_kwargs={"net_arch": list(cfg.net_arch)}, seed=cfg.seed,
                device="cpu", verbose=0)
    # SB3's keys go to the run's TensorBoard folder; with no folder, nowhere (SB3 would make a temp folder per run)
    model.set_logger(configure(str(log_dir), ["tensorboard"]) if log_dir is not None else Logger(None, []))
    policy = SB3ExitPolicy(train.hidden_size, train.num_classes, cfg.features, cfg.net_arch, actor=model.policy)
    policy.model = model
    dev_cpu = dev.to("cpu") if dev is not None else None
    callback = ExitrlEvalCallback(policy, dev_cpu, writer, metric, cfg.eval_every)
    model.learn(total_timesteps=cfg.total_timesteps, callback=callback)
    if dev_cpu is not None:
        callback.evaluate()
    policy.actor.set_training_mode(False)
    info = {"config": asdict(cfg), "timesteps": int(model.num_timesteps), "updates": int(model.num_timesteps),
            "train_seconds": round(time.time() - start, 2), "history": callback.history}
    return policy, info


AGENT = register(AgentSpec(
    "ppo", PPOConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_ppo,
    "Stable-Baselines3 PPO on exitrl/EarlyExit-v0 (n_envs DummyVecEnv copies sharing one trace)"))
