"""A trace: a frozen multi-exit backbone's outputs for every example of every split, so envs replay it as tensor
lookups and policies are evaluated without the backbone.

Per example: every layer's pooled state and exit logits, the label and the memorized layer (ConsistentEE Eq. 7).
Building a trace from a backbone (and its content-hash cache) is `exitrl.traces.build`; this module only holds and
persists the tensors, so envs, policies and evaluation need no backbone code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from exitrl.core.checkpoint import MAGIC, load_checked, save_checked
from exitrl.core.observation import TokenExit, exit_predictions, observation_table
from exitrl.core.splits import HELD_OUT

TRACE_FORMAT = 1
STATE_DTYPE = torch.float16  # pooled states are kept at this precision; policies see them so at inference too
__all__ = ["HELD_OUT", "STATE_DTYPE", "TRACE_FORMAT", "SplitTrace", "Trace", "memorized_layers"]


def memorized_layers(logits: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Smallest 1-indexed layer l such that heads l..L all predict the label; L when head L is wrong.
    ``predictions [N, L]``: what the exits emit when it is not the argmax of ``logits`` (token exits)."""
    correct = (logits.argmax(-1) if predictions is None else predictions) == labels[:, None]  # [N, L]
    num_layers = correct.shape[1]
    suffix_all = correct.flip(1).int().cumprod(1).flip(1).bool()  # suffix_all[:, l] = all(correct[:, l:])
    first = torch.where(suffix_all.any(1), suffix_all.int().argmax(1) + 1, torch.full_like(labels, num_layers))
    return first.long()


@dataclass
class SplitTrace:
    """One split: ``states [N, L, H]``, ``logits [N, L, C]``, ``labels [N]``, ``memorized [N]`` (1-indexed).

    Token traces (a causal LM's exits, one row per teacher-forced position) keep compact logits (see
    `exitrl.core.observation.TokenExit`) and three tables ``[N, L]`` more: ``predictions`` (the token each exit emits),
    ``entropy`` (of its whole distribution) and ``label_log_probs`` (log-probability of the true next token, the
    label)."""

    states: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    memorized: torch.Tensor
    predictions: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_log_probs: torch.Tensor | None = None

    def __post_init__(self):
        n, layers = self.logits.shape[:2]
        if self.states.shape[:2] != (n, layers) or self.labels.shape != (n,) or self.memorized.shape != (n,):
            raise ValueError("Inconsistent trace shapes: states, logits, labels and memorized must share N and L.")
        token_tables = (self.predictions, self.entropy, self.label_log_probs)
        if any(t is not None for t in token_tables) and any(t is None or t.shape != (n, layers)
                                                             for t in token_tables):
            raise ValueError("A token trace needs predictions, entropy and label_log_probs, each [N, L].")

    @classmethod
    def from_logits(cls, states: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> SplitTrace:
        return cls(states, logits.float(), labels.long(), memorized_layers(logits, labels.long()))

    @classmethod
    def from_token_exits(cls, states: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                         predictions: torch.Tensor, entropy: torch.Tensor, label_log_probs: torch.Tensor,
                         ) -> SplitTrace:
        """A token trace (see the class docstring); the memorized layer is computed from the predictions."""
        labels = labels.long()
        return cls(states, logits.float(), labels, memorized_layers(logits, labels, predictions), predictions.long(),
                   entropy.float(), label_log_probs.float())

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    @property
    def token(self) -> TokenExit | None:
        """The `TokenExit` tables ``[N, L]`` of a token trace; None for a classification trace."""
        return None if self.predictions is None else TokenExit(self.predictions, self.entropy)

    def prediction_table(self) -> torch.Tensor:
        """What each exit emits, ``[N, L]``."""
        return exit_predictions(self.logits, self.token)

    def observations(self) -> torch.Tensor:
        """The observation of every (row, layer), ``[N, L, D]`` (`exitrl.core.observation.observation_table`)."""
        return observation_table(self.states, self.logits, self.token)

    def reward_table(self, reward) -> torch.Tensor:
        """What ``reward`` (a `RewardSpec`) pays for exiting each row at each layer, ``[N, L]``."""
        return reward.table(self.logits, self.labels, self.memorized, self.token, self.label_log_probs)

    def select(self, rows) -> SplitTrace:
        """The rows ``rows`` (indices or a mask) of every table."""
        return SplitTrace(*(None if t is None else t[rows] for t in self.tables()))

    def tables(self) -> tuple:
        return (self.states, self.logits, self.labels, self.memorized, self.predictions, self.entropy,
                self.label_log_probs)

    def to(self, device) -> SplitTrace:
        return SplitTrace(*(None if t is None else t.to(device) for t in self.tables()))

    def per_layer_accuracy(self) -> list[float]:
        return (self.prediction_table() == self.labels[:, None]).float().mean(0).tolist()


@dataclass
class Trace:
    splits: dict[str, SplitTrace]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitTrace:
        if split not in self.splits:
            raise KeyError(f"Trace has no split {split!r}; it has {sorted(self.splits)}.")
        return self.splits[split]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": TRACE_FORMAT, "meta": self.meta,
                   "splits": {k: vars(v) for k, v in self.splits.items()}}
        save_checked(payload, path)  # atomic and checksummed: a killed writer or a bad disk is caught on load

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """A saved trace; `CorruptFile` (a ValueError) when it is truncated or altered. Traces saved before
        checksums existed load as before."""
        path = Path(path)
        with open(path, "rb") as file:
            checked = file.read(len(MAGIC)) == MAGIC
        payload = (load_checked(path, weights_only=True) if checked
                   else torch.load(path, map_location="cpu", weights_only=True))
        if payload.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path} was written by another trace format; delete it to rebuild.")
        return cls({k: SplitTrace(**v) for k, v in payload["splits"].items()}, payload["meta"])
