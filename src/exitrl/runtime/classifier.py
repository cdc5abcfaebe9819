"""`EarlyExitClassifier`: answer new text with real early exits. The backbone runs one layer at a time on the rows
still in the batch (`LiveSource`); at each layer the run's `ExitPolicy` decides through the same walk that evaluates
it on a trace (`exitrl.evaluation.walk`), so rows that exit leave the batch (compaction) and their hidden states,
attention masks and the policy's per-row memory are dropped together. Inputs are sorted by length and padded per batch
(length bucketing), so short rows do not carry long rows' padding.

Two paths walk the same way: the eager `walk` (``fast=False``), and `exitrl.runtime.fast_walk` (``fast=True``, the
default on CUDA): per-bucket CUDA graphs, decisions on the device and one 8-byte host read per layer where a row may
exit. On a CPU both are compute-bound, so saved layers are saved time either way.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from exitrl.backbones.multi_exit import MultiExitModel, select_rows
from exitrl.core.device import autocast, pick_device
from exitrl.core.progress import progress as show_progress
from exitrl.evaluation.walk import Exits, walk
from exitrl.experiments.runs import Run
from exitrl.policy import ExitPolicy
from exitrl.runtime.fast_walk import FastWalker, check_device_walk
from exitrl.runtime.stream import TokenizedBatches, TokenizerPool
from exitrl.traces.trace import STATE_DTYPE


class LiveSource:
    """The backbone itself, one layer at a time, on the rows still running."""

    def __init__(self, model: MultiExitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None):
        self.model, self.num_layers = model, model.num_layers
        self.attention_mask = attention_mask
        self.hidden, self.layer_inputs = model.embed(input_ids, attention_mask, token_type_ids)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.hidden = self.model.run_layer(layer - 1, self.hidden, self.layer_inputs)
        pooled = self.model.pool(self.hidden, self.attention_mask)
        logits = self.model.exit_logits(layer - 1, pooled).float()
        return pooled.to(STATE_DTYPE), logits  # the precision a trace keeps, which policies learned from

    def keep(self, stay: torch.Tensor) -> None:
        self.hidden = self.hidden[stay]
        self.attention_mask = self.attention_mask[stay]
        self.layer_inputs = select_rows(self.layer_inputs, stay)


class EarlyExitClassifier:
    """A multi-exit backbone, its tokenizer and an exit policy: ``predict`` texts or text pairs."""

    def __init__(self, model: MultiExitModel, tokenizer, policy: ExitPolicy, label_names: list[str],
                 max_length: int = 128, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 fast: bool | None = None, compile_decisions: bool = False, window: int | None = None,
                 compile_layers: bool = False, late_reads: bool = False, device_walk: bool | str = False):
        """``dtype``: the backbone's weights (default bf16 on CUDA, fp32 on the CPU); ``fast``: the fast path
        (`exitrl.runtime.fast_walk`; default on CUDA, where it captures CUDA graphs); ``compile_decisions``: the fast
        path's exit heads and decisions through torch.compile (fewer kernels per layer, minutes of warm-up);
        ``window``: rows the fast path walks up the layers together, in launches of at most the batch size (None:
        one batch; see `FastWalker`); ``compile_layers``: the layers through torch.compile too; ``late_reads``: each
        layer's alive count read once the next layer is queued (`FastWalker`); ``device_walk``: each window's walk
        as one step, with no host read per layer (True: the best one here; or ``"counted"``, ``"buckets"``: see
        `FastWalker`)."""
        check_device_walk(device_walk)
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be >= 1 row (or None: one batch), got {window}.")
        if not policy.deployable:
            raise ValueError(f"The {policy.name} policy is analysis only (it reads answers it cannot have at "
                             "inference); pick a deployable agent or rule.")
        if len(label_names) != model.num_labels:
            raise ValueError(f"{len(label_names)} label names for a model with {model.num_labels} classes.")
        self.device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, dtype).eval()
        self.fast = self.device.type == "cuda" if fast is None else bool(fast)
        self.compile_decisions, self.compile_layers = bool(compile_decisions), bool(compile_layers)
        self.late_reads, self.device_walk = bool(late_reads), device_walk
        self.window = None if window is None else int(window)
        self._walkers: dict[tuple, FastWalker] = {}
        self.tokenizer, self.label_names, self.max_length = tokenizer, list(label_names), int(max_length)
        self._tokenizers = TokenizerPool(tokenizer)  # threads that tokenize ahead of the model
        self.policy = policy.to(self.device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", cache: str | Path | None = None, **options
                 ) -> EarlyExitClassifier:
        """What ``python -m exitrl.train`` left in ``run_dir``: the backbone the run used (in the folder when
        co-trained or exported, else the cache entry its record names; a missing one is an error that says how to
        rebuild it), the tokenizer, the label names, the traced length and the policy. ``options``: ``dtype``,
        ``fast``, ``compile_decisions``, ``window``, ``compile_layers``, ``late_reads``, ``device_walk`` (see the
        constructor)."""
        run = Run.load(run_dir)
        model, tokenizer, meta = MultiExitModel.load(run.backbone_path())
        record = run.record
        label_names = record.label_names
        max_length = record.max_length
        if label_names is None or max_length is None:  # records written before these fields: the trace has them
            trace_meta = run.trace(cache).meta
            label_names = label_names or trace_meta["label_names"]
            max_length = max_length or trace_meta.get("max_length", 128)
        return cls(model, tokenizer, run.policy, label_names, max_length, pick_device(device), **options)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        encoded = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                                 max_length=self.max_length)
        return [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(texts))]

    @torch.no_grad()
    def exits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32, bucket: bool = True,
              progress: bool = False, workers: int | None = None) -> Exits:
        """Exit layer, prediction and exit logits of every input, in input order. Batches are tokenized ahead in
        ``workers`` threads (`exitrl.runtime.stream`) while the model runs the batches before them."""
        if workers is not None and workers != self._tokenizers.workers:
            self._tokenizers = TokenizerPool(self.tokenizer, workers)
        # a tokenizer window holds a whole walker window, so the walker never waits on several tokenizer jobs
        window_batches = max(2, self.walker(batch_size).batches_per_window) if self.fast else 2
        stream = TokenizedBatches(self._tokenizers, texts, pairs, batch_size, self.max_length, bucket,
                                  window_batches=window_batches, pin_memory=self.device.type == "cuda")
        n = len(stream.texts)
        layers = torch.empty(n, dtype=torch.long)
        predictions = torch.empty(n, dtype=torch.long)
        logits = torch.empty(n, self.model.num_labels)
        for rows, found in show_progress(self._walk_stream(stream), total=len(stream), desc="predict", unit="batch",
                                         disable=not progress):
            index = torch.tensor(rows)
            layers[index], predictions[index] = found.layers.cpu(), found.predictions.cpu()
            logits[index] = found.logits.float().cpu()
        return Exits(layers, predictions, logits)

    def _walk_stream(self, stream: TokenizedBatches):
        """``(rows, Exits)`` of each batch of ``stream``, in order: on the fast path with several batches in flight;
        else through the eager walk."""
        if not self.fast:
            for batch in stream:
                tokens = [t.to(self.device) if t is not None else None
                          for t in (batch.input_ids, batch.attention_mask, batch.token_type_ids)]
                with autocast(self.device):
                    found = walk(self.policy, LiveSource(self.model, *tokens), len(batch.rows), self.device)
                yield batch.rows, found
            return
        rows: deque[list[int]] = deque()

        def feed():
            for batch in stream:
                rows.append(batch.rows)
                yield batch.input_ids, batch.attention_mask, batch.token_type_ids

        for found in self.walker(stream.batch_size).run_batches(feed()):
            yield rows.popleft(), found

    def walker(self, batch_size: int) -> FastWalker:
        """The fast path for this policy and batch size (its buckets and graphs are kept between calls)."""
        key = (id(self.policy), batch_size, self.window, self.compile_decisions, self.compile_layers,
               self.late_reads, self.device_walk)
        if key not in self._walkers or self._walkers[key].policy is not self.policy:
            self._walkers[key] = FastWalker(self.model, self.policy, batch_size,
                                            token_types="token_type_ids" in self.tokenizer.model_input_names,
                                            compile_decisions=self.compile_decisions, window=self.window,
                                            compile_layers=self.compile_layers, late_reads=self.late_reads,
                                            device_walk=self.device_walk)
        return self._walkers[key]

    def warm_up(self, batch_size: int = 32) -> int:
        """Capture the fast path's steps for every sequence and batch bucket up to ``max_length`` and
        ``batch_size`` now, not at the first request of each shape (`FastWalker.warm_up`); returns the steps made
        (0 off the fast path)."""
        return self.walker(batch_size).warm_up(self.max_length) if self.fast else 0

    def predict(self, texts: list[str] | list[tuple[str, str]], batch_size: int = 32, bucket: bool = True,
                progress: bool = False) -> list[dict]:
        """One answer per input (a text, or a (text, text) pair): ``label``, ``probs`` (by label name, at the exit
        layer) and ``exit_layer`` (1-indexed)."""
        texts = list(texts)
        if texts and isinstance(texts[0], tuple | list):
            first, second = [t[0] for t in texts], [t[1] for t in texts]
        else:
            first, second = texts, None
        found = self.exits(first, second, batch_size, bucket, progress)
        probs = torch.softmax(found.logits, -1)
        return [{"label": self.label_names[int(p)], "probs": dict(zip(self.label_names, row.tolist())),
                 "exit_layer": int(layer)} for p, row, layer in zip(found.predictions, probs, found.layers)]

    def save_pretrained(self, directory: str | Path, dtype: str | torch.dtype | None = None,
                        task: dict | None = None) -> Path:
        """One self-contained folder (backbone, tokenizer, policy, label names, max length, a checksummed manifest)
        that `from_pretrained` loads anywhere; ``dtype`` converts the saved weights (default: the model's own).
        See `exitrl.runtime.pretrained`."""
        from exitrl.runtime.pretrained import save_pretrained

        return save_pretrained(self, directory, dtype, task)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "auto", **options) -> EarlyExitClassifier:
        """A classifier saved with `save_pretrained` (or ``exitrl export RUN_DIR --pretrained DIR``), without the
        run folder, the cache or the hub. ``options``: ``verify`` (checksums, default True), ``dtype``, ``fast``,
        ``compile_decisions``, ``window``, ``compile_layers``, ``late_reads``, ``device_walk`` (see the
        constructor)."""
        from exitrl.runtime.pretrained import load_pretrained

        return load_pretrained(directory, cls, device, **options)
