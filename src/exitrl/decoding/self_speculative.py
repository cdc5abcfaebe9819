"""LayerSkip's self-speculative greedy decoding (Elhoushi et al., 2024) on the engine: draft with the first E
layers and the shared exit, verify the drafts with layers E+1..L in one pass, reusing the draft's cache of the first
E layers.

It emits exactly the full model's greedy tokens (in exact arithmetic: in half precision a pass over d tokens rounds
differently from d passes over one, and a near-tie may flip): every emitted token is either a draft the full model
confirmed at its position or the full model's own token. In a batch, a cycle keeps the drafts every row still
decoding confirmed (the shortest accepted prefix; rows past their end of sequence do not count) and then each row's
verified next token, so all rows stay on the same slots. A rejected draft's
cache entries need no rollback: the next cycle writes over those slots, and until then they lie past every query.

One cycle (d draft steps and the verification) is one replayable step, so a GPU runs a cycle as one graph launch and
one host read (how many drafts every row confirmed).
"""

from __future__ import annotations

import time

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding.engine import Engine, Generation, check_new_tokens, finish


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
                     graphs: bool | None = None) -> Generation:
    """Draft ``draft_tokens`` tokens with layers 1..``exit_layer`` and the shared exit, verify them with the rest in
    one pass. Output = `greedy`'s."""
    check_self_speculative(model, exit_layer, draft_tokens)
    check_new_tokens(max_new_tokens)
    started, last, d = time.perf_counter(), model.num_layers, draft_tokens
    engine = Engine(model, input_ids, attention_mask, max_new_tokens + d, graphs)
    token = engine.prefill(input_ids).clone()  # the full model's first token; not in the cache yet
    base = torch.full((1,), engine.prompt_length, dtype=torch.long, device=engine.device)  # ``token``'s slot
    offsets = torch.arange(d, device=engine.device)
    drafts = torch.zeros(engine.batch, d, dtype=torch.long, device=engine.device)
    verified = torch.zeros_like(drafts)

    def cycle() -> None:
        inputs, states = token, []
        for i in range(d):  # draft: one token at a time through the first E layers (their cache is kept)
            hidden = engine.run(base + i, 0, exit_layer, ids=inputs)
            states.append(hidden)
            inputs = engine.greedy_token(exit_layer, hidden)
            drafts[:, i:i + 1] = inputs
        # verify: the d inputs' layer-E states through the remaining layers, at their slots, in one pass
        hidden = engine.run(base + offsets, exit_layer, last, hidden=torch.cat(states, 1))
        verified.copy_(engine.greedy_token(last, hidden))  # the full model's token after each input

    replay = engine.step(cycle, "self-speculative cycle")
    tokens, produced, steps, drafted, accepted, per_cycle = [token.clone()], 1, 1, 0, 0, []
    ended = torch.zeros(engine.batch, dtype=torch.bool)  # rows past their end of sequence (host)
    if eos_token_id is not None:
        ended |= token[:, 0].cpu() == eos_token_id
    while produced < max_new_tokens and not bool(ended.all()):
        replay()
        host_drafts, host_verified = torch.stack([drafts, verified]).cpu()  # the one host read of a cycle
        confirmed = (host_verified == host_drafts).int().cumprod(1).sum(1)
        n = int(confirmed[~ended].min())  # the drafts every row still decoding confirmed
        emitted = torch.cat([host_drafts[:, :n], host_verified[:, n:n + 1]], 1)
        tokens.append(emitted.to(engine.device))
        token.copy_(tokens[-1][:, -1:])
        base.add_(emitted.shape[1])
        produced += emitted.shape[1]
        per_cycle.append(emitted.shape[1])
        steps, drafted, accepted = steps + 1, drafted + d, accepted + n
        if eos_token_id is not None:
            ended |= (emitted == eos_token_id).any(1)
    out = finish(torch.cat(tokens, 1)[:, :max_new_tokens], eos_token_id, pad_token_id)
    return Generation(out, steps, drafted, accepted, time.perf_counter() - started,
                      info={"emitted_per_cycle": per_cycle})
