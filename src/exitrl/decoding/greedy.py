"""The full model's greedy decoding on the engine: the baseline every early-exit method is measured against, and
the reference whose tokens self-speculative decoding must reproduce.

One step (embed the last token, every layer, the last exit's argmax, write it into the output) is one replayable
step, so on a GPU a token costs one graph launch and no host read; the end of sequence is checked every
``check_every`` tokens (tokens after a row's end are blanked anyway, so checking late changes no output).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding.engine import Engine, Generation, all_ended, finish


@torch.no_grad()
def greedy(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           max_new_tokens: int = 32, eos_token_id: int | None = None, pad_token_id: int = 0,
           graphs: bool | None = None, check_every: int = 8,
           on_tokens: Callable[[int], None] | None = None, compile: bool = False) -> Generation:
    """Greedy decoding with every layer for every token; ``graphs``: CUDA graphs (default: on CUDA);
    ``on_tokens(n)``: told of every n new token positions (a progress bar's update); ``compile``: the step
    through ``torch.compile`` before it is captured."""
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}.")
    started, last = time.perf_counter(), model.num_layers
    engine = Engine(model, input_ids, attention_mask, max_new_tokens, graphs, compile)
    out = torch.zeros(engine.batch, max_new_tokens, dtype=torch.long, device=engine.device)
    token = engine.prefill(input_ids)
    out[:, :1] = token
    slot = torch.full((1,), engine.prompt_length, dtype=torch.long, device=engine.device)
    column = torch.ones(1, dtype=torch.long, device=engine.device)

    def step() -> None:
        token.copy_(engine.greedy_token(last, engine.run(slot, 0, last, ids=token)))
        out.index_copy_(1, column, token)
        slot.add_(1)
        column.add_(1)

    replay, produced = engine.step(step, "greedy step"), 1
    if on_tokens is not None:
        on_tokens(1)
    while produced < max_new_tokens:
        replay()
        produced += 1
        if on_tokens is not None:
            on_tokens(1)
        if produced % check_every == 0 and all_ended(out[:, :produced], eos_token_id):
            break
    tokens = finish(out[:, :produced], eos_token_id, pad_token_id)
    return Generation(tokens, produced, seconds=time.perf_counter() - started)
