"""Tokenization off the critical path (`exitrl.runtime.stream`): every text comes back exactly once, tokenized and
padded as the tokenizer itself would, batches length-bucketed, the same whatever the worker count and window, and
bad input refused."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import WORDS
from transformers import BertTokenizerFast

from exitrl.runtime.stream import TokenizedBatches, TokenizerPool


@pytest.fixture(scope="module")
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def collect(stream: TokenizedBatches) -> dict[int, tuple]:
    """Each input row's (ids, types, batch index, batch width), unpadded; fails on a row seen twice."""
    rows = {}
    for number, batch in enumerate(stream):
        assert batch.input_ids.shape == batch.attention_mask.shape and len(batch.rows) == batch.input_ids.shape[0]
        for position, row in enumerate(batch.rows):
            assert row not in rows
            length = int(batch.attention_mask[position].sum())
            assert batch.attention_mask[position, :length].all() and not batch.attention_mask[position, length:].any()
            types = batch.token_type_ids[position, :length].tolist() if batch.token_type_ids is not None else None
            rows[row] = (batch.input_ids[position, :length].tolist(), types, number, batch.input_ids.shape[1])
    return rows


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_every_text_once_tokenized_as_the_tokenizer_does(tokenizer, pairs):
    texts = sentences(203)
    second = sentences(203, seed=1) if pairs else None
    stream = TokenizedBatches(tokenizer, texts, second, batch_size=16, max_length=24, workers=3, window_batches=2)
    rows = collect(stream)
    assert sorted(rows) == list(range(len(texts))) and len(stream) == 13
    expected = tokenizer(texts, second, truncation=True, max_length=24)
    for i in range(len(texts)):
        assert rows[i][0] == expected["input_ids"][i]
        assert rows[i][1] == (expected["token_type_ids"][i])
    assert max(len(ids) for ids, *_ in rows.values()) == 24  # truncated at max_length


class CallOnly:
    """A tokenizer seen only through its call (no Rust backend to reach): how a slow tokenizer, or an old
    `tokenizers`, looks to the pool."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model_input_names, self.pad_token_id = tokenizer.model_input_names, tokenizer.pad_token_id

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_the_backend_fast_path_and_the_plain_call_give_the_tokenizers_own_ids(tokenizer, pairs):
    texts, second = sentences(150, seed=2), sentences(150, seed=3) if pairs else None
    assert hasattr(tokenizer._tokenizer, "encode_batch_fast")  # the default path calls the backend
    expected = tokenizer(texts, second, truncation=True, max_length=20)
    for pool in (TokenizerPool(tokenizer, 2), TokenizerPool(CallOnly(tokenizer), 2)):
        for max_length in (20, 64, 20):  # a changed limit is applied, then changed back
            got = pool.encode(texts, second, max_length=max_length, return_token_type_ids=True)
            if max_length == 20:
                assert got["input_ids"] == expected["input_ids"]
                assert got["token_type_ids"] == expected["token_type_ids"]
            else:
                assert max(len(ids) for ids in got["input_ids"]) > 20


def batch_widths(rows: dict[int, tuple]) -> dict[int, tuple[int, int]]:
    """Each batch's (padded width, longest row)."""
    out: dict[int, tuple[int, int]] = {}
    for ids, _, batch, width in rows.values():
        out[batch] = (width, max(len(ids), out.get(batch, (0, 0))[1]))
    return out


def test_batches_are_length_bucketed_and_padded_to_their_own_longest_row(tokenizer):
    texts = sentences(256)
    rows = collect(TokenizedBatches(tokenizer, texts, batch_size=32, workers=2))
    widths = batch_widths(rows)
    assert all(width == longest for width, longest in widths.values())
    in_order = collect(TokenizedBatches(tokenizer, texts, batch_size=32, bucket=False))
    assert [row for row, v in sorted(in_order.items(), key=lambda kv: kv[1][2])] == list(range(256))
    padded = sum(32 * width for width, _ in widths.values())
    padded_in_order = sum(32 * width for width, _ in batch_widths(in_order).values())
    assert padded < 0.8 * padded_in_order  # bucketing saves padding on texts of mixed lengths


def test_worker_count_and_window_change_nothing_but_the_speed(tokenizer):
    texts = sentences(150)
    one = collect(TokenizedBatches(tokenizer, texts, batch_size=8, workers=1, window_batches=100))
    pool = TokenizerPool(tokenizer, workers=4)
    for window in (1, 3):
        many = collect(TokenizedBatches(pool, texts, batch_size=8, window_batches=window))
        assert {i: v[0] for i, v in many.items()} == {i: v[0] for i, v in one.items()}
    # one window larger than the input: its texts are split across the workers, and joined back in order
    split = collect(TokenizedBatches(pool, texts, pairs=texts[::-1], batch_size=256))
    whole = collect(TokenizedBatches(tokenizer, texts, pairs=texts[::-1], batch_size=256, workers=1))
    assert {i: v[:2] for i, v in split.items()} == {i: v[:2] for i, v in whole.items()}


def test_a_consumer_that_stops_early_leaves_the_pool_usable(tokenizer):
    pool = TokenizerPool(tokenizer, workers=2)
    stream = iter(TokenizedBatches(pool, sentences(400), batch_size=4, window_batches=1))
    next(stream)
    del stream
    assert len(collect(TokenizedBatches(pool, sentences(20), batch_size=4))) == 20


def test_bad_input_is_refused_before_any_work(tokenizer):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TokenizedBatches(tokenizer, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="2 texts but 1 second texts"):
        TokenizedBatches(tokenizer, ["a", "b"], ["c"])
    assert list(TokenizedBatches(tokenizer, [])) == []
    assert isinstance(next(iter(TokenizedBatches(tokenizer, ["good film"]))).input_ids, torch.Tensor)
