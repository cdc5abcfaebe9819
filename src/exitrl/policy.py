"""`ExitPolicy`: the one interface every exit rule and learned agent yields.

Inference walks a batch up the layers; at each layer the policy sees the rows still in the batch and says which
exit. Rows that exit leave the batch, so a policy that keeps per-row memory (a patience counter, a previous
prediction) returns it as tensors with the batch as first dimension, and the caller compacts them with the batch.
The last layer always exits; there the caller shows the rows to `observe_final`, so a policy that adapts online
(FREE's threshold, refitted from how often its shallow exit agreed with the deep one) learns without labels.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from exitrl.core.observation import (
    TokenExit,
    build_observation,
    confidence_measure,
    exit_predictions,
    exit_probs,
    init_history,
)


@dataclass
class LayerBatch:
    """The rows still running at 1-indexed ``layer``: pooled ``states [B, H]`` and exit ``logits [B, C]``.
    ``extras`` may carry ``rows``, the rows' indices in the evaluated split, and ``split_size``, its length (only
    analysis oracles read them). ``history`` ``[B, K]``: the rows' history features (`exitrl.core.observation`), which
    the walks track for a policy whose ``uses_history`` is True (None otherwise)."""

    layer: int
    num_layers: int
    states: torch.Tensor
    logits: torch.Tensor
    extras: dict = field(default_factory=dict)
    history: torch.Tensor | None = None
    token: TokenExit | None = None  # a causal LM's exits: the emitted tokens and entropies (exitrl.core.observation)

    @cached_property
    def observations(self) -> torch.Tensor:
        """The same observation vector the envs emit (see `exitrl.core.observation`)."""
        return build_observation(self.states, self.logits, self.layer, self.num_layers, self.history, self.token)

    def features(self, layout, view: str) -> torch.Tensor:
        """The feature ``view`` of the observations (`exitrl.core.observation.ObservationLayout.view`), building only
        what it reads: the pooled state alone needs no probabilities, entropy or concatenation, which on a GPU are
        most of a small decision's kernels."""
        if view == "state":
            return self.states.float()
        return layout.select(self.observations, view)

    @cached_property
    def probs(self) -> torch.Tensor:
        """The probabilities confidence measures read: every class, or a token exit's top k."""
        return exit_probs(self.logits, self.token)

    @cached_property
    def prediction(self) -> torch.Tensor:
        """What each row's exit emits here: the argmax class, or the token."""
        return exit_predictions(self.logits, self.token)

    def confidence(self, measure: str) -> torch.Tensor:
        """``maxprob``, ``margin`` or ``entropy`` of each row's exit (`exitrl.core.observation.confidence_measure`)."""
        return confidence_measure(self.logits, measure, self.token)


Memory = dict[str, torch.Tensor]


class ExitPolicy(ABC):
    """Decides, layer by layer, which rows of a batch exit. The last layer always exits (the caller enforces it)."""

    name: str = "policy"
    deployable: bool = True
    # What the GPU fast path (`exitrl.runtime.fast_walk`) may rely on. ``graph_safe``: `decide` is tensor operations
    # only, with no host reads and no Python state that changes between calls, so it can be captured in a CUDA graph.
    # ``first_exit_layer``: no row ever exits before this 1-indexed layer, so `decide` need not run (nor exit
    # heads be computed) below it; a policy whose memory must see every layer keeps 1.
    graph_safe: bool = False
    first_exit_layer: int = 1
    # Whether `decide` reads ``LayerBatch.history``: the walks then track it in the per-row memory from layer 1.
    uses_history: bool = False

    @property
    def observes_final(self) -> bool:
        """Whether `observe_final` does anything (the fast path then shows it the rows at the last layer)."""
        return type(self).observe_final is not ExitPolicy.observe_final

    def init_memory(self, batch_size: int, device: torch.device) -> Memory:
        """Per-row memory for a new batch; stateless policies keep none."""
        return {}

    @abstractmethod
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        """Boolean ``[B]``: True where the row exits at ``batch.layer``. May update ``memory`` in place."""

    def observe_final(self, batch: LayerBatch, memory: Memory) -> None:  # noqa: B027 - optional hook
        """Called with the rows that reached the last layer (which exit there by force); default: nothing."""

    def to(self, device: torch.device) -> ExitPolicy:
        return self

    # -- persistence: the class path, its constructor arguments and its tensors ----------------------------
    def config(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - stateless policies have nothing to load
        """Restore tensors saved by `state_dict`."""

    def save_native(self, folder: str | Path) -> list[str]:
        """Write framework-native files beside policy.pt (an SB3 ``.zip``, so that ``PPO.load`` and continued
        training work); returns their names. Default: none."""
        return []

    def payload(self) -> dict:
        """What `policy_from_payload` rebuilds the policy from: its class, constructor config and tensors."""
        return {"class": f"{type(self).__module__}:{type(self).__qualname__}", "config": self.config(),
                "state": self.state_dict()}

    def save(self, path: str | Path) -> None:
        torch.save(self.payload(), path)


class ModuleExitPolicy(ExitPolicy):
    """A policy whose tensors live in one `torch.nn.Module` (``self.module``): device moves and persistence
    follow that module, so learned policies only say how they decide and what their constructor needs."""

    module: torch.nn.Module

    def to(self, device: torch.device) -> ModuleExitPolicy:
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def walk_memory(policy: ExitPolicy, batch_size: int, hidden_size: int, device: torch.device) -> Memory:
    """The per-row memory a walk keeps for ``policy``: its own, plus the history entries when it reads them."""
    memory = policy.init_memory(batch_size, device)
    if policy.uses_history:
        memory.update(init_history(batch_size, hidden_size, device))
    return memory


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> ExitPolicy:
    """Load any policy saved with `ExitPolicy.save`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)  # strings, dicts and tensors only
    return policy_from_payload(payload).to(torch.device(device))


def policy_from_payload(payload: dict) -> ExitPolicy:
    """The policy an `ExitPolicy.payload` describes (on the CPU)."""
    module_name, _, qualname = payload["class"].partition(":")
    cls = getattr(importlib.import_module(module_name), qualname)
    policy = cls(**payload["config"])
    policy.load_state_dict(payload["state"])
    return policy
