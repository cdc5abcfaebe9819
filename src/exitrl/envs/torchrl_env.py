"""`TorchRLEarlyExitEnv`: the batched trace env as a TorchRL `EnvBase` over TensorDicts.

It wraps `TraceVectorEnv` without autoreset: TorchRL resets finished rows itself (``"_reset"`` masks), so a row
that exits reports ``done`` and waits for its partial reset. Specs: observation ``[B, D]`` float32, action
categorical {0 continue, 1 exit} ``[B]``, reward ``[B, 1]``, done / terminated ``[B, 1]``; all on the env's device.
With ``costs`` each episode draws its α and its observation ends with it (`TraceVectorEnv`).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from exitrl.envs.vector_env import TraceVectorEnv
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import SplitTrace


class TorchRLEarlyExitEnv(EnvBase):
    def __init__(self, trace: SplitTrace, num_envs: int, reward: RewardSpec | str | None = None, device="cpu",
                 seed: int = 0, costs: list[float] | None = None):
        device = torch.device(device)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.inner = TraceVectorEnv(trace, num_envs, reward, device=device, autoreset=False, seed=seed, costs=costs)
        size = self.inner.observation_size
        self.observation_spec = Composite(
            observation=Unbounded(shape=(num_envs, size), dtype=torch.float32, device=device),
            layer=Unbounded(shape=(num_envs, 1), dtype=torch.int64, device=device),
            shape=(num_envs,), device=device,
        )
        self.action_spec = Categorical(2, shape=(num_envs,), dtype=torch.int64, device=device)
        self.reward_spec = Unbounded(shape=(num_envs, 1), dtype=torch.float32, device=device)
        self.done_spec = Composite(
            done=Categorical(2, shape=(num_envs, 1), dtype=torch.bool, device=device),
            terminated=Categorical(2, shape=(num_envs, 1), dtype=torch.bool, device=device),
            truncated=Categorical(2, shape=(num_envs, 1), dtype=torch.bool, device=device),
            shape=(num_envs,), device=device,
        )

    def _observation(self, obs: torch.Tensor) -> dict:
        return {"observation": obs, "layer": (self.inner.layers + 1).unsqueeze(-1)}

    def restore(self, state: dict) -> None:
        """Put back a checkpointed `TraceVectorEnv.state`. The next full reset (a new collector's first) continues
        those episodes instead of drawing new ones, so a resumed collector sees what the killed one would have."""
        self.inner.set_state(state)
        self._continue_episodes = True

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        if tensordict is not None and "_reset" in tensordict.keys():
            rows = tensordict.get("_reset").reshape(self.batch_size)
        if getattr(self, "_continue_episodes", False) and bool(rows.all()):
            self._continue_episodes = False
            obs = self.inner.observations()
        else:
            obs = self.inner.reset_rows(rows)
        done = torch.zeros((*self.batch_size, 1), dtype=torch.bool, device=self.device)
        return TensorDict({**self._observation(obs), "done": done, "terminated": done.clone(),
                           "truncated": done.clone()}, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs, reward, terminated, _, _ = self.inner.step(tensordict.get("action"))
        terminated = terminated.unsqueeze(-1)
        return TensorDict({**self._observation(obs), "reward": reward.unsqueeze(-1), "done": terminated.clone(),
                           "terminated": terminated, "truncated": torch.zeros_like(terminated)},
                          batch_size=self.batch_size, device=self.device)

    def _set_seed(self, seed: int | None):
        if seed is not None:
            self.inner._generator.manual_seed(int(seed))
