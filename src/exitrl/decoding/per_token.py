"""Per-token early exits on the engine: at every decoding step a decider says, per row and layer, whether the token
may leave; a row that leaves emits its exit's token. Any `ExitPolicy` is a decider (`PolicyDecider`), and so is CALM
(`exitrl.decoding.calm`).

What the layers a token skipped owe the tokens after it (their keys and values) is the ``propagation``:

* ``copy`` (CALM): the exited state is copied up; every deeper layer's keys and values for that token are its own
  projections of that state (`MultiExitLM.write_keys_values`: the layer's norm, key/value projections and rotary
  embedding, not its attention or MLP);
* ``recompute``: the deeper layers run as usual on the token's true states, so the cache is the full model's and
  only the exit's choice of token differs (no layer is saved; what decisions would be with an exact cache).

A batch runs a layer while any row is still in it; a row that has left keeps its exited state (``copy``) or its
true states (``recompute``) for those layers, and once every row has left, the rest of the layers only fill the
cache. What a token pays is kept to what it saves:

* the layers between two places a token may leave (``exit_layers``, and for a graph-safe decider nothing below its
  ``first_exit_layer``) are one replayable step, ending in that place's exit head and, for a decider that can be
  captured, its decision: a token that leaves at E runs E layers, one head and one decision;
* "fill from layer j" is one step, and under ``copy`` one fused step where the architecture allows
  (`exitrl.decoding.fused_fill`: one matrix product for every skipped layer's keys and values);
* the host reads one flag per place a token may leave: at once where segments are long (the GPU idles for a read
  rather than run a segment it may not need), or one segment behind where they are short (``read_ahead``; the
  segment run meanwhile on exited states writes exactly the propagated entries, so the cache is the same).

On a small model restricting the places pays most: SmolLM2-135M's exit head costs as much as eight of its layers
on a CPU, so a head at every layer costs more than the layers a token skips.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.graphs import tree_copy
from exitrl.core.observation import step_history, summarize_token_logits
from exitrl.decoding.engine import Engine, Generation, all_ended, finish
from exitrl.decoding.fused_fill import fused_fill_for
from exitrl.policy import ExitPolicy, LayerBatch, walk_memory

PROPAGATIONS = ("copy", "recompute")


class Decider:
    """What the per-token loop asks at each layer: which rows' tokens may leave. ``graph_safe``: ``decide`` runs on
    the device only and may be captured with its layer (``reset`` then restores its device state per token);
    ``needs_logits``: it reads the exit's logits (else the loop runs the exit head once per token);
    ``first_exit_layer``: no row leaves before this 1-indexed layer."""

    graph_safe: bool = False
    needs_logits: bool = True
    first_exit_layer: int = 1

    def start_token(self, step: int) -> None:
        """On the host, before the token at 1-based ``step`` of the new tokens."""

    def reset(self) -> None:
        """Inside the captured embedding step, for a graph-safe decider's device state."""

    def decide(self, index: int, states: torch.Tensor, logits: torch.Tensor,
               previous: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: leave at 0-based layer ``index``, given its output ``states [B, 1, H]``, its exit's
        ``logits [B, V]`` (when ``needs_logits``) and its input ``previous [B, 1, H]`` (the state before it)."""
        raise NotImplementedError


class PolicyDecider(Decider):
    """An `ExitPolicy` asked per token and layer, seeing what it saw in a token trace (`exitrl.traces.tokens`):
    compact top-``top_k`` logits, the emitted token, the entropy, states through ``state_projection``. A policy
    without per-token memory whose decision can be captured (``graph_safe``: a learned MLP, a confidence rule) is
    captured with the layer; one with memory (patience, history features) decides eagerly."""

    def __init__(self, policy: ExitPolicy, num_layers: int, top_k: int = 8,
                 state_projection: torch.Tensor | None = None):
        if not policy.deployable:
            raise ValueError(f"The {policy.name} policy is analysis only (it reads answers it cannot have while "
                             "decoding); pick a deployable agent or rule.")
        self.policy, self.num_layers, self.top_k = policy, num_layers, top_k
        self.projection = state_projection
        self.first_exit_layer = max(1, int(getattr(policy, "first_exit_layer", 1) or 1))
        memoryless = not policy.uses_history and not policy.init_memory(1, torch.device("cpu"))
        self.graph_safe = bool(policy.graph_safe) and memoryless
        self.memory = {} if self.graph_safe else None
        # the static rule reads nothing: no head per exit place and no features, only its layer
        self.static_layer = policy.layer if isinstance(policy, StaticPolicy) else None
        self.needs_logits = self.static_layer is None

    def start_token(self, step: int) -> None:
        if not self.graph_safe:
            self.memory = None

    def decide(self, index: int, states: torch.Tensor, logits: torch.Tensor,
               previous: torch.Tensor) -> torch.Tensor:
        if self.static_layer is not None:
            return torch.full((states.shape[0],), index + 1 >= self.static_layer, device=states.device)
        compact, token = summarize_token_logits(logits, self.top_k)
        states = states[:, 0].float()
        if self.projection is not None:
            if self.projection.device != states.device:  # moved once, on the first (eager) call
                self.projection = self.projection.to(states.device)
            states = states @ self.projection
        if self.memory is None:
            self.memory = walk_memory(self.policy, states.shape[0], states.shape[-1], states.device)
        history = step_history(self.memory, states, compact, token) if self.policy.uses_history else None
        batch = LayerBatch(index + 1, self.num_layers, states, compact, {}, history, token)
        return self.policy.decide(batch, self.memory).to(torch.bool)


def checked_exit_layers(exit_layers: Sequence[int] | None, num_layers: int) -> frozenset[int]:
    """The 1-indexed layers a token may leave at, the last included; refuses anything but layers of this model."""
    if exit_layers is None:
        return frozenset(range(1, num_layers + 1))
    layers = list(exit_layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= num_layers]
    if bad or not layers:
        raise ValueError(f"exit_layers must be layers between 1 and {num_layers} (1-indexed), got {layers!r}"
                         + (f"; not layers of this model: {bad!r}" if bad else "") + ".")
    return frozenset(layers) | {num_layers}


def exit_points(exits_at: frozenset[int], decider: Decider, last: int) -> list[int]:
    """The 1-indexed layers the loop stops at, in order. A graph-safe decider keeps no per-layer memory and promises
    no row leaves before its ``first_exit_layer``, so the layers below it are no stops (their head and decision
    would say no); a decider with memory is asked at every allowed layer, as in its trace."""
    floor = decider.first_exit_layer if decider.graph_safe else 1
    return sorted(layer for layer in exits_at if layer >= floor or layer == last)


@torch.no_grad()
def per_token_decoding(model: MultiExitLM, decider: Decider, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                       propagation: str = "copy", eos_token_id: int | None = None, pad_token_id: int = 0,
                       graphs: bool | None = None, exit_layers: Sequence[int] | None = None,
                       on_tokens: Callable[[int], None] | None = None, read_ahead: bool | None = None,
                       fused_fill: bool = True, compile: bool = False) -> Generation:
    """Greedy decoding where ``decider`` lets tokens leave early (see the module's docstring). The first token is
    the full model's (the prompt runs every layer). ``accepted`` counts the layers skipped, summed over rows.
    ``exit_layers``: the 1-indexed layers where a token may leave (None: every layer; the last is always one).
    ``read_ahead``: queue the next segment before reading whether every row left (None: on a GPU when segments
    are short, where a host read would leave it idle longer than the segment it may waste). ``fused_fill``: fill
    the skipped layers' keys and values in one step where the architecture allows (`FusedFill`); ``compile``: every
    step through ``torch.compile`` before it is captured. ``on_tokens(n)``: told of every n new token positions (a
    progress bar's update)."""
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}.")
    started, last = time.perf_counter(), model.num_layers
    points = exit_points(checked_exit_layers(exit_layers, last), decider, last)
    engine = Engine(model, input_ids, attention_mask, max_new_tokens, graphs, compile)
    token = engine.prefill(input_ids).clone()
    slot = torch.full((1,), engine.prompt_length, dtype=torch.long, device=engine.device)
    embedded, inputs = engine.embed(token, slot)  # allocates the buffers the steps write in place
    hidden, frozen, out = embedded.clone(), embedded.clone(), embedded.clone()
    logits = torch.zeros(engine.batch, model.vocab_size, device=engine.device)
    running = torch.ones(engine.batch, dtype=torch.bool, device=engine.device)
    emitted = torch.zeros_like(token)
    exit_at = torch.full((engine.batch,), last, dtype=torch.long, device=engine.device)
    copy = propagation == "copy"
    kv_only = copy and model.keys_values_exact
    fused = fused_fill_for(model) if kv_only and fused_fill else None
    # a decider that reads no logits (CALM's saturation or meta measure) gets no exit head per layer: with shared
    # exits the head runs once per token, on each row's exited state (SmolLM2's head weighs as much as 8 layers)
    # (an exit adapter makes an exit's head its own: then each exit emits its own tokens)
    per_layer_head = decider.needs_logits or not model.shared_heads or model.exit_adapters is not None
    attending = engine.attending_exits  # exit adapters with a cache: a token that skips them still owes it
    on_gpu = engine.device.type == "cuda"
    lengths = [b - a for a, b in zip([0, *points], points)]
    if read_ahead is None:
        read_ahead = on_gpu and sum(lengths) / len(lengths) < 3
    anyone = torch.zeros(last, dtype=torch.bool, pin_memory=on_gpu)  # per exit layer: is a row still running
    done = [torch.cuda.Event() for _ in range(last)] if on_gpu else None

    def embed() -> None:
        state, layer_inputs = engine.embed(token, slot)
        hidden.copy_(state)
        frozen.copy_(state)
        tree_copy(inputs, layer_inputs)
        running.fill_(True)
        exit_at.fill_(last)
        if decider.graph_safe:
            decider.reset()

    def settle(index: int) -> None:
        """Who leaves at this layer, what they emit, and what the next layer reads."""
        leave = running.clone() if index == last - 1 else running & decider.decide(index, out, logits, hidden)
        if per_layer_head:
            emitted.copy_(torch.where(leave[:, None], logits.argmax(-1, keepdim=True), emitted))
        exit_at.copy_(torch.where(leave, index + 1, exit_at))
        frozen.copy_(torch.where(leave[:, None, None], out, frozen))
        running.copy_(running & ~leave)
        hidden.copy_(torch.where(running[:, None, None], out, frozen) if copy else out)

    def report(index: int) -> None:
        anyone[index:index + 1].copy_(running.any().reshape(1), non_blocking=True)

    def segment(first: int, end: int):
        """Layers first..end−1 (0-based) as one step, ending at the exit after layer ``end`` (1-indexed): a row
        that has left reads its exited state at every layer (``copy``), so the cache gets its entries."""
        def run() -> None:
            engine.cache.slots = slot  # this token's slot (another method's step may have left its own)
            state = hidden
            for index in range(first, end - 1):
                state = model.run_layer(index, state, inputs)
                if copy:
                    state = torch.where(running[:, None, None], state, frozen)
            if end - 1 > first:
                hidden.copy_(state)  # the exit layer's input (CALM's saturation compares with it)
            out.copy_(model.run_layer(end - 1, hidden, inputs))
            if per_layer_head:
                logits.copy_(model.exit_logits(end - 1, out, inputs)[:, 0].float())
            if decider.graph_safe:
                settle(end - 1)
                report(end - 1)
        return run

    def all_left(index: int) -> bool:
        """Whether every row had left by layer index+1 (waits for that layer's step only)."""
        if done is not None:
            done[index].synchronize()
        return not bool(anyone[index])

    def fill(first: int):
        """Every row has left: layers first..L−1's cache entries for this token."""
        def run() -> None:
            engine.cache.slots = slot
            for exit_layer in attending:  # the skipped exit adapters' entries, from the exited state
                if exit_layer > first and exit_layer in points:
                    model.exit_adapters.adapt(exit_layer, frozen, inputs)
            if fused is not None:
                fused(first, frozen, inputs, slot)
                return
            state = frozen if copy else hidden
            for deeper in range(first, last):
                if kv_only:
                    model.write_keys_values(deeper, state, inputs)
                elif copy:
                    model.run_layer(deeper, state, inputs)  # its output is dropped: only its cache entries count
                else:
                    state = model.run_layer(deeper, state, inputs)
        return run

    def emit() -> None:
        """The shared exit once, on every row's exited state."""
        emitted.copy_(model.exit_logits(last - 1, frozen[:, 0]).argmax(-1, keepdim=True))

    embed_step = engine.step(embed, "per-token embedding")
    emit_step = None if per_layer_head else engine.step(emit, "exit head")
    segment_steps = [engine.step(segment(a, b), f"layers {a + 1}-{b}") for a, b in zip([0, *points], points)]
    fill_steps = {end: engine.step(fill(end), f"fill from layer {end + 1}") for end in points[:-1]}
    tokens, exits = [token.clone()], [torch.full_like(exit_at, last)]
    if on_tokens is not None:
        on_tokens(1)
    while len(tokens) < max_new_tokens:
        decider.start_token(len(tokens))
        embed_step()
        for k, end in enumerate(points):
            segment_steps[k]()
            if not decider.graph_safe:
                settle(end - 1)
                report(end - 1)
            if end == last:
                break
            if done is not None:
                done[end - 1].record()
            if not read_ahead:  # wait for this exit: the rest of the layers only fill the cache
                if all_left(end - 1):
                    fill_steps[end]()
                    break
            elif k > 0 and all_left(points[k - 1] - 1):
                # every row had left at the exit before; this segment ran on their exited states (its cache
                # entries are the propagated ones): the layers after it only fill the cache
                fill_steps[end]()
                break
        if emit_step is not None:
            emit_step()
        tokens.append(emitted.clone())
        exits.append(exit_at.clone())
        token.copy_(emitted)
        slot.add_(1)
        if on_tokens is not None:
            on_tokens(1)
        if len(tokens) % 8 == 0 and all_ended(torch.cat(tokens, 1), eos_token_id):  # a host read every 8 tokens
            break
    exit_layers = torch.stack(exits, 1)
    skipped = int((last - exit_layers[:, 1:]).sum())
    out_tokens = finish(torch.cat(tokens, 1), eos_token_id, pad_token_id)
    return Generation(out_tokens, len(tokens), 0, skipped, time.perf_counter() - started, exit_layers,
                      {"cache": engine.cache, "fused_fill": fused is not None, "read_ahead": read_ahead,
                       "exit_points": points})


def policy_decoding(model: MultiExitLM, policy: ExitPolicy, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, top_k: int = 8,
                    state_projection: torch.Tensor | None = None, propagation: str = "copy",
                    eos_token_id: int | None = None, pad_token_id: int = 0, graphs: bool | None = None,
                    exit_layers: Sequence[int] | None = None,
                    on_tokens: Callable[[int], None] | None = None, compile: bool = False,
                    read_ahead: bool | None = None, fused_fill: bool = True) -> Generation:
    """Greedy decoding where an `ExitPolicy` (a learned agent or a rule) decides per token, row and layer (at
    ``exit_layers`` only, when given); the engine's options are `per_token_decoding`'s."""
    decider = PolicyDecider(policy, model.num_layers, top_k, state_projection)
    return per_token_decoding(model, decider, input_ids, attention_mask, max_new_tokens, propagation, eos_token_id,
                              pad_token_id, graphs, exit_layers, on_tokens, read_ahead, fused_fill, compile)
