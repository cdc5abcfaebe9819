"""Learned agents and fixed baselines; each yields an `ExitPolicy`."""

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.reinforce import ReinforceConfig, ReinforcePolicy, train_reinforce

__all__ = ["ConfidencePolicy", "ReinforceConfig", "ReinforcePolicy", "train_reinforce"]
