"""FREE (Bae et al., EMNLP 2023) for decoding: one shallow exit at layer L_s, else the full model, with
**synchronized parallel decoding** and the adaptive Beta-mixture threshold refitted online.

A row whose shallow exit is confident (max-prob ≥ the threshold) emits its token from L_s, and the token's layer-L_s
state is kept. While every row of the batch is confident the deep layers do not run; at the next token that needs
them (one row not confident), the kept states and that token's state are stacked and go through layers L_s+1..L
together, in one pass, so the deep cache is filled for all of them at once (exactly: they are the tokens' true
states). A confident row emits its shallow token even when the deep pass runs for another row. At most
``max_pending`` tokens wait; then the deep pass runs anyway (its tokens are still the shallow ones).

Every deep pass yields, for each position it covers (of rows not past their end of sequence), the shallow
confidence and whether the shallow token equals the deep one: FREE's (confidence, agreement) pairs, which
`FreePolicy.add_pairs` collects and refits the threshold from (`exitrl.calibration.beta_mixture`), so the threshold
adapts while decoding, without labels.

The shallow step and a deep pass of each width 1..``max_pending`` are replayable steps; the host reads the shallow
confidences once per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from exitrl.agents.free import FreePolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding.engine import Engine, Generation, finish


@torch.no_grad()
def free_decoding(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 32, policy: FreePolicy | None = None, shallow_layer: int | None = None,
                  threshold: float = 0.9, adaptive: bool = True, max_pending: int = 8,
                  eos_token_id: int | None = None, pad_token_id: int = 0, graphs: bool | None = None,
                  on_tokens: Callable[[int], None] | None = None) -> Generation:
    """Shallow–deep decoding (see the module's docstring). ``policy`` carries the threshold and its pairs between
    calls (a fresh one from ``shallow_layer`` (default L/4), ``threshold`` and ``adaptive`` otherwise).
    ``on_tokens(n)``: told of every n new token positions (a progress bar's update)."""
    last = model.num_layers
    if policy is None:
        policy = FreePolicy(shallow_layer or max(1, last // 4), threshold, adaptive=adaptive)
    shallow = policy.shallow_layer
    if not 1 <= shallow < last:
        raise ValueError(f"FREE's shallow layer must lie in 1..{last - 1}, got {shallow}.")
    if max_pending < 1:
        raise ValueError(f"max_pending must be >= 1, got {max_pending}.")
    started = time.perf_counter()
    engine = Engine(model, input_ids, attention_mask, max_new_tokens, graphs)
    token = engine.prefill(input_ids).clone()
    slot = torch.full((1,), engine.prompt_length, dtype=torch.long, device=engine.device)
    waiting = torch.zeros(1, dtype=torch.long, device=engine.device)  # how many states wait before this one
    pending = torch.zeros(engine.batch, max_pending, model.hidden_size, dtype=engine.dtype, device=engine.device)
    shallow_out = torch.zeros(2, engine.batch, device=engine.device)  # confidence, token
    deep_tokens = torch.zeros(engine.batch, max_pending, dtype=torch.long, device=engine.device)
    offsets = torch.arange(max_pending, device=engine.device)

    def shallow_step() -> None:
        hidden, inputs = engine.embed(token, slot)
        hidden = engine.layers(hidden, inputs, 0, shallow)
        pending.index_copy_(1, waiting, hidden)
        probs = torch.softmax(model.exit_logits(shallow - 1, hidden, inputs)[:, 0].float(), -1)
        confidence, prediction = probs.max(-1)
        shallow_out.copy_(torch.stack([confidence, prediction.float()]))

    def deep_pass(width: int):
        def run() -> None:  # the waiting states and this token's, at their slots, through the deep layers
            slots = slot - (width - 1) + offsets[:width]
            hidden = engine.run(slots, shallow, last, hidden=pending[:, :width])
            deep_tokens[:, :width] = engine.greedy_token(last, hidden)
        return run

    shallow_replay = engine.step(shallow_step, "FREE shallow step")
    deep_replays = {width: engine.step(deep_pass(width), f"FREE deep pass of {width}")
                    for width in range(1, max_pending + 1)}
    tokens, exits, deep_passes = [token.clone()], [torch.full((engine.batch,), last)], 1
    held: list[torch.Tensor] = []  # the waiting tokens' shallow (confidence, token), on the host
    thresholds = [policy.threshold]
    ended = torch.zeros(engine.batch, dtype=torch.bool)  # rows past their end of sequence (host)
    if eos_token_id is not None:
        ended |= token[:, 0].cpu() == eos_token_id
    if on_tokens is not None:
        on_tokens(1)
    while len(tokens) < max_new_tokens and not bool(ended.all()):
        waiting.fill_(len(held))
        shallow_replay()
        confidence, prediction = shallow_out.cpu()  # the one host read of a token
        held.append(torch.stack([confidence, prediction]))
        confident = confidence >= policy.threshold
        emitted = prediction.long()
        if not bool(confident.all()) or len(held) == max_pending:
            deep_replays[len(held)]()
            deep = deep_tokens[:, :len(held)].cpu()
            emitted = torch.where(confident, emitted, deep[:, -1])
            stacked = torch.stack(held, -1)  # [2, B, width]
            if policy.adaptive and bool((~ended).any()):  # FREE's pairs: every position the deep pass covered
                live = ~ended
                policy.add_pairs(stacked[0][live].flatten(), (stacked[1].long() == deep)[live].flatten())
                thresholds.append(policy.threshold)
            held, deep_passes = [], deep_passes + 1
        exits.append(torch.where(confident, shallow, last))
        tokens.append(emitted[:, None].to(engine.device))
        token.copy_(tokens[-1])
        slot.add_(1)
        if eos_token_id is not None:
            ended |= emitted == eos_token_id
        if on_tokens is not None:
            on_tokens(1)
    exit_layers = torch.stack(exits, 1)
    skipped = int((last - exit_layers[:, 1:]).sum())
    out = finish(torch.cat(tokens, 1), eos_token_id, pad_token_id)
    return Generation(out, deep_passes, 0, skipped, time.perf_counter() - started, exit_layers,
                      {"thresholds": thresholds, "refits": policy.refits})
