"""Token traces: a causal LM's exits at every teacher-forced position of packed text, one episode per position.

An episode walks position t of a chunk up the layers; its label is the true token t+1. Per (position, layer) the
trace keeps what policies read without the vocabulary (`exitrl.core.observation.TokenExit`): the top-k log-probabilities
and the rest's mass as compact logits, the emitted token, the entropy of the whole distribution, log p(true next
token), and the token state, optionally projected to ``state_dim`` features by a fixed random Gaussian map (a
576-wide state per layer and token would make a trace of 100k tokens 3.5 GB; 64 features keep it at 0.4 GB).
The memorized layer, agreement with the last layer and both oracles follow from these tables, so every env, agent,
rule and reward runs on a token trace unchanged.
"""

from __future__ import annotations

import math

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.device import autocast
from exitrl.core.distributed import current_world, in_order
from exitrl.core.observation import summarize_token_logits
from exitrl.core.progress import progress
from exitrl.traces.trace import STATE_DTYPE, SplitTrace


def state_projection(hidden_size: int, state_dim: int | None, seed: int = 0) -> torch.Tensor | None:
    """A fixed ``[H, state_dim]`` Gaussian map scaled by 1/sqrt(state_dim) (distances kept in expectation), or None
    to keep states whole."""
    if state_dim is None or state_dim >= hidden_size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, state_dim, generator=generator) / math.sqrt(state_dim)


@torch.no_grad()
def build_token_split(model: MultiExitLM, chunks: list[dict], k: int = 8, state_dim: int | None = 64,
                      batch_size: int = 8, device: torch.device | str = "cpu", seed: int = 0) -> SplitTrace:
    """The token trace of ``chunks`` (equal-length ``{"input_ids"}``, `exitrl.data.lm_text.pack`): one row per
    position that has a successor, ``N = chunks × (length − 1)``. Under several processes each traces every
    size-th batch and every process gets the merged split, as one process makes it."""
    if k < 2:
        raise ValueError(f"a token trace keeps the top k >= 2 log-probabilities (CALM's margin needs two), got {k}.")
    if not chunks:
        raise ValueError("No chunks to trace: give more text or a shorter chunk length.")
    device = torch.device(device)
    model.eval().to(device)
    projection = state_projection(model.hidden_size, state_dim, seed)
    projection = None if projection is None else projection.to(device)
    names = ("states", "logits", "labels", "predictions", "entropy", "label_lp")
    world = current_world()
    mine: dict[int, dict[str, torch.Tensor]] = {}
    starts = range(world.rank * batch_size, len(chunks), world.size * batch_size)
    for first in progress(starts, desc="token trace", unit="batch", disable=world.rank != 0):
        ids = torch.tensor([c["input_ids"] for c in chunks[first:first + batch_size]], device=device)
        targets = ids[:, 1:].reshape(-1)
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in names if name != "labels"}
        with autocast(device):
            states = model.layer_states(ids)
        for layer, hidden in enumerate(states):
            hidden = hidden[:, :-1].reshape(-1, model.hidden_size)
            with autocast(device):
                full = model.exit_logits(layer, hidden).float()
            compact, token = summarize_token_logits(full, k)
            label_lp = torch.log_softmax(full, -1).gather(1, targets[:, None]).squeeze(1)
            state = hidden.float() if projection is None else hidden.float() @ projection
            for name, value in (("states", state.to(STATE_DTYPE)), ("logits", compact), ("entropy", token.entropy),
                                ("predictions", token.predictions), ("label_lp", label_lp)):
                columns[name].append(value.cpu())
        mine[first] = {name: torch.stack(values, 1) for name, values in columns.items()}  # [rows, L, ...]
        mine[first]["labels"] = targets.cpu()
    parts = in_order(mine)
    joined = {name: torch.cat([part[name] for part in parts]) for name in names}
    return SplitTrace.from_token_exits(joined["states"], joined["logits"], joined["labels"], joined["predictions"],
                                       joined["entropy"], joined["label_lp"])
