"""Early-exit environments over a trace: a Gymnasium env (registered) and a batched torch vector env.

Envs never import agents; agents and policies import envs. The TorchRL env lives in `exitrl.envs.torchrl_env`,
imported on demand so that plain Gymnasium users never load TorchRL.
"""

from exitrl.core.observation import FEATURES, ObservationLayout, build_observation, check_features, observation_table
from exitrl.core.registration import ENV_ID, register_env
from exitrl.envs.early_exit_env import CONTINUE, EXIT, EarlyExitEnv
from exitrl.envs.spaces import observation_box
from exitrl.envs.vector_env import TraceVectorEnv

register_env()

__all__ = [
    "CONTINUE", "ENV_ID", "EXIT", "FEATURES", "EarlyExitEnv", "ObservationLayout", "TraceVectorEnv",
    "build_observation", "check_features", "observation_box", "observation_table",
]
