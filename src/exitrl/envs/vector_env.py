"""`TraceVectorEnv`: thousands of early-exit episodes per step as torch tensor ops, on the GPU when present.

It follows Gymnasium's `VectorEnv` API with the ``SAME_STEP`` autoreset mode: a row that exits is given a new
random example in the same step, so no step is spent on resets. Observations, rewards and infos are torch
tensors on the env's device. With ``autoreset=False`` a finished row stays finished (reward 0, same obs) until
the next `reset`, which suits algorithms that roll out exactly one episode per row (REINFORCE).

``infos`` per step: ``exit_layer`` (1-indexed, 0 where the row did not exit), ``prediction`` and ``correct`` at the
row's current layer, ``index`` of the example stepped.

With ``costs`` (a list of α values), each episode draws its own α from them, its observation ends with that α (one
more column), and it is paid G − α·C, the reward's gain and cost tables (`exitrl.envs.cost_conditioning`): one
policy learns the whole trade-off. There is no ``final_obs``: every episode end is a
termination (value 0), so no algorithm needs to bootstrap from the observation it ended on.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from exitrl.core.observation import ObservationLayout
from exitrl.envs.cost_conditioning import check_costs, gain_and_cost
from exitrl.envs.spaces import observation_box
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace


class TraceVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, trace: SplitTrace, num_envs: int, reward: RewardSpec | str | None = None,
                 device: str | torch.device = "cpu", autoreset: bool = True, seed: int | None = None,
                 costs: list[float] | None = None):
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
        self.costs = None  # the α values episodes draw from (None: the reward's own α, no extra column)
        if costs:
            self.costs = torch.tensor(check_costs(costs, "costs"), device=self.device)
            gain, cost = gain_and_cost(trace, self.reward)
            self._gain, self._cost = gain.reshape(-1).to(self.device), cost.reshape(-1).to(self.device)
        self.observation_size = self.layout.size + (self.costs is not None)
        self.single_observation_space = observation_box(self.observation_size)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
        self.indices = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.layers = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)  # 0-based
        self.finished = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.cost_weights = torch.zeros(self.num_envs, device=self.device)  # each row's α (with ``costs``)
        self._zeros = torch.zeros(self.num_envs, device=self.device)

    def _draw(self, count: int) -> torch.Tensor:
        return torch.randint(self.num_examples, (count,), generator=self._generator, device=self.device)

    def _draw_costs(self, rows: torch.Tensor | None = None) -> None:
        """A new α for every row (or where ``rows``), when episodes draw their own."""
        if self.costs is None:
            return
        drawn = self.costs[torch.randint(len(self.costs), (self.num_envs,), generator=self._generator,
                                         device=self.device)]
        self.cost_weights = drawn if rows is None else torch.where(rows, drawn, self.cost_weights)

    def generator_state(self) -> torch.Tensor:
        """The state of the generator that draws examples (for checkpoints)."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def state(self) -> dict:
        """Everything the next step depends on (for checkpoints): each row's example, layer and finished flag, and
        the generator that draws examples."""
        return {"indices": self.indices.clone(), "layers": self.layers.clone(), "finished": self.finished.clone(),
                "cost_weights": self.cost_weights.clone(), "generator": self.generator_state()}

    def set_state(self, state: dict) -> None:
        self.indices = state["indices"].to(self.device)
        self.layers = state["layers"].to(self.device)
        self.finished = state["finished"].to(self.device)
        if "cost_weights" in state:
            self.cost_weights = state["cost_weights"].to(self.device)
        self.set_generator_state(state["generator"])

    def observations(self) -> torch.Tensor:
        """The current observation of every row (ending with its α when episodes draw their own)."""
        obs = torch.index_select(self._obs, 0, self.indices * self.num_layers + self.layers)
        return obs if self.costs is None else torch.cat([obs, self.cost_weights[:, None]], 1)

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
        self._draw_costs()
        self.layers.zero_()
        self.finished.zero_()
        return self.observations(), {"index": self.indices.clone()}

    def reset_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Start new random episodes in the rows where ``rows`` (bool ``[num_envs]``) is True; returns all rows'
        observations. For frameworks that reset finished rows themselves (TorchRL's partial resets)."""
        rows = torch.as_tensor(rows, dtype=torch.bool, device=self.device)
        self.indices = torch.where(rows, self._draw(self.num_envs), self.indices)
        self._draw_costs(rows)
        self.layers = torch.where(rows, 0, self.layers)
        self.finished = self.finished & ~rows
        return self.observations()

    def step(self, actions):
        actions = torch.as_tensor(actions, device=self.device)
        flat = self.indices * self.num_layers + self.layers
        exits = (actions != 0) | (self.layers == self.num_layers - 1)
        if not self.autoreset:
            exits &= ~self.finished
        paid = self._rewards[flat] if self.costs is None else self._gain[flat] - self.cost_weights * self._cost[flat]
        rewards = torch.where(exits, paid, self._zeros)
        infos = {
            "exit_layer": torch.where(exits, self.layers + 1, 0),
            "prediction": self._pred[flat],
            "correct": self._correct[flat],
            "index": self.indices,
        }
        if self.autoreset:
            self.indices = torch.where(exits, self._draw(self.num_envs), self.indices)
            self._draw_costs(exits)
            self.layers = torch.where(exits, 0, self.layers + 1)
        else:
            self.finished |= exits
            self.layers = torch.where(self.finished, self.layers, self.layers + 1)
        obs = self.observations()
        truncations = torch.zeros_like(exits)
        return obs, rewards, exits, truncations, infos
