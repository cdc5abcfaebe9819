"""The decoding engine every method runs on: a KV cache in fixed buffers, slots instead of a growing sequence, and
masks and positions the engine builds itself, so any step can be captured once as a CUDA graph and replayed.

* **Slots.** Column ``s`` of every layer's cache holds the token at slot ``s`` of the batch (the prompts, left-
  padded, occupy slots 0..T−1). A step writes its tokens at given slots; a token at slot ``s`` attends to the
  real slots ``<= s`` (and, in a sliding-window layer, to the last ``window`` of them). Nothing is ever cropped:
  a rejected draft is simply overwritten by the next token at that slot, and until then masked out.
* **Positions.** Row ``r`` has ``pad[r]`` padding slots first, so slot ``s`` is its position ``s − pad[r]``.
* **Fixed tensors.** A step's inputs (token ids, slots, states) live in tensors the caller allocates once and
  updates in place; every intermediate is made inside the step. On a GPU `Replayable` runs a step eagerly once,
  captures it and replays it from then on; on a CPU the same code runs eagerly every time (how the CPU tests check
  the GPU's code).

The engine drives the model's own modules through `MultiExitLM` (``embed_tokens``, ``layer_inputs``,
``run_layer``, ``write_keys_values``, ``exit_logits``): the cache object only has to answer the ``update`` call
transformers' attention layers make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.graphs import Replayable

CAPACITY_BUCKET = 64  # compiled steps: cache lengths rounded up to a multiple of this
RECOMPILE_LIMIT = 256  # compiled steps: entries per step function (one per segment, batch size and cache bucket)


class SlotCache:
    """Every layer's keys and values in ``[B, kv_heads, capacity, head_dim]`` buffers (allocated by the first write,
    the prefill, which runs eagerly); a layer's ``update`` writes its new tokens at ``slots`` (``[q]`` for every row,
    or ``[B, q]`` per row) and returns the whole buffers (the mask hides the slots not yet written or no longer
    wanted). With ``layers``, the first write allocates every layer at once as views of one stacked tensor
    ``[layers, B, kv_heads, capacity, head_dim]``, so a step can write many layers' entries in one go
    (`write_stacked`, the fused fill)."""

    def __init__(self, capacity: int, layers: int | None = None):
        self.capacity, self.layers = capacity, layers
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.key_stack: torch.Tensor | None = None
        self.value_stack: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None  # set by the engine before every run

    def allocate(self, like: torch.Tensor, layers: int) -> None:
        """Every layer's buffers, shaped after ``like [B, kv_heads, q, head_dim]``, as views of one stack."""
        batch, heads, _, dim = like.shape
        self.key_stack = like.new_zeros(layers, batch, heads, self.capacity, dim)
        self.value_stack = like.new_zeros(layers, batch, heads, self.capacity, dim)
        for index in range(layers):
            self.keys[index], self.values[index] = self.key_stack[index], self.value_stack[index]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            if self.layers is not None and self.key_stack is None and layer_idx < self.layers \
                    and key_states.shape[-1] == value_states.shape[-1]:
                self.allocate(key_states, self.layers)
            else:
                batch, heads, _, dim = key_states.shape
                self.keys[layer_idx] = key_states.new_zeros(batch, heads, self.capacity, dim)
                self.values[layer_idx] = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        if self.slots.dim() == 1:  # every row writes at the same slots
            self.keys[layer_idx].index_copy_(2, self.slots, key_states)
            self.values[layer_idx].index_copy_(2, self.slots, value_states)
        else:  # ``[B, q]``: each row at its own slots
            index = self.slots[:, None, :, None]
            self.keys[layer_idx].scatter_(2, index.expand_as(key_states), key_states)
            self.values[layer_idx].scatter_(2, index.expand_as(value_states), value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def write_stacked(self, first: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Layers ``first``.. ``first + len(keys)``'s entries ``[layers, B, kv_heads, q, head_dim]`` at ``slots
        [q]``, in one write each."""
        last = first + keys.shape[0]
        self.key_stack[first:last].index_copy_(3, slots, keys)
        self.value_stack[first:last].index_copy_(3, slots, values)


@dataclass
class Generation:
    """``tokens [B, n]`` generated (after a row's end of sequence: ``pad``), and what it cost."""

    tokens: torch.Tensor
    steps: int  # greedy and per-token: tokens decoded; self-speculative: 1 + verifications; FREE: 1 + deep passes
    drafted: int = 0  # self-speculative: draft tokens proposed, summed over rows
    accepted: int = 0  # self-speculative: drafts kept, summed over rows; per-token exits: layers skipped, summed
    seconds: float = 0.0
    exit_layers: torch.Tensor | None = None  # per-token exits: ``[B, n]`` the 1-indexed layer each token left at
    info: dict | None = None

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_exit_layer(self) -> float | None:
        return None if self.exit_layers is None else float(self.exit_layers.float().mean())


def check_left_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("decoding needs left-padded prompts (padding first, as tokenizer(padding_side='left') "
                         "gives): a row of the attention mask goes from 1 back to 0.")
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt row(s) {empty} have no token (all padding); give every row at least one token.")


def check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")


class Engine:
    """One batch's decoding state: the slot cache, the padding of every row, the graph pool."""

    def __init__(self, model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 new_slots: int, graphs: bool | None = None, compile: bool = False):
        """``new_slots``: how many slots past the prompts the method may write; ``graphs``: capture steps as CUDA
        graphs (default: on CUDA); ``compile``: each step through ``torch.compile`` first (its kernels fused), then
        captured."""
        check_new_tokens(new_slots)
        model.eval()
        self.model, self.device = model, input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        check_left_padded(mask)
        self.batch, self.prompt_length = input_ids.shape
        self.pad = (mask == 0).sum(1)
        self.capacity = self.prompt_length + new_slots
        if compile:  # a compiled step specializes on the cache's shape: bucket it, so prompts of near lengths share
            self.capacity = -(-self.capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
        self.cache = SlotCache(self.capacity, model.num_layers)
        self.key_slots = torch.arange(self.capacity, device=self.device)
        self.dtype = model.lm_head.weight.dtype
        self.window = getattr(model.config, "sliding_window", None) or self.capacity  # None: nothing slides
        capture = self.device.type == "cuda" if graphs is None else graphs and self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.compile = compile

    # -- the pieces steps are made of -------------------------------------------------------------------------
    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        """Each row's positions ``[B, q]`` for tokens at ``slots`` (``[q]``: the same for every row, or ``[B, q]``)."""
        rows = slots if slots.dim() == 2 else slots[None, :]
        return (rows - self.pad[:, None]).clamp(min=0)

    def inputs(self, slots: torch.Tensor, hidden: torch.Tensor) -> dict:
        """The layers' inputs for tokens at ``slots`` (``[q]`` or ``[B, q]``): positions, one additive mask per
        attention type over every slot, rotary embeddings, the cache (pointed at ``slots``)."""
        positions = self.positions(slots)
        keys = self.key_slots[None, None, :]
        here = (slots if slots.dim() == 2 else slots[None, :])[:, :, None]
        # a real token sees the real slots up to its own; a padding slot sees only itself (never an empty row,
        # whose softmax would be NaN in half precision and poison every later read of its keys and values)
        visible = ((keys >= self.pad[:, None, None]) & (keys <= here)) | (keys == here)  # [B, q, capacity]
        blocked = torch.finfo(self.dtype).min
        masks = {"full_attention": torch.where(visible, 0.0, blocked).to(self.dtype)[:, None]}
        if "sliding_attention" in self.model.layer_types:
            near = keys > here - self.window
            masks["sliding_attention"] = torch.where(visible & near, 0.0, blocked).to(self.dtype)[:, None]
        self.cache.slots = slots
        return self.model.layer_inputs(hidden, positions, masks, self.cache)

    def embed(self, ids: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden = self.model.embed_tokens(ids, self.positions(slots))
        return hidden, self.inputs(slots, hidden)

    def layers(self, hidden: torch.Tensor, inputs: dict, first: int, last: int) -> torch.Tensor:
        """Layers first..last−1 (0-based) on ``hidden``; each writes its keys and values at the inputs' slots."""
        for index in range(first, last):
            hidden = self.model.run_layer(index, hidden, inputs)
        return hidden

    def run(self, slots: torch.Tensor, first: int, last: int, ids: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``ids`` (from the embedding) or states ``hidden`` (entering layer ``first``) at ``slots``
        through layers first..last−1."""
        if ids is not None:
            hidden, inputs = self.embed(ids, slots)
        else:
            inputs = self.inputs(slots, hidden)
        return self.layers(hidden, inputs, first, last)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompts through every layer (eagerly: their length varies), and through every attached exit adapter
        that attends (its keys and values for the prompt); the full model's first token ``[B, 1]``."""
        slots = torch.arange(self.prompt_length, device=self.device)
        hidden, inputs = self.embed(input_ids, slots)
        for index in range(self.model.num_layers):
            hidden = self.model.run_layer(index, hidden, inputs)
            if index + 1 in self.attending_exits:
                self.model.exit_adapters.adapt(index + 1, hidden, inputs)
        return self.greedy_token(self.model.num_layers, hidden[:, -1:])

    @property
    def attending_exits(self) -> tuple[int, ...]:
        """The 1-indexed exits whose attached adapter attends over earlier tokens (it keeps a cache of its own)."""
        adapters = self.model.exit_adapters
        return adapters.exit_layers if adapters is not None and adapters.needs_cache else ()

    def greedy_token(self, layer: int, hidden: torch.Tensor, inputs: dict | None = None,
                     vocabulary: torch.Tensor | None = None, head: torch.Tensor | None = None) -> torch.Tensor:
        """The exit at 1-indexed ``layer``'s greedy tokens ``[B, q]`` for states ``[B, q, H]`` (through its exit
        adapter; ``inputs``: what the states ran with, which an adapter that attends needs); ``vocabulary``/``head``:
        only these token ids, scored by these rows of the LM head (a cheaper drafter)."""
        states = self.model.exit_states(layer - 1, hidden, inputs)
        if vocabulary is None:
            return self.model.lm_head(states).argmax(-1)
        scores = states @ head.t()
        if self.model.lm_head.bias is not None:
            scores = scores + self.model.lm_head.bias[vocabulary]
        return vocabulary[scores.argmax(-1)]

    def step(self, fn: Callable[[], None], name: str) -> Replayable:
        """``fn`` as a replayable step (captured on CUDA after its first, eager, run)."""
        if not self.compile:
            return Replayable(fn, self.pool, name)
        compiled = torch.compile(fn, dynamic=False)

        def run() -> None:
            # every layer segment of a method is a closure of one function: one compiled entry each
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                compiled()

        return Replayable(run, self.pool, name)


def finish(tokens: torch.Tensor, eos: int | None, pad: int) -> torch.Tensor:
    """``tokens [B, n]`` with everything after a row's first end of sequence set to ``pad``."""
    if eos is not None:
        is_eos = (tokens == eos).int()
        tokens = tokens.masked_fill(is_eos.cumsum(1) - is_eos > 0, pad)
    return tokens


def all_ended(tokens: torch.Tensor, eos: int | None) -> bool:
    return eos is not None and bool((tokens == eos).any(1).all())
