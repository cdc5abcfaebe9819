"""The fast path of the inference runtime: the walk of `exitrl.evaluation.walk`, shaped so a GPU can run it with
almost no per-layer overhead.

On a GPU, small batches are launch-bound: an eager layer costs more in kernel launches than in arithmetic, a layer
on 16 rows costs about what it costs on 32, and a host read per layer stalls the pipeline, so a naive early-exit
loop is slower than not exiting at all. Here:

- rows are walked in **windows**: up to ``window`` rows (several batches of at most ``max_batch`` rows, with the
  same sequence bucket) go up the layers together, and each layer runs on the window's rows still alive in launches
  of at most ``max_batch`` rows (the last one padded to a **bucket** size: powers of two to 16, then steps of 16).
  With ``window == max_batch`` (the default) a window is one batch; a larger window keeps every launch full while
  rows leave, which is what turns saved layers into saved time at small batch sizes. No launch is wider than
  ``max_batch``, so its memory is what a batch of that size needs (except in the device walk, below, whose
  launches are as wide as the window);
- every step works on fixed tensors owned by the window (`Window`) and on leading rows of them (`Rows`, views): the
  hidden states, the layer inputs, which rows are still alive, where each row's answer goes, the policy's memory
  and each row's answer. Each step runs eagerly once, is then captured as a CUDA graph and replayed from then on
  (`Replayable`): one launch per layer launch, and one for the exit heads and decisions of the window's rows;
- decisions stay on the device: rows that exit are marked dead (their answer recorded by a device-side select); the
  only host read is the number of rows alive, one copy with the answers so far, and only at layers where a row may
  exit (``ExitPolicy.first_exit_layer``; a static exit reads once). Alive rows move to the front (compaction, with
  their memory and answers; their places from running counts on the device) only when that saves a launch or
  shrinks one, so the graphs stay few (the device walk's buckets compact after every decision; its counted layers
  never move a row: they read where the alive rows are); the host puts the answers back in row order from each
  row's recorded position;
- the GPU never waits on that read: `FastWalker.run_batches` keeps several windows in flight (``lanes``, each with
  its own buffers), one walk per window as a generator that stops at each read. While the host waits for one
  window's count (an event on that window's last step, not a stream synchronisation), the GPU runs the layers
  queued for the others. A policy with state that changes between batches (``observes_final``) walks one batch
  per window, one at a time, in order, as the trace walk does, so its decisions are the ones evaluation measured;
  one with host reads (not ``graph_safe``) walks one window at a time;
- a policy that cannot be captured (``graph_safe`` False: host reads, or memory that changes shape) decides
  eagerly after the captured layers, on the same buffers; one that learns at the last layer (``observes_final``)
  sees exactly the rows that reached it.

A row's decision reads only that row, and rows are padded to the same sequence bucket whatever window they share,
so windows change when rows run, not what they answer. Without CUDA (or with ``graphs=False``) every step simply runs
eagerly: the same code, which is how the CPU tests check that this path equals `exitrl.evaluation.walk.walk` exit
for exit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from threading import RLock

import torch

from exitrl.backbones.multi_exit import SHARED, MultiExitModel
from exitrl.core.graphs import Replayable, conditional_nodes, run_if, tree_copy, tree_map
from exitrl.core.observation import step_history
from exitrl.evaluation.walk import Exits
from exitrl.policy import ExitPolicy, LayerBatch, walk_memory
from exitrl.runtime.counted_layer import CountedLayers, counted_support, triton_available, triton_interpreted
from exitrl.traces.trace import STATE_DTYPE

TOKEN_PLANES = 4  # input ids, attention mask, token types, and a plane whose column 0 marks the real rows
ANSWER_COLUMNS = 2  # a row's answer: its exit layer and where it goes (float32: exact to 2**24), then its logits


_PRECISION = RLock()  # the matmul precision is one setting of the process: one step changes it at a time


@contextmanager
def tf32_matmuls(device: torch.device | None) -> Iterator[None]:
    """float32 matrix products on tensor cores (TF32) on a CUDA ``device`` while a decision is made (run eagerly,
    captured or compiled): a policy's float32 MLP on a few rows otherwise gets a split-K kernel that costs more than
    the rest of its decision. TF32 keeps 10 mantissa bits, as many as the float16 states a policy learns from; its
    decisions may differ from float32 ones on rows at the threshold, as a bfloat16 backbone's already do. The
    setting is put back afterwards, and held under a lock meanwhile (it is global to the process; code that reads
    the legacy ``allow_tf32`` flag from another thread meanwhile may see torch refuse the mix)."""
    if device is None or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    with _PRECISION:
        try:
            before = matmul.fp32_precision  # torch >= 2.9
            name, value = "fp32_precision", "tf32"
        except AttributeError:
            before, name, value = matmul.allow_tf32, "allow_tf32", True
        setattr(matmul, name, value)
        try:
            yield
        finally:
            setattr(matmul, name, before)


def answer_views(answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exit layer ``[N]``, position ``[N]`` and exit logits ``[N, labels]`` columns of packed answers."""
    return answers[:, 0], answers[:, 1], answers[:, ANSWER_COLUMNS:]


def batch_buckets(max_batch: int) -> list[int]:
    """Row counts launches are captured for: powers of two to 16, then steps of 16 (a dead row costs at most 16
    rows of work per layer), up to ``max_batch``."""
    sizes = {1, 2, 4, 8, 16, *range(32, max_batch + 16, 16)}
    return sorted(size for size in sizes if size < max_batch) + [max_batch]


def walk_buckets(window: int, per_octave: int = 2) -> list[int]:
    """Row counts a device walk's layer may run on (`FastWalker(device_walk=True)`): 16 rows, then ``per_octave``
    sizes per doubling (16, 24, 32, 48, 64, 96, ... with 2), up to and ending at ``window``. Each one is a
    conditional launch per layer in the window's graph, so they are fewer than `batch_buckets`: a layer runs on
    at most ``1 + 1/per_octave`` times its alive rows."""
    if int(per_octave) < 1:
        raise ValueError(f"per_octave must be >= 1, got {per_octave}.")
    sizes, base = set(), 16
    while base < window:
        sizes.update(base + base * step // int(per_octave) for step in range(int(per_octave)))
        base *= 2
    return sorted(size for size in sizes if size < window) + [int(window)]


def launches(rows: int, width: int, buckets: list[int]) -> list[tuple[int, int]]:
    """``(start, size)`` of the launches that cover the first ``rows`` rows at most ``width`` at a time: full
    launches, then the smallest bucket that holds the rest."""
    full = rows - rows % width
    spans = [(start, width) for start in range(0, full, width)]
    if rows > full:
        spans.append((full, next(size for size in buckets if size >= rows - full)))
    return spans


DEVICE_WALKS = ("counted", "buckets")  # how a device walk's layers follow the alive rows (`Window.walk`)


def check_device_walk(asked: bool | str | None) -> None:
    """Refuse a ``device_walk`` that is neither a bool (or None) nor one of `DEVICE_WALKS`."""
    if asked not in (False, True, None, *DEVICE_WALKS):
        raise ValueError(f"device_walk must be a bool or one of {', '.join(DEVICE_WALKS)}; got {asked!r}.")


def device_walk_mode(asked: bool | str, model: MultiExitModel, graphs: bool) -> str | bool:
    """The device walk ``asked`` for (False, True for the best one here, or one of `DEVICE_WALKS`), checked
    against what runs here: counted layers need BERT-style layers (and Triton, on CUDA); buckets captured in CUDA
    graphs need conditional nodes. Raises ValueError naming what is missing."""
    check_device_walk(asked)
    if asked is False or asked is None:
        return False
    cuda = next(model.parameters()).device.type == "cuda"
    reason = counted_support(model) or (None if triton_available() or not cuda else "Triton is not installed")
    buckets = not graphs or conditional_nodes()
    if asked is True:
        if reason is None:
            return "counted"
        if buckets:
            return "buckets"
    if asked == "counted" and reason is not None:
        raise ValueError(f"device_walk='counted': counted layers cannot run this model: {reason}. Use "
                         "device_walk='buckets' (torch 2.13 on CUDA 12.4+), or leave it off.")
    if asked in ("buckets", True) and not buckets:
        counted = "" if reason is None else f", and counted layers cannot run this model: {reason}"
        raise ValueError(f"device_walk={asked!r}: the bucket walk captures conditional nodes into CUDA graphs, "
                         f"which torch {torch.__version__} (CUDA {torch.version.cuda}) cannot (torch 2.13 on CUDA "
                         f"12.4+ can){counted}; leave device_walk off, or walk without graphs (graphs=False: the "
                         "host reads each choice).")
    return asked


class Rows:
    """Rows ``[start, start + size)`` of a window: views of its tensors, so a step on them writes the window in
    place. The steps (embedding, layer, exit head, decision, compaction) are written once, here."""

    def __init__(self, window: Window, start: int, size: int):
        self.window, self.walker, self.start, self.size = window, window.walker, start, size
        span = slice(start, start + size)
        self.tokens = window.tokens[:, span]
        self.hidden = window.hidden[span]
        self.inputs = {k: v if k == SHARED else tree_map(lambda t: t[span], v) for k, v in window.inputs.items()}
        self.alive, self.answers = window.alive[span], window.answers[span]
        self.pool_mask, self.pool_count = window.pool_mask[span], window.pool_count[span]
        self.states, self.logits = window.states[span], window.logits[span]
        self.exit_layer, self.position, self.exit_logits = answer_views(self.answers)

    @property
    def memory(self) -> dict[str, torch.Tensor]:
        """The policy's memory of these rows (views; an eager policy may have replaced the window's tensors)."""
        return {k: v[self.start:self.start + self.size] for k, v in self.window.memory.items()}

    def embed(self) -> None:
        """Embed the staged tokens; reset which rows are alive, where their answers go and the policy's memory."""
        walker = self.walker
        ids, mask, types = self.tokens[0], self.tokens[1], self.tokens[2]
        hidden, inputs = walker.model.embed(ids, mask, types if walker.token_types else None, materialize_mask=True)
        self.hidden.copy_(hidden)
        tree_copy(self.inputs, inputs)
        tree_copy((self.pool_mask, self.pool_count), walker.model.pool_weights(mask, hidden.dtype))
        self.alive.copy_(self.tokens[3, :, 0].bool())
        rows = torch.arange(self.start, self.start + self.size, device=self.alive.device, dtype=self.answers.dtype)
        self.position.copy_(torch.where(self.alive, rows, walker.window))  # padding points past the real rows
        if walker.policy.graph_safe:  # else `Window.reset_memory` runs eagerly before the walk
            memory = self.memory
            for key, value in walker.init_memory(self.size).items():
                memory[key].copy_(value)

    def layer(self, layer: int) -> None:
        """Layer ``layer`` (1-indexed) on these rows' hidden states."""
        self.hidden.copy_(self.walker.run_layer(layer - 1, self.hidden, self.inputs))

    def exit_head(self, layer: int) -> None:
        model = self.walker.model
        # the pooling weights follow their rows through compaction; the tokens do not (``pool`` reads them only
        # without weights)
        pooled = model.pool(self.hidden, self.tokens[1], (self.pool_mask, self.pool_count))
        self.logits.copy_(model.exit_logits(layer - 1, pooled).float())
        self.states.copy_(pooled)  # the precision a trace keeps, which policies learned from

    def decide(self, layer: int, captured: bool) -> None:
        """The policy's decision and the exit bookkeeping, on the device, in few kernels: a leaving row's exit layer
        and logits are recorded (its prediction is their argmax, taken on the host) and it is marked dead."""
        walker = self.walker
        if layer == walker.num_layers:
            leave = self.alive  # everyone left
        else:
            memory = self.memory
            history = step_history(memory, self.states, self.logits) if walker.policy.uses_history else None
            batch = LayerBatch(layer, walker.num_layers, self.states.float(), self.logits, history=history)
            leave = walker.policy.decide(batch, memory).to(torch.bool)
            for key, value in memory.items():
                self.keep_memory(key, value, captured)
            leave = leave & self.alive
        self.exit_layer.masked_fill_(leave, layer)
        self.exit_logits.copy_(torch.where(leave[:, None], self.logits, self.exit_logits))
        self.alive.logical_xor_(leave)  # leaving rows were alive

    def keep_memory(self, key: str, value: torch.Tensor, captured: bool) -> None:
        """Write a decision's memory back into the window (graphs read and write fixed tensors; an eager policy's
        memory may change shape, then the window's tensor is replaced)."""
        window, span = self.window, slice(self.start, self.start + self.size)
        if captured or window.memory[key][span].shape == value.shape:
            window.memory[key][span].copy_(value)
            return
        replaced = torch.zeros((window.size, *value.shape[1:]), dtype=value.dtype, device=value.device)
        replaced[span] = value
        window.memory[key] = replaced

    def list_alive(self, order: torch.Tensor, live: torch.Tensor) -> None:
        """Where the alive rows are, in row order, into ``order`` (int32, one slot more than the rows: dead rows
        write that last one), and how many, into ``live``: what counted layers read instead of the rows moving
        (a scan and a scatter; nothing else moves)."""
        alive = self.alive
        place = torch.cumsum(alive, 0, dtype=torch.int32) - 1
        slot = torch.where(alive, place, self.size).long()
        rows = torch.arange(self.size, dtype=torch.int32, device=alive.device)
        order[:self.size + 1].scatter_(0, slot, rows)
        live.copy_(place[-1:] + 1)

    def count_alive(self) -> None:
        """The number of these rows still alive, into the answers' last row (the host reads it with them)."""
        self.window.answers[self.window.size, 0] = self.alive.sum()

    def exit_and_decide(self, layer: int, order: torch.Tensor | None = None, live: torch.Tensor | None = None
                        ) -> None:
        """The exit heads, the decision, the bookkeeping and the alive count of graph-safe policies (and, for
        counted layers, where the alive rows are: ``order``, ``live``): what ``FastWalker(compile_decisions=True)``
        hands to torch.compile, so their many small kernels fuse into few."""
        self.exit_head(layer)
        self.decide(layer, True)
        self.count_alive()
        if order is not None:
            self.list_alive(order, live)

    def compact(self) -> None:
        """The alive rows first (in order), dead ones after, with everything that follows a row; on the device.
        Each row's new place comes from two running counts (alive rows before it, or all alive rows and the dead
        ones before it): a scan and a scatter, where a sort takes several passes. The tokens stay: nothing reads
        them after the embedding."""
        alive = self.alive
        ahead = torch.cumsum(alive, 0) - 1  # an alive row's place: the alive rows before it
        behind = torch.cumsum(~alive, 0) + (ahead[-1] if alive.numel() else 0)  # a dead row's: after every alive
        place = torch.where(alive, ahead, behind)
        order = torch.empty_like(place).scatter_(0, place, torch.arange(place.numel(), device=place.device))
        for tensor in (self.hidden, self.alive, self.answers, self.pool_mask, self.pool_count):
            tensor.copy_(tensor[order])
        tree_copy({k: v for k, v in self.inputs.items() if k != SHARED},
                  {k: tree_map(lambda t: t[order], v) for k, v in self.inputs.items() if k != SHARED})
        for key, value in self.memory.items():
            self.keep_memory(key, value[order], self.walker.policy.graph_safe)


class Window:
    """Everything ``walker.window`` rows of ``seq`` tokens need on the device, allocated once per lane and sequence
    bucket, with the steps captured on its rows."""

    def __init__(self, walker: FastWalker, seq: int):
        self.walker, self.size, self.seq = walker, walker.window, seq
        model, device = walker.model, walker.device
        self.tokens = torch.zeros(TOKEN_PLANES, self.size, seq, dtype=torch.long, device=device)
        self.tokens[1] = 1
        self.tokens[3, :, 0] = 1
        # the first embedding's outputs become the window's buffers; cloned, since a layer input may be a view of
        # the tokens (DeBERTa's input mask), which compaction moves while the tokens stay
        hidden, inputs = model.embed(self.tokens[0], self.tokens[1], self.tokens[2] if walker.token_types else None,
                                     materialize_mask=True)
        self.hidden, self.inputs = hidden, tree_map(torch.clone, inputs)
        self.pool_mask, self.pool_count = model.pool_weights(self.tokens[1], hidden.dtype)  # mean pooling's
        self.alive = torch.zeros(self.size, dtype=torch.bool, device=device)
        # each row's answer (exit layer, where it goes, exit logits) in one tensor, and in its last row the alive
        # count, so a decision's report is one copy to the host and a compaction moves the answers in one gather
        self.answers = torch.zeros(self.size + 1, ANSWER_COLUMNS + model.num_labels, dtype=torch.float32,
                                   device=device)  # a step's rows see their part through `answer_views`
        self.memory = walker.init_memory(self.size)
        self.states = torch.zeros(self.size, model.hidden_size, dtype=STATE_DTYPE, device=device)
        self.logits = torch.zeros(self.size, model.num_labels, device=device)
        pinned = device.type == "cuda"
        # the answers as of a decision, two copies (odd and even layers): the host reads one layer's while the
        # next layer's decision may already write the other (`FastWalker(late_reads=True)`); final once nobody is
        # alive, with no further read
        self.host_answers = tuple(torch.zeros(self.answers.shape, dtype=torch.float32, pin_memory=pinned)
                                  for _ in range(2))
        # where a window is staged on the host: pinned, so its one copy overlaps nothing it must wait for
        self.staging = torch.zeros(self.tokens.shape, dtype=torch.long, pin_memory=pinned)
        self.steps: dict[tuple, Replayable] = {}
        # the device walk's bucket choice: one flag per walk bucket (the one holding the alive rows is set)
        buckets = torch.tensor(walker.walk_buckets, dtype=torch.float32, device=device)
        self.bucket_top, self.bucket_floor = buckets, torch.cat([buckets.new_zeros(1), buckets[:-1]])
        self.chosen = torch.zeros(len(walker.walk_buckets), dtype=torch.bool, device=device)
        # counted layers' alive rows: how many, and where (`Rows.list_alive`)
        self.live = torch.zeros(1, dtype=torch.int32, device=device)
        self.order = torch.zeros(self.size + 1, dtype=torch.int32, device=device)
        self.warmed: set[tuple] = set()

    def rows(self, start: int, size: int) -> Rows:
        return Rows(self, start, size)

    def reset_memory(self) -> None:
        """A fresh memory for a policy whose memory may change shape (not graph-safe): allocated eagerly."""
        self.memory = self.walker.init_memory(self.size)

    def report(self, layer: int) -> None:
        """Copy every row's answer and the alive count after ``layer``'s decision to pinned host memory, in one
        copy (read once the step's event has passed)."""
        self.host_answers[layer % 2].copy_(self.answers, non_blocking=True)

    def alive_count(self, layer: int) -> int:
        """Rows alive after ``layer``'s decision (as reported)."""
        return int(self.host_answers[layer % 2][self.size, 0])

    def run(self, key: tuple, fn: Callable[[], None]) -> None:
        """Step ``key``, made from ``fn`` the first time (captured as a graph where the walker uses them). Steps are
        made (and views taken) only the first time: a replay costs one launch and no Python."""
        if key not in self.steps:
            family = self.walker.model.encoder.config.model_type
            self.steps[key] = Replayable(fn, self.walker.pool, f"{key[0]} step {key[1:]} of {family}")
        self.steps[key]()

    # -- the steps a walk runs, each named once (the walk and `FastWalker.warm_up` share them) ---------------------
    def embed_step(self, start: int, size: int) -> None:
        self.run(("embed", start, size), lambda: self.rows(start, size).embed())

    def layer_step(self, layer: int, start: int, size: int) -> None:
        self.run(("layer", layer, start, size), lambda: self.rows(start, size).layer(layer))

    def layer_and_decide_step(self, layer: int, rows: int) -> None:
        """A layer that runs in one launch, with its exit heads and decision in the same step."""
        self.run(("layer+decide", layer, rows), lambda: (self.rows(0, rows).layer(layer), self.decide(layer, rows)))

    def decide_step(self, layer: int, rows: int) -> None:
        self.run(("decide", layer, rows), lambda: self.decide(layer, rows))

    def compact_step(self, rows: int) -> None:
        self.run(("compact", rows), lambda: self.walker.compact(self.rows(0, rows)))

    def decide(self, layer: int, rows: int, report: bool = True) -> None:
        """The exit heads, decisions and report of the first ``rows`` rows at ``layer``: one step (with the layer
        itself when it ran in one launch)."""
        span = self.rows(0, rows)
        # counted layers read where the alive rows are, listed with the decision that changed them
        listing = (self.order, self.live) if self.walker.counted is not None else (None, None)
        with tf32_matmuls(self.walker.tf32_device):
            if self.walker.compiled is not None:
                self.walker.compiled(span, layer, *listing)
            else:
                span.exit_and_decide(layer, *listing)
        if report:
            self.report(layer)

    # -- the device walk: a window's whole walk as one step, its launches chosen on the device -------------------
    def walk_step(self, embedded: int) -> None:
        """The whole walk of a window whose rows fill ``embedded`` (a walk bucket), as one step: one launch and one
        report for every layer of every row (`FastWalker(device_walk=True)`)."""
        key = ("walk", embedded)
        if key not in self.steps and self.walker.pool is not None and self.walker.device_walk == "buckets":
            self.warm_walk(embedded)
        self.run(key, lambda: self.walk(embedded))

    def walk(self, embedded: int) -> None:
        """Embed, then each layer on the alive rows. Counted layers (``device_walk="counted"``) run every layer
        over the ``embedded`` rows, their kernels reading where the alive rows are and skipping the rest
        (`counted_layer`): no row ever moves. Buckets (``"buckets"``) move the alive rows first after every
        decision and run the layer in one launch padded to the smallest walk bucket that holds them: every bucket
        is a conditional launch (`run_if`) and the device picks the one to run from the alive count the last
        decision left."""
        walker = self.walker
        self.rows(0, embedded).embed()
        for layer in range(1, walker.num_layers + 1):
            if walker.device_walk == "counted":
                self.walk_layer(layer, embedded)
                continue
            if layer <= walker.first_exit:  # every row is still alive (padding rows are dead from the start)
                self.walk_layer(layer, embedded)
                if layer == walker.first_exit:
                    self.choose_bucket()
                continue
            for index, size in enumerate(walker.walk_buckets):
                if size > embedded:
                    break
                run_if(self.chosen[index], lambda layer=layer, size=size: self.walk_layer(layer, size))
            self.choose_bucket()
        self.report(0)

    def walk_layer(self, layer: int, rows: int) -> None:
        """Layer ``layer`` on the first ``rows`` rows (counted layers: on the alive ones among them, wherever they
        are; without Triton, eagerly on all); where a row may leave, its decision, then (buckets) the
        compaction."""
        walker, span = self.walker, self.rows(0, rows)
        if walker.counted is not None:
            if layer == 1:  # then each decision lists the rows it left alive
                span.list_alive(self.order, self.live)
            walker.counted.run(layer - 1, span.hidden, span.pool_mask, self.live, self.order[:rows])
        else:
            span.layer(layer)
        if layer >= walker.first_exit:
            self.decide(layer, rows, report=False)
            if layer < walker.num_layers and walker.device_walk != "counted":
                walker.compact(span)

    def choose_bucket(self) -> None:
        """Which walk bucket the next layer runs on: the smallest that holds the alive rows (none when no row is
        alive), from the count the decision left in the answers' last row."""
        alive = self.answers[self.size, 0]
        self.chosen.copy_((self.bucket_floor < alive) & (alive <= self.bucket_top))

    def warm_walk(self, embedded: int) -> None:
        """Run once, eagerly, every launch a walk from ``embedded`` rows may take, before its graph is captured:
        a conditional launch is captured without running, so its kernels must have run once (the eager run of the
        walk itself takes only one bucket a layer). The window's buffers are reset by the walk's embedding."""
        walker = self.walker
        pending = [(layer, size) for layer in range(1, walker.num_layers + 1)
                   for size in (walker.walk_buckets if layer > walker.first_exit else [embedded])
                   if size <= embedded and (layer, size) not in self.warmed]
        if pending:
            self.rows(0, embedded).embed()
        for layer, size in pending:
            self.walk_layer(layer, size)
            self.warmed.add((layer, size))

    def decide_eagerly(self, layer: int, rows: int) -> None:
        """The same for a policy that cannot be captured; one that learns at the last layer first sees the rows
        that reached it."""
        walker, span = self.walker, self.rows(0, rows)
        span.exit_head(layer)
        if layer == walker.num_layers and walker.policy.observes_final:
            reached = torch.nonzero(span.alive).squeeze(1)
            walker.policy.observe_final(
                LayerBatch(layer, walker.num_layers, span.states[reached].float(), span.logits[reached]),
                {k: v[reached] for k, v in span.memory.items()})
        with tf32_matmuls(walker.tf32_device):
            span.decide(layer, False)
        span.count_alive()
        self.report(layer)


class FastWalker:
    """Walks batches of token ids up ``model`` under ``policy`` through CUDA graphs (or eagerly, on the same
    buffers, without CUDA or with ``graphs=False``). Build one per (model, policy); windows and graphs are made on
    first use and kept. ``max_batch``: the most rows of a batch and of any launch; ``window``: rows walked up the
    layers together (rounded up to a multiple of ``max_batch``; default ``max_batch``, one batch); ``lanes``:
    windows `run_batches` keeps in flight (each with its own buffers and graphs); 1 walks one at a time. ``tf32``:
    with a bfloat16 or float16 backbone on CUDA, the decisions' float32 matrix products (the policy's; the heads run
    in the backbone's precision) in TF32 (`tf32_matmuls`); the layers are never touched. ``compile_decisions``:
    the exit heads, decisions and compaction (the counted walk: the listing of the alive rows) through
    torch.compile; ``compile_layers``: the layers too;
    ``late_reads``: each layer's alive count read once the next layer is queued (graph-safe policies), so the GPU
    never waits for the host and one layer runs on rows that had already left. ``device_walk`` (graph-safe
    policies; others walk as without it): a window's whole walk is one step, each layer one launch of up to
    ``window`` rows whose size the device picks (`Window.walk`): one host read per window, none per layer.
    ``counted_programs`` / ``counted_heads``: the counted walk's launches (`CountedLayers`' ``programs`` and
    ``heads_per_program``): at most this many programs per product and LayerNorm, each looping over its tiles, and
    heads per attention program (None, 1: a program per tile and per head)."""

    def __init__(self, model: MultiExitModel, policy: ExitPolicy, max_batch: int = 256, seq_multiple: int = 16,
                 graphs: bool | None = None, token_types: bool = True, compile_decisions: bool = False,
                 lanes: int = 2, window: int | None = None, tf32: bool = True, compile_layers: bool = False,
                 late_reads: bool = False, device_walk: bool | str = False, counted_programs: int | None = None,
                 counted_heads: int = 1):
        if int(lanes) < 1:
            raise ValueError(f"lanes must be >= 1 (windows in flight), got {lanes}.")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be >= 1 row (or None: one batch), got {window}.")
        self.model, self.policy = model, policy
        self.device = next(model.parameters()).device
        self.num_layers = model.num_layers
        # a policy that reads the history needs every layer's head and decision step, from layer 1
        self.first_exit = 1 if policy.uses_history else max(1, min(int(policy.first_exit_layer), self.num_layers))
        self.buckets = batch_buckets(int(max_batch))
        self.capacity, self.seq_multiple = self.buckets[-1], int(seq_multiple)
        # a policy that learns between batches sees them one at a time, as the trace walk shows them
        self.batches_per_window = 1 if policy.observes_final else -(-int(window or max_batch) // self.capacity)
        self.window = self.batches_per_window * self.capacity
        # TF32 only beside a half-precision backbone, where the decisions' float32 products are the policy's; a
        # float32 backbone keeps float32 products everywhere
        half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        self.token_types, self.tf32, self.late_reads = token_types, bool(tf32) and half, bool(late_reads)
        self.tf32_device = self.device if self.tf32 else None  # where `tf32_matmuls` acts (a no-op off CUDA)
        use_graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device; use graphs=False on the CPU.")
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        # the device walk: the window's whole walk in one step, each layer's work following its alive rows
        self.walk_buckets = walk_buckets(self.window)
        self.device_walk = device_walk_mode(device_walk, model, use_graphs) if policy.graph_safe else False
        self.counted = None  # counted layers' kernels (on CUDA, or on the CPU under Triton's interpreter)
        if self.device_walk == "counted" and (self.device.type == "cuda" or triton_interpreted()):
            self.counted = CountedLayers(model, programs=counted_programs, heads_per_program=counted_heads)
        # windows in flight must not change each other's decisions: a policy that learns between batches, or reads
        # the host inside its decision, walks them one at a time
        in_order = policy.observes_final or not policy.graph_safe
        self.lanes = [Lane(self) for _ in range(1 if in_order else int(lanes))]
        # compile: the exit heads, decision and bookkeeping of each layer, and the compaction, through torch.compile
        # (kernels fused; a warm-up of minutes, once per layer and shape family) before capture
        self.compiled, self.compact = None, Rows.compact
        if compile_decisions:  # and the compaction, whose gathers fuse the same way
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            self.compiled = torch.compile(Rows.exit_and_decide, dynamic=True)
            self.compact = torch.compile(Rows.compact, dynamic=True)
        # compile_layers: each layer through torch.compile too (its norms, activations and residuals fused), for the
        # full model and early exit alike; a launch on few rows is bound by its kernel count
        self.run_layer = model.run_layer
        if compile_layers:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            self.run_layer = torch.compile(model.run_layer, dynamic=True)

    def init_memory(self, size: int) -> dict[str, torch.Tensor]:
        return walk_memory(self.policy, size, self.model.hidden_size, self.device)

    def seq_bucket(self, length: int) -> int:
        """The sequence length a batch of ``length`` tokens is padded to: a multiple of ``seq_multiple``."""
        return max(1, -(-int(length) // self.seq_multiple)) * self.seq_multiple

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None) -> Exits:
        """Exit layer, prediction and exit logits of each row (rows in order; at most ``max_batch`` of them).
        Token tensors on the host (where a tokenizer leaves them) reach the device in one copy."""
        return next(self.run_batches([(input_ids, attention_mask, token_type_ids)]))

    @torch.no_grad()
    def warm_up(self, max_length: int) -> int:
        """Capture, before any request, the steps a walk of one launch per layer may need: for every sequence bucket
        up to ``max_length`` and every batch bucket, the embedding, each layer (with its decision where a row may
        exit) and the compaction, in every lane; so a server's first requests of a new shape are not slowed by a
        capture. Steps of windows wider than a batch are still made when first needed. Returns the steps made."""
        made = 0
        for lane in self.lanes:
            for seq in range(self.seq_multiple, self.seq_bucket(max_length) + 1, self.seq_multiple):
                window = lane.window(seq)
                if self.device_walk:
                    for size in self.walk_buckets:
                        before = len(window.steps)
                        window.walk_step(size)
                        made += len(window.steps) - before
                    continue
                for size in self.buckets:
                    before = len(window.steps)
                    window.embed_step(0, size)
                    for layer in range(1, self.num_layers + 1):
                        if layer >= self.first_exit and self.policy.graph_safe:
                            window.layer_and_decide_step(layer, size)
                        else:
                            window.layer_step(layer, 0, size)
                    if self.policy.graph_safe:
                        window.compact_step(size)
                    made += len(window.steps) - before
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return made

    def _windows(self, batches: Iterable[tuple]) -> Iterator[tuple[list[int], list[tuple]]]:
        """Batches grouped into windows, as ``(their indices, the batches)``: one sequence bucket, at most ``window``
        rows. A window may take batches out of order, so a bucket's batches share one wherever the input puts them
        (a stream ordered by characters jitters between buckets at their edges). A window closes as soon as the
        next full batch could not fit, so a lazy stream is never waited on needlessly; windows not yet full hold at
        most ``window`` rows between them, and none waits for more than two windows' worth of later batches (past
        either, the oldest is walked: answers come in batch order, so a held batch holds back every answer after
        it); the last ones close with the input. A policy that learns between batches walks each batch alone, in
        order."""
        groups: dict[int, tuple[list[int], list[tuple]]] = {}  # sequence bucket -> its open window, oldest first
        rows_of: dict[int, int] = {}
        for index, batch in enumerate(batches):
            count, length = batch[0].shape
            if count > self.capacity:
                raise ValueError(f"{count} rows in one batch, more than this walker's max_batch={self.capacity}.")
            bucket = self.seq_bucket(length)
            indices, group = groups.setdefault(bucket, ([], []))
            indices.append(index)
            group.append(batch)
            rows_of[bucket] = rows_of.get(bucket, 0) + count
            if len(group) == self.batches_per_window or rows_of[bucket] + self.capacity > self.window:
                yield groups.pop(bucket)
                rows_of.pop(bucket)
            while groups and (sum(rows_of.values()) > self.window  # too much waiting: the oldest goes now
                              or index - next(iter(groups.values()))[0][0] >= 2 * self.batches_per_window):
                oldest = next(iter(groups))
                yield groups.pop(oldest)
                rows_of.pop(oldest)
        yield from groups.values()

    @torch.no_grad()
    def run_batches(self, batches: Iterable[tuple]) -> Iterator[Exits]:
        """`run` on each ``(input_ids, attention_mask[, token_type_ids])`` of ``batches``, answers yielded in order;
        up to ``lanes`` windows in flight, so the GPU runs one window's layers while the host reads another's alive
        count. ``batches`` is consumed lazily (a tokenizer may still be filling it)."""
        pending = self._windows(batches)
        active: deque[tuple[list[int], Generator, torch.cuda.Event | None]] = deque()  # oldest read first
        free = list(reversed(self.lanes))
        done: dict[int, Exits] = {}  # answers by batch index, until every batch before them is answered
        answered = 0

        def advance(indices: list[int], walk_one: Generator) -> None:
            """Run a window's walk to its next read (queued behind the others), or record its answers."""
            try:
                active.append((indices, walk_one, walk_one.send(None)))
            except StopIteration as finished:
                exits, lane = finished.value
                done.update(zip(indices, exits))
                free.append(lane)

        exhausted = False
        while True:
            while free and not exhausted:  # every free lane takes the next window
                window = next(pending, None)
                exhausted = window is None
                if not exhausted:
                    indices, group = window
                    advance(indices, self._walk(free.pop(), group))
            if active:
                indices, walk_one, event = active.popleft()
                if event is not None:
                    event.synchronize()  # this window's last step, not the work queued after it
                advance(indices, walk_one)
            while answered in done:
                yield done.pop(answered)
                answered += 1
            if exhausted and not active:
                return

    def _walk(self, lane: Lane, batches: list[tuple]) -> Generator[torch.cuda.Event | None, None, tuple]:
        """One window's walk in ``lane``: enqueues steps and stops (yielding an event to wait for) wherever it must
        read the device; returns ``(one Exits per batch, lane)``."""
        sizes = [int(batch[0].shape[0]) for batch in batches]
        total = sum(sizes)
        if total == 0:
            empty = Exits(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                          torch.empty(0, self.model.num_labels))
            return [empty for _ in sizes], lane
        window = lane.window(self.seq_bucket(max(int(batch[0].shape[1]) for batch in batches)))
        on_host = batches[0][0].device.type == "cpu"
        staged = window.staging if on_host else window.tokens
        staged.zero_()
        offset = 0
        for batch, count in zip(batches, sizes):
            input_ids, attention_mask, *rest = batch
            token_type_ids = rest[0] if rest else None
            width = input_ids.shape[1]
            staged[0, offset:offset + count, :width] = input_ids
            staged[1, offset:offset + count, :width] = attention_mask
            if token_type_ids is not None:
                staged[2, offset:offset + count, :width] = token_type_ids
            staged[3, offset:offset + count, 0] = 1
            offset += count
        staged[:3, total:] = staged[:3, :1]  # padding rows repeat the first row (finite values; never recorded)
        if self.device_walk:  # every layer in one step; the one read is the answers at the end
            embedded = next(size for size in self.walk_buckets if size >= total)
            if staged is not window.tokens:  # only the rows the walk embeds, a contiguous part of each plane
                for plane in range(TOKEN_PLANES) if self.token_types else (0, 1, 3):
                    window.tokens[plane, :embedded].copy_(staged[plane, :embedded], non_blocking=True)
            window.walk_step(embedded)
            yield self._event()
            return self._answers(window, sizes, embedded, 0), lane
        if staged is not window.tokens:
            window.tokens.copy_(staged, non_blocking=True)
        if not self.policy.graph_safe:
            window.reset_memory()
        spans = launches(total, self.capacity, self.buckets)
        embedded = spans[-1][0] + spans[-1][1]  # rows past these hold an earlier window's leftovers
        # late reads: a layer's alive count is read once the next layer is queued (the GPU never waits for the
        # host; one layer runs on rows that had already left); a decision made on the host reads at once
        late, unread, answered = self.late_reads and self.policy.graph_safe, None, self.num_layers
        for start, size in spans:
            window.embed_step(start, size)
        for layer in range(1, self.num_layers + 1):
            rows = spans[-1][0] + spans[-1][1]  # every alive row is among the first `rows`
            deciding = layer >= self.first_exit
            if deciding and self.policy.graph_safe and len(spans) == 1:  # one launch: layer and decision fused
                window.layer_and_decide_step(layer, rows)
            else:
                for start, size in spans:
                    window.layer_step(layer, start, size)
                if deciding and self.policy.graph_safe:
                    window.decide_step(layer, rows)
                elif deciding:
                    window.decide_eagerly(layer, rows)
            if not deciding:
                continue
            event = self._event()
            if late and layer < self.num_layers:  # read the last layer's decision while this one runs
                read, unread = unread, (layer, event)
                if read is None:
                    continue
                yield read[1]
            else:
                read, unread = (layer, event), None
                yield event  # the layer's one host read, once its step has run
            answered = read[0]
            alive = window.alive_count(answered)  # an upper bound of the rows alive now (late: one layer ago)
            if alive == 0:
                break
            spans = launches(alive, self.capacity, self.buckets)
            if spans[-1][0] + spans[-1][1] < rows:  # the alive rows fit fewer or smaller launches: move them first
                if self.policy.graph_safe:
                    window.compact_step(rows)
                else:
                    window.rows(0, rows).compact()
        # the last answers read: everyone had left by then (a later decision found nobody alive)
        return self._answers(window, sizes, embedded, answered), lane

    def _answers(self, window: Window, sizes: list[int], embedded: int, answered: int) -> list[Exits]:
        """Each batch's exits, from the answers ``answered``'s report copied to the host, put back in row order."""
        layers = torch.empty(self.window + 1, dtype=torch.long)  # + a slot every padding row writes
        logits = torch.empty(self.window + 1, self.model.num_labels)
        host_layer, host_position, host_logits = answer_views(window.host_answers[answered % 2][:embedded])
        where = host_position.long()
        layers[where], logits[where] = host_layer.long(), host_logits
        exits, offset = [], 0
        for count in sizes:
            part = logits[offset:offset + count]
            exits.append(Exits(layers[offset:offset + count].clone(), part.argmax(-1), part.clone()))
            offset += count
        return exits

    def _event(self) -> torch.cuda.Event | None:
        """An event after the work queued so far (None off CUDA, where every step has already run)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class Lane:
    """One window in flight: its own buffers per sequence bucket (so windows in flight never share one)."""

    def __init__(self, walker: FastWalker):
        self.walker = walker
        self.windows: dict[int, Window] = {}

    def window(self, seq: int) -> Window:
        if seq not in self.windows:
            self.windows[seq] = Window(self.walker, seq)
        return self.windows[seq]
