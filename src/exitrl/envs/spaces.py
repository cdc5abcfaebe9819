"""Gymnasium spaces of the early-exit envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def observation_box(size: int) -> gym.spaces.Box:
    """Unbounded in principle (pooled states); the float32 range keeps checkers' infinity warnings quiet."""
    limit = np.finfo(np.float32).max
    return gym.spaces.Box(-limit, limit, (size,), np.float32)
