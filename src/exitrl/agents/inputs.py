"""What every agent's ``fit`` receives, and the one place that decides which split an agent learns on.

``learn_on`` (config key): ``auto`` learns on the held-out split when the trace has one (``data.policy_split`` > 0:
states of examples the backbone never saw, like the ones it meets at inference), else on train; ``train`` and
``held_out`` force one. Calibrated rules always certify on the held-out split; `held_out_error` is the one message
that says how to get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from exitrl.core.checkpoint import Checkpoints
from exitrl.rewards import RewardSpec
from exitrl.traces.trace import HELD_OUT, SplitTrace, Trace

LEARN_ON = ("auto", "train", "held_out")


def held_out_error(who: str, alternative: str = "") -> ValueError:
    """``who`` needs the held-out split and the run has none: say how to get one (and any ``alternative``)."""
    return ValueError(f"{who} needs examples the backbone never saw: add data.policy_split=0.2 (holds 20 % of train "
                      f"out of fine-tuning){alternative}.")


def learn_split(learn_on: str, has_held_out: bool) -> str:
    """The trace split (``train`` or the held-out ``policy``) agents learn on; fails on a bad ``learn_on`` or on
    ``held_out`` without a held-out split. Runs call it before any fine-tuning, with what the trace will have."""
    if learn_on not in LEARN_ON:
        raise ValueError(f"Unknown learn_on {learn_on!r}; valid: {', '.join(LEARN_ON)}.")
    if learn_on == "held_out" and not has_held_out:
        raise held_out_error("learn_on=held_out")
    if learn_on == "train" or not has_held_out:
        return "train"
    return HELD_OUT


@dataclass
class FitInputs:
    """The trace, the split to learn on (already decided), the reward, where to compute and where to log."""

    trace: Trace
    learn_on: str = "train"  # a split of ``trace``: "train" or "policy" (from `learn_split`)
    reward: RewardSpec = RewardSpec()
    device: torch.device = torch.device("cpu")
    writer: object = None  # a TensorBoard SummaryWriter, or None
    log_dir: Path | None = None  # the run's TensorBoard folder, for agents with a logger of their own (SB3)
    metric: str = "accuracy"
    checkpoints: Checkpoints | None = None  # where an agent that checkpoints saves, and resumes from

    @classmethod
    def from_splits(cls, learn: SplitTrace, dev: SplitTrace | None = None, held_out: SplitTrace | None = None,
                    **kwargs) -> FitInputs:
        """Inputs over explicit splits (the Python API and tests): ``learn`` is the training split."""
        splits = {"train": learn, **({"dev": dev} if dev is not None else {}),
                  **({HELD_OUT: held_out} if held_out is not None else {})}
        return cls(Trace(splits), "train", **kwargs)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.reward = RewardSpec.coerce(self.reward)

    @property
    def learn(self) -> SplitTrace:
        """The split the agent learns (or fits) on."""
        return self.trace[self.learn_on]

    @property
    def train(self) -> SplitTrace:
        """The backbone's own training split (CALM's meta classifier learns the backbone's agreement pattern here)."""
        return self.trace["train"]

    @property
    def dev(self) -> SplitTrace | None:
        """For learning curves only: no agent may choose anything by it."""
        return self.trace.splits.get("dev")

    @property
    def held_out(self) -> SplitTrace | None:
        return self.trace.splits.get(HELD_OUT)

    def require_held_out(self, who: str, alternative: str = "") -> SplitTrace:
        if self.held_out is None:
            raise held_out_error(who, alternative)
        return self.held_out
