"""Tokenization off the critical path: texts become padded token batches in worker threads while the model runs
the batches before them.

Length bucketing without tokenizing first: texts are ordered by their length in characters (a close proxy for
their length in tokens), cut into windows of ``window_batches`` batches, and each window is tokenized by one worker
(a fast tokenizer's Rust code releases the GIL, so workers run in parallel with each other and with the model's
host side), sorted by token length inside the window (short rows do not pay for long rows' padding) and padded
into tensors, pinned when the model is on a GPU so the copy to the device is asynchronous. Windows are
prepared ahead, at most ``workers + 1`` at a time, and handed out in order. Each worker has its own copy of the
tokenizer: a fast tokenizer sets its truncation options on every call, which concurrent calls on one copy may not
do.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from threading import local

import numpy as np
import torch


@dataclass
class TokenBatch:
    """One padded batch and where its rows came from (indices into the input texts)."""

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None


SPLIT_ROWS = 64  # the fewest rows worth a thread of their own


MAX_DEFAULT_WORKERS = 8  # threads keep paying up to about 8 on a 16-core GPU host (the tokenizer-workers reference)


def default_workers() -> int:
    """Tokenizer threads: enough to stay ahead of a GPU, one fewer than the cores, at most `MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


class TokenizerPool:
    """Worker threads, each with its own copy of ``tokenizer`` (made once, on the thread's first window), kept for
    as long as the classifier that owns them, so a stream costs no thread start or tokenizer copy."""

    def __init__(self, tokenizer, workers: int | None = None):
        self.tokenizer = tokenizer
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="exitrl-tokenize")
        # a window's own texts, split across threads when there are fewer windows than workers (a large batch,
        # a short input): separate threads, so a window never waits on a thread that is waiting on it
        self.splitter = ThreadPoolExecutor(self.workers, thread_name_prefix="exitrl-tokenize-part")
        self._local = local()

    def encode(self, texts: list[str], pairs: list[str] | None, split: bool = True, **options) -> dict[str, list]:
        """The tokenizer on ``texts`` (and ``pairs``); with ``split``, cut into up to ``workers`` parts of at least
        `SPLIT_ROWS` rows tokenized at once (a fast tokenizer releases the GIL), joined back in order."""
        parts = min(self.workers, len(texts) // SPLIT_ROWS) if split else 1
        if parts < 2:
            return self.encode_here(texts, pairs, **options)
        bounds = [round(i * len(texts) / parts) for i in range(parts + 1)]
        futures = [self.splitter.submit(lambda a=a, b=b: self.encode_here(texts[a:b], None if pairs is None else
                                                                          pairs[a:b], **options))
                   for a, b in zip(bounds, bounds[1:])]
        encoded = [f.result() for f in futures]
        return {key: [row for part in encoded for row in part[key]] for key in encoded[0].keys()}

    def encode_here(self, texts: list[str], pairs: list[str] | None, max_length: int,
                    return_token_type_ids: bool = False) -> dict[str, list]:
        """``input_ids`` (and ``token_type_ids``) of each text, truncated to ``max_length`` (longest first for
        pairs), unpadded, with this thread's copy. A fast tokenizer's Rust backend is called directly without
        character offsets (``encode_batch_fast``: the same ids, less work); otherwise the tokenizer itself."""
        tokenizer = self.own()
        backend = getattr(tokenizer, "_tokenizer", None)
        if not hasattr(backend, "encode_batch_fast") or not hasattr(backend, "enable_truncation"):
            return dict(tokenizer(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False,
                                  return_token_type_ids=return_token_type_ids))
        if backend.truncation != {"max_length": max_length, "stride": 0, "strategy": "longest_first",
                                  "direction": tokenizer.truncation_side}:
            backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                      direction=tokenizer.truncation_side)
        if backend.padding is not None:
            backend.no_padding()
        encoded = backend.encode_batch_fast(list(texts) if pairs is None else list(zip(texts, pairs)))
        out = {"input_ids": [e.ids for e in encoded]}
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encoded]
        return out

    def own(self):
        """This thread's copy of the tokenizer."""
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return self._local.tokenizer


class TokenizedBatches:
    """Iterate padded `TokenBatch` es of ``texts`` (with ``pairs``' second texts), prepared ahead in threads.
    ``tokenizer``: a tokenizer, or a `TokenizerPool` to reuse its threads."""

    def __init__(self, tokenizer, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32,
                 max_length: int = 128, bucket: bool = True, workers: int | None = None, window_batches: int = 2,
                 pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} second texts of pairs.")
        self.pool = tokenizer if isinstance(tokenizer, TokenizerPool) else TokenizerPool(tokenizer, workers)
        tokenizer = self.pool.tokenizer
        self.texts, self.pairs = list(texts), None if pairs is None else list(pairs)
        self.batch_size, self.max_length, self.bucket = int(batch_size), int(max_length), bool(bucket)
        self.window = max(1, int(window_batches)) * self.batch_size
        self.windows = -(-len(self.texts) // self.window)  # fewer than the workers: a window's texts are split
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.token_types = "token_type_ids" in tokenizer.model_input_names
        self.pad_id = tokenizer.pad_token_id or 0
        # the order texts are tokenized in: by characters when bucketing, else as given
        chars = [len(t) + (len(self.pairs[i]) if self.pairs is not None else 0) for i, t in enumerate(self.texts)]
        self.order = sorted(range(len(chars)), key=chars.__getitem__) if self.bucket else list(range(len(chars)))

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def _window(self, start: int) -> list[TokenBatch]:
        """Tokenize, sort and pad the texts at ``order[start:start + window]``."""
        picked = self.order[start:start + self.window]
        second = [self.pairs[i] for i in picked] if self.pairs is not None else None
        encoded = self.pool.encode([self.texts[i] for i in picked], second, split=self.windows < self.pool.workers,
                                   max_length=self.max_length, return_token_type_ids=self.token_types)
        ids = encoded["input_ids"]
        types = encoded["token_type_ids"] if self.token_types else None
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if self.bucket else list(range(len(ids)))
        out = []
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            token_ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            token_types = np.zeros((len(chunk), width), dtype=np.int64) if types is not None else None
            for row, i in enumerate(chunk):
                n = len(ids[i])
                token_ids[row, :n], mask[row, :n] = ids[i], 1
                if token_types is not None:
                    token_types[row, :n] = types[i]
            tensors = [torch.from_numpy(a) if a is not None else None for a in (token_ids, mask, token_types)]
            if self.pin_memory:
                tensors = [t.pin_memory() if t is not None else None for t in tensors]
            out.append(TokenBatch([picked[i] for i in chunk], *tensors))
        return out

    def __iter__(self) -> Iterator[TokenBatch]:
        starts = range(0, len(self.texts), self.window)
        ahead: deque[Future] = deque()
        upcoming = iter(starts)
        for start in upcoming:
            ahead.append(self.pool.executor.submit(self._window, start))
            if len(ahead) > self.pool.workers:
                break
        try:
            while ahead:
                batches = ahead.popleft().result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    ahead.append(self.pool.executor.submit(self._window, nxt))
                yield from batches
        finally:  # a consumer that stops early leaves no work queued
            for future in ahead:
                future.cancel()
