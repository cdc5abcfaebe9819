"""LayerSkip's self-speculative greedy decoding (Elhoushi et al., 2024) on the engine: draft with the first E
layers and the shared exit, verify the drafts with layers E+1..L in one pass, reusing the draft's cache of the first
E layers.

It emits exactly the full model's greedy tokens (in exact arithmetic: in half precision a pass over d tokens rounds
differently from d passes over one, and a near-tie may flip): every emitted token is either a draft the full model
confirmed at its position or the full model's own token. In a batch every row keeps its own confirmed drafts and
its own verified next token, so rows advance at their own pace: each row writes at its own slots (the engine takes
slots per row). A rejected draft's cache entries need no rollback: the next cycle writes over those slots, and until
then they lie past every query of that row. A row that is done (``max_new_tokens``, or its end of sequence) stops
advancing and repeats its last cycle, which rewrites the same entries, until every row is done.

One cycle (d draft steps and the verification) is one replayable step, so a GPU runs a cycle as one graph launch and
one host read (how many drafts each row confirmed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding.engine import Engine, Generation, check_new_tokens, finish


def draft_vocabulary(token_ids: torch.Tensor | Sequence[Sequence[int]], size: int,
                     vocab_size: int | None = None) -> torch.Tensor:
    """The ``size`` most frequent token ids in ``token_ids`` (text the model produced, e.g. its own samples or
    greedy outputs), sorted: the tokens drafts may propose. The full model still verifies every draft, so the
    output is unchanged; what changes is the drafter's cost (SmolLM2's LM head weighs as much as 8 of its layers on
    a CPU; 8,192 of its 49,152 rows cost a sixth) and, for tokens outside the set, a draft that is rejected."""
    if size < 1:
        raise ValueError(f"a draft vocabulary needs size >= 1, got {size}.")
    flat = token_ids.flatten() if isinstance(token_ids, torch.Tensor) else \
        torch.tensor([t for row in token_ids for t in row], dtype=torch.long)
    if flat.numel() == 0:
        raise ValueError("a draft vocabulary needs some token ids to count; got none.")
    if int(flat.min()) < 0 or (vocab_size is not None and int(flat.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{(vocab_size or 0) - 1}: got {int(flat.min())}.."
                         f"{int(flat.max())}.")
    counts = torch.bincount(flat.cpu(), minlength=vocab_size or 0)
    top = torch.topk(counts, min(size, int((counts > 0).sum()))).indices
    return top.sort().values


def check_self_speculative(model: MultiExitLM, exit_layer: int, draft_tokens: int) -> None:
    """Self-speculative decoding's settings, for this model: a ValueError names what is wrong."""
    if model.num_layers < 2:
        raise ValueError("self-speculative decoding needs at least 2 layers (a draft and a verifier).")
    if not 1 <= exit_layer < model.num_layers:
        raise ValueError(f"exit_layer must lie in 1..{model.num_layers - 1} (the draft's last layer), got "
                         f"{exit_layer}.")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}.")


@torch.no_grad()
def self_speculative(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 32, exit_layer: int = 4, draft_tokens: int = 4,
                     eos_token_id: int | None = None, pad_token_id: int = 0,
                     graphs: bool | None = None, on_tokens: Callable[[int], None] | None = None,
                     compile: bool = False, vocabulary: torch.Tensor | None = None) -> Generation:
    """Draft ``draft_tokens`` tokens with layers 1..``exit_layer`` and the shared exit (through its exit adapter when
    one is attached), verify them with the rest in one pass. Output = `greedy`'s. ``vocabulary``: the token ids
    drafts may propose (`draft_vocabulary`; None: all). ``on_tokens(n)``: told of every n new token positions of
    the slowest unfinished row (a progress bar's update)."""
    check_self_speculative(model, exit_layer, draft_tokens)
    check_new_tokens(max_new_tokens)
    head = None
    if vocabulary is not None:
        vocabulary = torch.as_tensor(vocabulary, dtype=torch.long, device=input_ids.device).flatten()
        if vocabulary.numel() == 0 or int(vocabulary.min()) < 0 or int(vocabulary.max()) >= model.vocab_size:
            raise ValueError(f"vocabulary must hold token ids in 0..{model.vocab_size - 1} (at least one).")
        head = model.lm_head.weight[vocabulary]  # gathered once: the drafter's rows of the LM head
    started, last, d = time.perf_counter(), model.num_layers, draft_tokens
    engine = Engine(model, input_ids, attention_mask, max_new_tokens + d, graphs, compile)
    token = engine.prefill(input_ids).clone()  # each row's newest token (the full model's first); not cached yet
    base = torch.full((engine.batch, 1), engine.prompt_length, dtype=torch.long, device=engine.device)  # its slot
    offsets = torch.arange(d, device=engine.device)[None, :]
    drafts = torch.zeros(engine.batch, d, dtype=torch.long, device=engine.device)
    verified = torch.zeros_like(drafts)

    def cycle() -> None:
        inputs, states = token, []
        for i in range(d):  # draft: one token at a time through the first E layers (their cache is kept)
            hidden, layer_inputs = engine.embed(inputs, base + i)
            hidden = engine.layers(hidden, layer_inputs, 0, exit_layer)
            states.append(hidden)
            inputs = engine.greedy_token(exit_layer, hidden, layer_inputs, vocabulary, head)
            drafts[:, i:i + 1] = inputs
        # verify: the d inputs' layer-E states through the remaining layers, at their slots, in one pass
        hidden = engine.run(base + offsets, exit_layer, last, hidden=torch.cat(states, 1))
        verified.copy_(engine.greedy_token(last, hidden))  # the full model's token after each input

    def finished(row: list[int]) -> bool:
        return len(row) >= max_new_tokens or (eos_token_id is not None and eos_token_id in row)

    replay = engine.step(cycle, "self-speculative cycle")
    newest = token[:, 0].cpu()  # the host's copy of ``token``
    rows = [[t] for t in newest.tolist()]
    done = [finished(row) for row in rows]
    per_row: list[list[int]] = [[] for _ in rows]  # tokens each cycle emitted, per row
    steps, drafted, accepted = 1, 0, 0

    def reached() -> int:  # the token positions every row has: a finished row has all it will get
        return min(max_new_tokens if done[r] else min(len(row), max_new_tokens) for r, row in enumerate(rows))

    told = reached()
    if on_tokens is not None:
        on_tokens(told)
    while not all(done):
        replay()
        host_drafts, host_verified = torch.stack([drafts, verified]).cpu()  # the one host read of a cycle
        confirmed = (host_verified == host_drafts).int().cumprod(1).sum(1).tolist()
        advance = [0] * len(rows)
        for r, n in enumerate(confirmed):
            if done[r]:
                continue
            emitted = host_drafts[r, :n].tolist() + host_verified[r, n:n + 1].tolist()
            rows[r] += emitted
            per_row[r].append(len(emitted))
            drafted, accepted = drafted + d, accepted + n
            done[r] = finished(rows[r])
            if not done[r]:  # a finished row stays where it is (its slots never pass the cache's end)
                advance[r] = len(emitted)
                newest[r] = emitted[-1]
        token.copy_(newest[:, None].to(engine.device))
        base.add_(torch.tensor(advance, device=engine.device)[:, None])
        steps += 1
        if on_tokens is not None:
            now = reached()
            on_tokens(now - told)
            told = now
    width = max(min(len(row), max_new_tokens) for row in rows)
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, :min(len(row), width)] = torch.tensor(row[:width])
    out = finish(out.to(engine.device), eos_token_id, pad_token_id)
    return Generation(out, steps, drafted, accepted, time.perf_counter() - started,
                      info={"emitted_per_cycle": per_row})
