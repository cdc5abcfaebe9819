"""Greedy decoding with a `MultiExitLM`, batched, rows of different prompt lengths (left padding): the full model,
and LayerSkip's self-speculative decoding (draft with the first E layers through the shared exit, verify the
drafts with the remaining layers in one pass, reusing the draft's KV cache of the first E layers).

Self-speculative decoding emits exactly the full model's greedy tokens: every emitted token is either a draft the
full model confirmed at its position or the full model's own token. In a batch, each step keeps the drafts that
every row confirmed (the shortest accepted prefix) and then each row's verified next token, so all rows stay
aligned in one KV cache (`DynamicCache.crop` removes the rest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.observation import step_history, summarize_token_logits
from exitrl.policy import LayerBatch, walk_memory


@dataclass
class Generation:
    """``tokens [B, n]`` generated (after a row's EOS: ``pad``), and what it cost."""

    tokens: torch.Tensor
    steps: int  # forward passes of the last layer (full steps, or verifications)
    drafted: int = 0  # draft tokens proposed (per row)
    accepted: int = 0  # of them, kept (policy decoding: layers skipped, summed over rows)
    seconds: float = 0.0
    cache: object = None  # the KV cache at the end (policy decoding), for inspection

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _Decoder:
    """The running state of one batch: the KV cache, and the attention mask and position of every position the
    first layer holds (the deep layers may hold fewer while a draft is being verified)."""

    def __init__(self, model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.model = model
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.cache = model.new_cache()
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts its own tokens

    def prefill(self, input_ids: torch.Tensor, last: int) -> torch.Tensor:
        return self.run(input_ids, 0, last, None, self.positions)

    def append(self, ids: torch.Tensor) -> torch.Tensor:
        """Give ``ids [B, t]`` the next positions (returned) and unmasked columns."""
        positions = self.positions[:, -1:] + 1 + torch.arange(ids.shape[1], device=ids.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], 1)
        self.positions = torch.cat([self.positions, positions], 1)
        return positions

    def step(self, ids: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Append ``ids [B, t]`` at the next positions and run them through layers first..last−1."""
        return self.run(ids, first, last, None, self.append(ids))

    def run(self, ids: torch.Tensor, first: int, last: int, hidden: torch.Tensor | None,
            positions: torch.Tensor) -> torch.Tensor:
        """Layers first..last−1 on ``ids`` at ``positions`` (or, from layer ``first``, on the states ``hidden``),
        appending their keys and values; returns the output states ``[B, t, H]``."""
        embedded, layer_inputs = self.model.embed(ids, self.mask, self.cache, positions, cache_layer=first)
        hidden = embedded if hidden is None else hidden
        for index in range(first, last):
            hidden = self.model.run_layer(index, hidden, layer_inputs)
        return hidden

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions of the cache (every layer), the mask and the positions."""
        for layer in self.cache.layers:  # a negative count removes that many tokens (every transformers 5.x)
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)
        self.mask, self.positions = self.mask[:, :length], self.positions[:, :length]


def _start(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """A decoder over the prompts, after the prefill, and the full model's first token of every row."""
    model.eval()
    decoder = _Decoder(model, input_ids, attention_mask)
    last = model.num_layers
    return decoder, model.exit_logits(last - 1, decoder.prefill(input_ids, last)[:, -1:]).argmax(-1)


def _all_ended(tokens: list[torch.Tensor], eos: int | None) -> bool:
    return eos is not None and bool((torch.cat(tokens, 1) == eos).any(1).all())


def _finish(tokens: list[torch.Tensor], eos: int | None, pad: int, max_new_tokens: int) -> torch.Tensor:
    out = torch.cat(tokens, 1)[:, :max_new_tokens]
    if eos is not None:
        ended = (out == eos).int().cumsum(1) - (out == eos).int() > 0  # after the first EOS
        out = out.masked_fill(ended, pad)
    return out


@torch.no_grad()
def greedy(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           max_new_tokens: int = 32, eos_token_id: int | None = None, pad_token_id: int = 0) -> Generation:
    """The full model's greedy decoding (every layer, every token)."""
    started, last = time.perf_counter(), model.num_layers
    decoder, token = _start(model, input_ids, attention_mask)
    tokens, steps = [token], 1
    while len(tokens) < max_new_tokens:
        token = model.exit_logits(last - 1, decoder.step(token, 0, last)).argmax(-1)
        tokens.append(token)
        steps += 1
        if _all_ended(tokens, eos_token_id):
            break
    return Generation(_finish(tokens, eos_token_id, pad_token_id, max_new_tokens), steps,
                      seconds=time.perf_counter() - started)


def check_self_speculative(model: MultiExitLM, exit_layer: int, draft_tokens: int) -> None:
    """Self-speculative decoding's settings, for this model: a ValueError names what is wrong."""
    if model.num_layers < 2:
        raise ValueError("self-speculative decoding needs at least 2 layers (a draft and a verifier).")
    if not 1 <= exit_layer < model.num_layers:
        raise ValueError(f"exit_layer must lie in 1..{model.num_layers - 1} (the draft's last layer), got "
                         f"{exit_layer}.")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}.")
    if "sliding_attention" in model.layer_types:
        raise ValueError("self-speculative decoding rolls the KV cache back after a rejected draft, which "
                         "sliding-window layers cannot do once their window is full; use greedy decoding for this "
                         "model.")


@torch.no_grad()
def self_speculative(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 32, exit_layer: int = 4, draft_tokens: int = 4,
                     eos_token_id: int | None = None, pad_token_id: int = 0) -> Generation:
    """LayerSkip's self-speculative greedy decoding: draft ``draft_tokens`` tokens with layers 1..``exit_layer``
    and the shared exit, verify them with layers ``exit_layer``+1..L in one pass. Output = `greedy`'s."""
    check_self_speculative(model, exit_layer, draft_tokens)
    started, last = time.perf_counter(), model.num_layers
    decoder, token = _start(model, input_ids, attention_mask)  # the full model's first token
    tokens, steps, drafted, accepted = [token], 1, 0, 0
    while sum(t.shape[1] for t in tokens) < max_new_tokens:
        base = decoder.mask.shape[1]  # positions every layer holds; ``token`` is not among them yet
        # 1. Draft: the next tokens from the first E layers, one at a time (their KV goes to the first E layers).
        inputs, states, drafts = token, [], []
        for _ in range(draft_tokens):
            hidden = decoder.step(inputs, 0, exit_layer)
            states.append(hidden)
            inputs = model.exit_logits(exit_layer - 1, hidden).argmax(-1)
            drafts.append(inputs)
        drafts = torch.cat(drafts, 1)  # [B, d]: the draft after each input
        # 2. Verify: the d inputs' layer-E states through the remaining layers, all positions in one pass (the deep
        # layers' masks are sized by their own cache, which does not hold the drafted positions yet).
        fed = torch.cat([token, drafts[:, :-1]], 1)
        hidden = decoder.run(fed, exit_layer, last, torch.cat(states, 1), decoder.positions[:, base:])
        verified = model.exit_logits(last - 1, hidden).argmax(-1)  # [B, d]: the full model's token after each
        n = int((verified == drafts).int().cumprod(1).sum(1).min())  # the drafts every row confirmed
        # 3. Emit them and each row's verified next token (none when all d were confirmed: the last draft is next);
        # keep the cache of the inputs that were right.
        emitted = torch.cat([drafts[:, :n], verified[:, n:n + 1]], 1)
        decoder.crop(base + min(n + 1, draft_tokens))
        tokens.append(emitted)
        token = emitted[:, -1:]
        steps, drafted, accepted = steps + 1, drafted + draft_tokens, accepted + n
        if _all_ended(tokens, eos_token_id):
            break
    return Generation(_finish(tokens, eos_token_id, pad_token_id, max_new_tokens), steps, drafted, accepted,
                      time.perf_counter() - started)


PROPAGATIONS = ("copy", "recompute")


@torch.no_grad()
def policy_decoding(model: MultiExitLM, policy, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, top_k: int = 8, state_projection: torch.Tensor | None = None,
                    propagation: str = "copy", eos_token_id: int | None = None, pad_token_id: int = 0) -> Generation:
    """Greedy decoding where an `ExitPolicy` decides per row and layer when a token may leave, seeing what it saw
    in a token trace (`exitrl.token_tracing`: compact top-``top_k`` logits, the emitted token, the entropy, states
    through ``state_projection``). A row that exits emits its exit's token. What the layers it skipped owe later
    tokens (their keys and values) comes from ``propagation``: ``copy`` (CALM: the exited state is copied up and
    every deeper layer computes its keys and values from it) or ``recompute`` (the layers run on as usual, so the
    cache is the full model's). This reference loop runs every layer for every row (no time is saved yet); the
    returned ``steps`` counts decoding steps and ``accepted`` the layers the policy skipped, summed over rows."""
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}.")
    started, last = time.perf_counter(), model.num_layers
    decoder, token = _start(model, input_ids, attention_mask)
    tokens, skipped = [token], 0
    while len(tokens) < max_new_tokens:
        positions = decoder.append(token)  # first: the mask gains the new column
        hidden, layer_inputs = model.embed(token, decoder.mask, decoder.cache, positions)
        rows = token.shape[0]
        emitted = torch.zeros_like(token)
        running = torch.ones(rows, dtype=torch.bool, device=token.device)
        frozen = hidden
        memory = None
        for index in range(last):
            out = model.run_layer(index, hidden, layer_inputs)
            # a row that has exited keeps its exited state (copy) or goes on (recompute), for the cache's sake
            hidden = torch.where(running[:, None, None], out, frozen) if propagation == "copy" else out
            if not bool(running.any()):
                continue
            compact, exit_token = summarize_token_logits(model.exit_logits(index, out[:, 0]), top_k)
            states = out[:, 0].float() if state_projection is None else out[:, 0].float() @ state_projection
            if memory is None:
                memory = walk_memory(policy, rows, states.shape[-1], token.device)  # history included if read
            history = step_history(memory, states, compact, exit_token) if policy.uses_history else None
            batch = LayerBatch(index + 1, last, states, compact, {}, history, exit_token)
            leave = torch.ones(rows, dtype=torch.bool, device=token.device) if index == last - 1 else \
                policy.decide(batch, memory).to(torch.bool)
            leave &= running
            emitted = torch.where(leave[:, None], exit_token.predictions[:, None], emitted)
            skipped += int(leave.sum()) * (last - 1 - index)
            frozen = torch.where(leave[:, None, None], out, frozen)
            running &= ~leave
        token = emitted
        tokens.append(token)
        if _all_ended(tokens, eos_token_id):
            break
    return Generation(_finish(tokens, eos_token_id, pad_token_id, max_new_tokens), len(tokens), 0, skipped,
                      time.perf_counter() - started, decoder.cache)
