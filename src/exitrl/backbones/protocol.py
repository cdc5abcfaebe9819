"""The one seam every backbone exposes, encoder classifier (`MultiExitModel`) or causal LM (`MultiExitLM`): embed a
batch, run layer i on a state with what the layers share, read the exit at layer i. Trace building, training and
the runtimes are loops over these three calls."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LayerwiseBackbone(Protocol):
    num_layers: int
    hidden_size: int

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The embedded batch ``[B, T, H]`` and what every layer takes besides the state (masks, positions, cache)."""

    def run_layer(self, index: int, hidden: torch.Tensor, layer_inputs: dict) -> torch.Tensor:
        """Layer ``index`` (0-based) of the model's own layers on ``hidden``."""

    def exit_logits(self, index: int, state: torch.Tensor) -> torch.Tensor:
        """The exit at layer ``index`` (0-based): class logits of a pooled state, or vocabulary logits of token
        states."""
