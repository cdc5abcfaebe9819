"""The fast path of the inference runtime: the walk of `exitrl.evaluation.walk`, shaped so a GPU can run it with
almost no per-layer overhead.

On a GPU, small batches are launch-bound: an eager layer costs more in kernel launches than in arithmetic, and a
host read per layer stalls the pipeline, so a naive early-exit loop is slower than not exiting at all. Here:

- each batch is padded to a **bucket** of batch size and of sequence length (a multiple of ``seq_multiple``), and
  every step on a bucket works on fixed tensors owned by that bucket (`Bucket`): the hidden states, the layer
  inputs, which rows are still alive, where each row's answer goes, the policy's memory and each row's answer;
- each step (the embedding; a layer with its pooling, exit head, policy decision and exit bookkeeping) runs eagerly
  once, is then captured as a CUDA graph and replayed from then on (`Replayable`): one launch per layer;
- decisions stay on the device: rows that exit are marked dead in the bucket (their answer recorded by a
  device-side select); the only host read is the number of rows alive, 8 bytes, and only at layers where a row may
  exit (``ExitPolicy.first_exit_layer``; a static exit reads once). Rows move to a smaller bucket (compaction,
  alive rows first, with their memory and answers) only when the alive count fits one, so the graphs stay few;
- the GPU never waits on that read: `FastWalker.run_batches` keeps several batches in flight (``lanes``, each with
  its own buckets), one walk per batch as a generator that stops at each read. While the host waits for one
  batch's count (an event on that batch's last step, not a stream synchronisation), the GPU runs the layers queued
  for the others, so a read costs the host's turnaround, not an idle GPU. A policy with state that changes between
  batches (``observes_final``) or host reads (not ``graph_safe``) walks one batch at a time, in order, as the
  trace walk does, so its decisions are the ones evaluation measured;
- a policy that cannot be captured (``graph_safe`` False: host reads, or Python state that changes between calls,
  like FREE's online threshold) runs eagerly after the captured layer, on the same buffers; one that learns at the
  last layer (``observes_final``) sees exactly the rows that reached it.

Without CUDA (or with ``graphs=False``) every step simply runs eagerly: the same code, which is how the CPU tests
check that this path equals `exitrl.evaluation.walk.walk` exit for exit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator

import torch

from exitrl.backbones.multi_exit import SHARED, MultiExitModel
from exitrl.core.graphs import Replayable, tree_copy, tree_map
from exitrl.core.observation import step_history
from exitrl.evaluation.walk import Exits
from exitrl.policy import ExitPolicy, LayerBatch, walk_memory
from exitrl.traces.trace import STATE_DTYPE

TOKEN_PLANES = 4  # input ids, attention mask, token types, and a plane whose column 0 marks the real rows


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes graphs are captured for: powers of two to 16, then steps of 16 (a dead row costs at most 16 rows
    of work per layer), up to ``max_batch``."""
    sizes = {1, 2, 4, 8, 16, *range(32, max_batch + 16, 16)}
    return sorted(size for size in sizes if size < max_batch) + [max_batch]


class Lane:
    """One batch in flight: its own buckets (so batches in flight never share a buffer), its own answer table and
    its host copy."""

    def __init__(self, walker: FastWalker, index: int):
        self.walker, self.index = walker, index
        pinned = walker.device.type == "cuda"
        self.answers = torch.zeros(walker.capacity + 1, 2 + walker.model.num_labels, device=walker.device)  # + spare
        self.host_answers = torch.zeros(self.answers.shape, pin_memory=pinned)
        self.buckets: dict[tuple[int, int], Bucket] = {}

    def bucket(self, rows: int, seq: int) -> Bucket:
        size = next(size for size in self.walker.buckets if size >= rows)
        if (size, seq) not in self.buckets:
            self.buckets[(size, seq)] = Bucket(self.walker, size, seq, self)
        return self.buckets[(size, seq)]


class Bucket:
    """Everything a batch of ``size`` rows and ``seq`` tokens needs on the device, allocated once (per lane)."""

    def __init__(self, walker: FastWalker, size: int, seq: int, lane: Lane):
        self.walker, self.size, self.seq, self.lane = walker, size, seq, lane
        model, device = walker.model, walker.device
        self.tokens = torch.zeros(TOKEN_PLANES, size, seq, dtype=torch.long, device=device)
        self.tokens[1] = 1
        self.tokens[3, :, 0] = 1
        hidden, inputs = self._embed()
        self.hidden, self.inputs = hidden, inputs  # the first embedding's outputs become the bucket's buffers
        self.alive = torch.zeros(size, dtype=torch.bool, device=device)
        self.position = torch.zeros(size, dtype=torch.long, device=device)
        self.memory = walker.init_memory(size)
        self.states = torch.zeros(size, model.hidden_size, dtype=STATE_DTYPE, device=device)
        self.logits = torch.zeros(size, model.num_labels, device=device)
        self.answers = torch.zeros(size, 2 + model.num_labels, device=device)  # exit layer, prediction, logits
        pinned = device.type == "cuda"
        # the answers as of the last decision, copied to the host with the alive count: when the batch never
        # moved bucket, they are final once nobody is alive, with no further round trip
        self.host_answers = torch.zeros(self.answers.shape, pin_memory=pinned)
        self.alive_count = torch.zeros((), dtype=torch.long, pin_memory=pinned)  # written by the decision step
        self.steps: dict[int, Replayable] = {}  # 0: the embedding; 1..L: the layers
        self.moves: dict[int, Replayable] = {}  # compaction into the bucket of that size
        # where a batch is staged on the host: pinned, so the one copy per batch overlaps nothing it must wait for
        self.staging = torch.zeros(self.tokens.shape, dtype=torch.long, pin_memory=pinned)

    # -- the steps --------------------------------------------------------------------------------------------
    def _embed(self) -> tuple[torch.Tensor, dict]:
        ids, mask, types = self.tokens[0], self.tokens[1], self.tokens[2]
        return self.walker.model.embed(ids, mask, types if self.walker.token_types else None, materialize_mask=True)

    def embed(self) -> None:
        """Embed the staged tokens; reset which rows are alive, where their answers go and the policy's memory."""
        hidden, inputs = self._embed()
        self.hidden.copy_(hidden)
        tree_copy(self.inputs, inputs)
        self.alive.copy_(self.tokens[3, :, 0].bool())
        rows = torch.arange(self.size, device=self.alive.device)
        self.position.copy_(torch.where(self.alive, rows, self.walker.capacity))  # padding writes a spare slot
        if self.walker.policy.graph_safe:  # else `reset_memory` runs eagerly after the step
            for key, value in self.walker.init_memory(self.size).items():
                self.memory[key].copy_(value)

    def reset_memory(self) -> None:
        """A fresh memory for a policy whose memory may change shape (not graph-safe): allocated eagerly."""
        self.memory = self.walker.init_memory(self.size)

    def layer(self, layer: int, with_exit: bool) -> None:
        """Layer ``layer`` (1-indexed) on the bucket's hidden states; with its exit head where a row may leave."""
        model = self.walker.model
        hidden = model.run_layer(layer - 1, self.hidden, self.inputs)
        self.hidden.copy_(hidden)
        if with_exit:
            self.exit_head(layer, hidden)

    def exit_head(self, layer: int, hidden: torch.Tensor) -> None:
        model = self.walker.model
        pooled = model.pool(hidden, self.tokens[1])
        self.logits.copy_(model.exit_logits(layer - 1, pooled).float())
        self.states.copy_(pooled)  # the precision a trace keeps, which policies learned from

    def exit_and_decide(self, layer: int) -> None:
        """The layer's exit head, the policy's decision and the bookkeeping, on the device: what
        ``FastWalker(compile_decisions=True)`` hands to torch.compile, so its many small kernels fuse into few."""
        self.exit_head(layer, self.hidden)
        self.decide_on_device(layer, True)

    def decide(self, layer: int, captured: bool) -> None:
        """The policy's decision and the exit bookkeeping; writes the alive count to the walker's host slot."""
        self.decide_on_device(layer, captured)
        self.report()

    def report(self) -> None:
        """Copy the answers and the alive count to pinned host memory (read once the step's event has passed)."""
        self.host_answers.copy_(self.answers, non_blocking=True)
        self.alive_count.copy_(self.alive.sum(), non_blocking=True)

    def decide_on_device(self, layer: int, captured: bool) -> None:
        walker = self.walker
        if layer == walker.num_layers:
            leave = torch.ones_like(self.alive)
        else:
            memory = dict(self.memory)
            history = step_history(memory, self.states, self.logits) if walker.policy.uses_history else None
            batch = LayerBatch(layer, walker.num_layers, self.states.float(), self.logits, history=history)
            leave = walker.policy.decide(batch, memory).to(torch.bool)
            for key, value in memory.items():
                if captured:
                    self.memory[key].copy_(value)  # graphs read and write fixed tensors
                else:
                    self.memory[key] = value
        leave = leave & self.alive
        answer = torch.cat([torch.full_like(self.logits[:, :1], layer), self.logits.argmax(-1, keepdim=True).float(),
                            self.logits], 1)
        self.answers.copy_(torch.where(leave[:, None], answer, self.answers))
        self.alive.logical_and_(~leave)

    def run_layer(self, layer: int) -> None:
        """One layer through its graphs (captured the first time)."""
        walker = self.walker
        if layer < walker.first_exit:
            self.run_step(layer, lambda: self.layer(layer, False))
            return
        last = layer == walker.num_layers
        if walker.policy.graph_safe and not (last and walker.policy.observes_final):
            if walker.compiled is not None:
                self.run_step(layer, lambda: (self.layer(layer, False), walker.compiled(self, layer), self.report()))
            else:
                self.run_step(layer, lambda: (self.layer(layer, True), self.decide(layer, True)))
            return
        self.run_step(layer, lambda: self.layer(layer, True))
        if last and walker.policy.observes_final:
            reached = torch.nonzero(self.alive).squeeze(1)
            walker.policy.observe_final(
                LayerBatch(layer, walker.num_layers, self.states[reached].float(), self.logits[reached]),
                {k: v[reached] for k, v in self.memory.items()})
        self.decide(layer, False)

    def run_step(self, step: int, fn: Callable[[], None]) -> None:
        """Step ``step`` (0: embedding, else a layer), made from ``fn`` the first time."""
        if step not in self.steps:
            name = "the embedding" if step == 0 else f"layer {step}"
            family = self.walker.model.encoder.config.model_type
            self.steps[step] = Replayable(fn, self.walker.pool, f"{name} of {family}")
        self.steps[step]()

    # -- moving rows --------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every row's answer to the walker's answer table (rows still running are rewritten later)."""
        self.lane.answers[self.position] = self.answers

    def move(self, other: Bucket) -> None:
        """`move_to` ``other``, captured as a graph like the steps when the policy's memory keeps its shape."""
        if not self.walker.policy.graph_safe:
            self.move_to(other)
            return
        if other.size not in self.moves:
            self.moves[other.size] = Replayable(lambda: self.move_to(other), self.walker.pool,
                                                f"compaction {self.size} -> {other.size} rows")
        self.moves[other.size]()

    def move_to(self, other: Bucket) -> None:
        """Compaction: the alive rows first (in order), then dead ones to fill ``other``'s size; all on the device
        (the order comes from a sort, not from the host)."""
        self.flush()
        order = torch.argsort((~self.alive).to(torch.int8), stable=True)[:other.size]
        other.hidden.copy_(self.hidden[order])
        tree_copy({k: v for k, v in other.inputs.items() if k != SHARED},
                  {k: tree_map(lambda t: t[order], v) for k, v in self.inputs.items() if k != SHARED})
        other.tokens.copy_(self.tokens[:, order])
        other.alive.copy_(self.alive[order])
        other.position.copy_(self.position[order])
        other.answers.copy_(self.answers[order])
        for key, value in self.memory.items():
            moved = value[order]
            if other.memory[key].shape == moved.shape:
                other.memory[key].copy_(moved)
            else:  # memory that changes shape (only eager policies have it)
                other.memory[key] = moved


class FastWalker:
    """Walks batches of token ids up ``model`` under ``policy`` through per-bucket CUDA graphs (or eagerly, on the
    same buffers, without CUDA or with ``graphs=False``). Build one per (model, policy); buckets and graphs are made
    on first use and kept. ``lanes``: batches `run_batches` keeps in flight (each lane has its own buckets and
    graphs); 1 walks one batch at a time."""

    def __init__(self, model: MultiExitModel, policy: ExitPolicy, max_batch: int = 256, seq_multiple: int = 16,
                 graphs: bool | None = None, token_types: bool = True, compile_decisions: bool = False,
                 lanes: int = 2):
        if int(lanes) < 1:
            raise ValueError(f"lanes must be >= 1 (batches in flight), got {lanes}.")
        self.model, self.policy = model, policy
        self.device = next(model.parameters()).device
        self.num_layers = model.num_layers
        # a policy that reads the history needs every layer's head and decision step, from layer 1
        self.first_exit = 1 if policy.uses_history else max(1, min(int(policy.first_exit_layer), self.num_layers))
        self.buckets = batch_buckets(max_batch)
        self.capacity, self.seq_multiple = self.buckets[-1], int(seq_multiple)
        self.token_types = token_types
        use_graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device; use graphs=False on the CPU.")
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        # batches in flight must not change each other's decisions: a policy that learns between batches, or reads
        # the host inside its decision, walks them one at a time
        in_order = policy.observes_final or not policy.graph_safe
        self.lanes = [Lane(self, index) for index in range(1 if in_order else int(lanes))]
        # compile: the exit head, decision and bookkeeping of each layer through torch.compile (kernels fused; a
        # warm-up of minutes, once per layer and shape family) before capture
        self.compiled = None
        if compile_decisions:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            self.compiled = torch.compile(Bucket.exit_and_decide, dynamic=True)

    @property
    def _buckets(self) -> dict[tuple[int, int, int], Bucket]:
        """Every bucket of every lane, by (lane, size, seq)."""
        return {(lane.index, *key): bucket for lane in self.lanes for key, bucket in lane.buckets.items()}

    def init_memory(self, size: int) -> dict[str, torch.Tensor]:
        return walk_memory(self.policy, size, self.model.hidden_size, self.device)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None) -> Exits:
        """Exit layer, prediction and exit logits of each row (rows in order; at most ``max_batch`` of them).
        Token tensors on the host (where a tokenizer leaves them) reach the device in one copy."""
        return next(self.run_batches([(input_ids, attention_mask, token_type_ids)]))

    @torch.no_grad()
    def run_batches(self, batches: Iterable[tuple]) -> Iterator[Exits]:
        """`run` on each ``(input_ids, attention_mask[, token_type_ids])`` of ``batches``, answers yielded in order;
        up to ``lanes`` batches in flight, so the GPU runs one batch's layers while the host reads another's alive
        count. ``batches`` is consumed lazily (a tokenizer may still be filling it)."""
        pending = iter(batches)
        active: deque[tuple[int, Generator, torch.cuda.Event | None]] = deque()  # oldest read first
        free = list(reversed(self.lanes))
        done: dict[int, Exits] = {}
        started = answered = 0

        def advance(index: int, walk_one: Generator) -> None:
            """Run a batch's walk to its next read (queued behind the others), or record its answers."""
            try:
                active.append((index, walk_one, walk_one.send(None)))
            except StopIteration as finished:
                exits, lane = finished.value
                done[index] = exits
                free.append(lane)

        exhausted = False
        while True:
            while free and not exhausted:  # every free lane takes the next batch
                batch = next(pending, None)
                exhausted = batch is None
                if not exhausted:
                    advance(started, self._walk(free.pop(), *batch))
                    started += 1
            if active:
                index, walk_one, event = active.popleft()
                if event is not None:
                    event.synchronize()  # this batch's last step, not the work queued after it
                advance(index, walk_one)
            while answered in done:
                yield done.pop(answered)
                answered += 1
            if exhausted and not active:
                return

    def _walk(self, lane: Lane, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> Generator[torch.cuda.Event | None, None, tuple]:
        """One batch's walk in ``lane``: enqueues steps and stops (yielding an event to wait for) wherever it must
        read the device; returns ``(Exits, lane)``."""
        rows, length = input_ids.shape
        if rows > self.capacity:
            raise ValueError(f"{rows} rows in one batch, more than this walker's max_batch={self.capacity}.")
        if rows == 0:
            return Exits(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                         torch.empty(0, self.model.num_labels)), lane
        seq = -(-length // self.seq_multiple) * self.seq_multiple
        bucket = start = lane.bucket(rows, seq)
        staged = bucket.staging if input_ids.device.type == "cpu" else bucket.tokens
        staged.zero_()
        staged[0, :rows, :length] = input_ids
        staged[1, :rows, :length] = attention_mask
        if token_type_ids is not None:
            staged[2, :rows, :length] = token_type_ids
        staged[3, :rows, 0] = 1
        staged[:3, rows:] = staged[:3, :1]  # padding rows repeat the first row (finite values; never recorded)
        if staged is not bucket.tokens:
            bucket.tokens.copy_(staged, non_blocking=True)
        bucket.run_step(0, bucket.embed)
        if not self.policy.graph_safe:
            bucket.reset_memory()
        for layer in range(1, self.num_layers + 1):
            bucket.run_layer(layer)
            if layer < self.first_exit:
                continue
            yield self._event()  # the layer's one host read, once its step has run
            alive = int(bucket.alive_count)
            if alive == 0:
                break
            size = next(size for size in self.buckets if size >= alive)
            if size < bucket.size:
                smaller = lane.bucket(alive, seq)
                bucket.move(smaller)
                bucket = smaller
        if bucket is start:  # never moved: the answers are in row order, and on the host since the last read
            answers = bucket.host_answers[:rows].clone()
        else:
            bucket.flush()
            lane.host_answers.copy_(lane.answers, non_blocking=True)
            yield self._event()
            answers = lane.host_answers[:rows].clone()
        return Exits(answers[:, 0].long(), answers[:, 1].long(), answers[:, 2:]), lane

    def _event(self) -> torch.cuda.Event | None:
        """An event after the work queued so far (None off CUDA, where every step has already run)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
