"""`EarlyExitEnv`: one episode walks one example up the layers of a traced backbone.

At layer l the agent sees that layer's observation and chooses 0 = continue or 1 = exit; the last layer always
exits. The reward (a `RewardSpec`, a built-in name or an import path; see `exitrl.rewards`) is paid on exit, 0
otherwise. Rewards
and observations are precomputed tables over the trace, so a step is an array lookup. With ``costs`` (a list of α
values) each episode draws its own α, its observations end with it, and the exit pays G − α·C
(`exitrl.envs.cost_conditioning`).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from exitrl.core.observation import ObservationLayout
from exitrl.envs.cost_conditioning import check_costs, gain_and_cost
from exitrl.envs.spaces import observation_box
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace

CONTINUE, EXIT = 0, 1  # the actions of every env


class EarlyExitEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 30}

    def __init__(self, trace: SplitTrace | None = None, reward: RewardSpec | str | None = None,
                 render_mode: str | None = None, costs: list[float] | None = None):
        if not isinstance(trace, SplitTrace):
            raise ValueError("exitrl/EarlyExit-v0 needs trace=<one split of a trace>: exitrl.make_env('rte') builds "
                             "the env for a task, and exitrl.load_trace(run_dir or task)['train'] gives a split to "
                             f"pass as gym.make('exitrl/EarlyExit-v0', trace=...); got {type(trace).__name__}.")
        self.trace = trace.to("cpu")
        self.num_layers = trace.num_layers
        self.layout = ObservationLayout(trace.hidden_size, trace.num_classes)
        self._obs = self.trace.observations().numpy().astype(np.float32)
        self.reward = RewardSpec.coerce(reward)
        self._rewards = self.trace.reward_table(self.reward).numpy()
        self._pred = self.trace.prediction_table().numpy()
        self._labels = self.trace.labels.numpy()
        self.costs = check_costs(costs, "costs") if costs else None  # α drawn per episode (None: the reward's own)
        if self.costs is not None:
            gain, cost = gain_and_cost(self.trace, self.reward)
            self._gain, self._cost = gain.numpy(), cost.numpy()
        self.cost_weight = 0.0  # this episode's α, with ``costs``
        self.observation_space = observation_box(self.layout.size + (self.costs is not None))
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = render_mode
        self._index = 0
        self._layer = 0  # 0-based

    def spawn(self) -> EarlyExitEnv:
        """A new env over the same read-only tables, for vectorising without copying the trace N times."""
        env = object.__new__(type(self))
        env.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_np_random")})
        env._np_random = None
        env._index, env._layer = 0, 0
        return env

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "index" in options:
            self._index = int(options["index"])
            if not 0 <= self._index < len(self._labels):
                raise ValueError(f"options['index'] must lie in [0, {len(self._labels)}), got {self._index}.")
        else:
            self._index = int(self.np_random.integers(len(self._labels)))
        if self.costs is not None:
            self.cost_weight = self.costs[int(self.np_random.integers(len(self.costs)))]
        self._layer = 0
        return self._observation(0), {"index": self._index, "layer": 1}

    def _observation(self, layer: int) -> np.ndarray:
        obs = self._obs[self._index, layer]
        return obs.copy() if self.costs is None else np.append(obs, np.float32(self.cost_weight))

    def step(self, action):
        layer = self._layer
        done = int(action) == EXIT or layer == self.num_layers - 1
        info = {"index": self._index, "layer": layer + 1}
        if done:
            pred = int(self._pred[self._index, layer])
            info.update(exit_layer=layer + 1, prediction=pred, correct=pred == int(self._labels[self._index]))
            if self.costs is None:
                paid = float(self._rewards[self._index, layer])
            else:
                paid = float(self._gain[self._index, layer] - self.cost_weight * self._cost[self._index, layer])
            return self._observation(layer), paid, True, False, info
        self._layer = layer + 1
        info["layer"] = layer + 2
        return self._observation(layer + 1), 0.0, False, False, info

    def render(self):
        if self.render_mode == "ansi":
            return f"example {self._index} at layer {self._layer + 1}/{self.num_layers}"
        return None
