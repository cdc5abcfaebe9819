"""Early-exit environments over a trace: a Gymnasium env (registered) and a batched torch vector env.

Envs never import agents; agents and policies import envs. The TorchRL env lives in `exitrl.envs.torchrl_env`,
imported on demand so that plain Gymnasium users never load TorchRL.
"""

import gymnasium as gym

from exitrl.core.observation import FEATURES, ObservationLayout, build_observation, check_features, observation_table
from exitrl.envs.early_exit_env import CONTINUE, EXIT, EarlyExitEnv
from exitrl.envs.spaces import observation_box
from exitrl.envs.vector_env import TraceVectorEnv

ENV_ID = "exitrl/EarlyExit-v0"
if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="exitrl.envs.early_exit_env:EarlyExitEnv")

__all__ = [
    "CONTINUE", "ENV_ID", "EXIT", "FEATURES", "EarlyExitEnv", "ObservationLayout", "TraceVectorEnv",
    "build_observation", "check_features", "observation_box", "observation_table",
]
