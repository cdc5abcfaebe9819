"""The Gymnasium id of exitrl's env, registered by ``import exitrl`` with a string entry point, so that importing
the package (and starting the ``exitrl`` command) loads Gymnasium but not torch; the env's module loads on
``gym.make``."""

from __future__ import annotations

ENV_ID = "exitrl/EarlyExit-v0"
ENTRY_POINT = "exitrl.envs.early_exit_env:EarlyExitEnv"


def register_env() -> None:
    import gymnasium as gym

    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point=ENTRY_POINT)
