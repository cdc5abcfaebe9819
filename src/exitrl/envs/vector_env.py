"""`TraceVectorEnv`: thousands of early-exit episodes per step as torch tensor ops, on the GPU when present.

It follows Gymnasium's `VectorEnv` API with the ``SAME_STEP`` autoreset mode: a row that exits is given a new
random example in the same step, so no step is spent on resets. Observations, rewards and infos are torch
tensors on the env's device. With ``autoreset=False`` a finished row stays finished (reward 0, same obs) until
the next `reset`, which suits algorithms that roll out exactly one episode per row (REINFORCE).

``infos`` per step: ``exit_layer`` (1-indexed, 0 where the row did not exit), ``prediction`` and ``correct`` at the
row's current layer, ``index`` of the example stepped. There is no ``final_obs``: every episode end is a
termination (value 0), so no algorithm needs to bootstrap from the observation it ended on.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from exitrl.core.observation import ObservationLayout
from exitrl.envs.spaces import observation_box
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace


class TraceVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, trace: SplitTrace, num_envs: int, reward: RewardSpec | str | None = None,
                 device: str | torch.device = "cpu", autoreset: bool = True, seed: int | None = None):
        self.device = torch.device(device)
        self.num_envs = int(num_envs)
        self.autoreset = autoreset
        trace = trace.to(self.device)
        self.trace = trace
        self.num_layers = trace.num_layers
        self.num_examples = len(trace)
        self.layout = ObservationLayout(trace.hidden_size, trace.num_classes)
        self._obs = trace.observations().reshape(-1, self.layout.size).contiguous()
        self.reward = RewardSpec.coerce(reward)
        self._rewards = trace.reward_table(self.reward).reshape(-1)
        self._pred = trace.prediction_table().reshape(-1)
        self._correct = (trace.prediction_table() == trace.labels[:, None]).reshape(-1)
        self.single_observation_space = observation_box(self.layout.size)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
        self.indices = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.layers = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)  # 0-based
        self.finished = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self._zeros = torch.zeros(self.num_envs, device=self.device)

    def _draw(self, count: int) -> torch.Tensor:
        return torch.randint(self.num_examples, (count,), generator=self._generator, device=self.device)

    def generator_state(self) -> torch.Tensor:
        """The state of the generator that draws examples (for checkpoints)."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def state(self) -> dict:
        """Everything the next step depends on (for checkpoints): each row's example, layer and finished flag, and
        the generator that draws examples."""
        return {"indices": self.indices.clone(), "layers": self.layers.clone(), "finished": self.finished.clone(),
                "generator": self.generator_state()}

    def set_state(self, state: dict) -> None:
        self.indices = state["indices"].to(self.device)
        self.layers = state["layers"].to(self.device)
        self.finished = state["finished"].to(self.device)
        self.set_generator_state(state["generator"])

    def observations(self) -> torch.Tensor:
        """The current observation of every row."""
        return torch.index_select(self._obs, 0, self.indices * self.num_layers + self.layers)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):  # VectorEnv allows one seed per sub-env; one generator drives them all
            seed = seed[0]
        if seed is not None:
            self._generator.manual_seed(int(seed))
        if options and "indices" in options:
            indices = torch.as_tensor(options["indices"], dtype=torch.long, device=self.device)
            if indices.shape != (self.num_envs,):
                raise ValueError(f"options['indices'] must have shape ({self.num_envs},), got {tuple(indices.shape)}.")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_examples):
                raise ValueError(f"options['indices'] must lie in [0, {self.num_examples}).")
            self.indices = indices.clone()
        else:
            self.indices = self._draw(self.num_envs)
        self.layers.zero_()
        self.finished.zero_()
        return torch.index_select(self._obs, 0, self.indices * self.num_layers), {"index": self.indices.clone()}

    def reset_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Start new random episodes in the rows where ``rows`` (bool ``[num_envs]``) is True; returns all rows'
        observations. For frameworks that reset finished rows themselves (TorchRL's partial resets)."""
        rows = torch.as_tensor(rows, dtype=torch.bool, device=self.device)
        self.indices = torch.where(rows, self._draw(self.num_envs), self.indices)
        self.layers = torch.where(rows, 0, self.layers)
        self.finished = self.finished & ~rows
        return self.observations()

    def step(self, actions):
        actions = torch.as_tensor(actions, device=self.device)
        flat = self.indices * self.num_layers + self.layers
        exits = (actions != 0) | (self.layers == self.num_layers - 1)
        if not self.autoreset:
            exits &= ~self.finished
        rewards = torch.where(exits, self._rewards[flat], self._zeros)
        infos = {
            "exit_layer": torch.where(exits, self.layers + 1, 0),
            "prediction": self._pred[flat],
            "correct": self._correct[flat],
            "index": self.indices,
        }
        if self.autoreset:
            self.indices = torch.where(exits, self._draw(self.num_envs), self.indices)
            self.layers = torch.where(exits, 0, self.layers + 1)
        else:
            self.finished |= exits
            self.layers = torch.where(self.finished, self.layers, self.layers + 1)
        obs = self.observations()
        truncations = torch.zeros_like(exits)
        return obs, rewards, exits, truncations, infos
