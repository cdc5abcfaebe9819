"""One walk up the layers, for every consumer: evaluating a policy on a trace, the inference runtime, co-training.

A `LayerSource` gives, layer by layer, the pooled states and exit logits of the rows still running (read from a
trace, or computed by the backbone itself); the policy sees them as a `LayerBatch` and says which rows exit; the
rows that exit leave, and the source and the policy's per-row memory are compacted together. Since the policy meets
the same `LayerBatch` whether the source is a trace or the live backbone, "runtime equals trace" is a property of
this one loop, and tests check it. Per layer the loop reads one thing back from the device: which rows stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from exitrl.core.observation import exit_predictions, step_history
from exitrl.policy import ExitPolicy, LayerBatch, walk_memory
from exitrl.traces.trace import SplitTrace


class LayerSource(Protocol):
    num_layers: int

    def layer(self, layer: int) -> tuple:
        """Pooled states ``[B, H]`` and exit logits ``[B, C]`` of the running rows at 1-indexed ``layer``, and for
        token exits a third item, their `TokenExit`."""

    def keep(self, stay: torch.Tensor) -> None:
        """Keep only the rows at the indices ``stay`` (long ``[B']``, in order)."""


@dataclass
class Exits:
    """Where each row exited (1-indexed), what it predicted there and the exit head's logits there."""

    layers: torch.Tensor
    predictions: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def walk(policy: ExitPolicy, source: LayerSource, size: int, device: torch.device, ids: torch.Tensor | None = None,
         split_size: int | None = None) -> Exits:
    """Walk ``size`` rows up ``source``'s layers under ``policy``. ``ids`` (the rows' indices in an evaluated
    split of ``split_size`` rows) reach the policy as ``LayerBatch.extras`` (only analysis oracles read them)."""
    num_layers = source.num_layers
    layers = torch.empty(size, dtype=torch.long, device=device)
    predictions = torch.empty(size, dtype=torch.long, device=device)
    exit_logits = None
    position = torch.arange(size, device=device)  # where each running row's answer goes
    extras = {} if ids is None else {"rows": ids, "split_size": split_size}
    for layer in range(1, num_layers + 1):
        states, logits, *token = source.layer(layer)
        token = token[0] if token else None
        if layer == 1:  # the first layer says how wide the states are (the history keeps the previous one)
            memory = walk_memory(policy, size, states.shape[-1], device)
        history = step_history(memory, states, logits, token) if policy.uses_history else None
        batch = LayerBatch(layer, num_layers, states.float(), logits, extras, history, token)
        if layer == num_layers:
            policy.observe_final(batch, memory)
            leave = torch.ones_like(position, dtype=torch.bool)
        else:
            leave = policy.decide(batch, memory).to(torch.bool)
        if exit_logits is None:
            exit_logits = torch.empty(size, logits.shape[-1], device=device)
        # record the exits with device-side selects (no host read), then one host read: which rows stay
        layers[position] = torch.where(leave, layer, layers[position])
        predictions[position] = torch.where(leave, exit_predictions(logits, token), predictions[position])
        exit_logits[position] = torch.where(leave[:, None], logits.float(), exit_logits[position])
        stay = torch.nonzero(~leave).squeeze(1)  # the layer's one host read
        if stay.numel() == 0:
            break
        position = position[stay]
        memory = {k: v[stay] for k, v in memory.items()}
        source.keep(stay)
        if ids is not None:
            ids = ids[stay]
            extras = {"rows": ids, "split_size": split_size}
    return Exits(layers, predictions, exit_logits)


class TraceSource:
    """Rows of a trace split, read layer by layer."""

    def __init__(self, trace: SplitTrace, rows: torch.Tensor):
        self.trace, self.rows, self.num_layers = trace, rows, trace.num_layers

    def layer(self, layer: int) -> tuple:
        states, logits = self.trace.states[self.rows, layer - 1], self.trace.logits[self.rows, layer - 1]
        token = self.trace.token
        return (states, logits) if token is None else (states, logits, token.select((self.rows, layer - 1)))

    def keep(self, stay: torch.Tensor) -> None:
        self.rows = self.rows[stay]
