"""Run by `test_counted_layers` under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported):
the counted layers' own kernels on CPU tensors. Fails with an AssertionError naming what differs."""

from __future__ import annotations

import copy
import sys

import torch
from test_architectures import tiny
from test_fast_path import policies

from exitrl.runtime.counted_layer import CountedLayers, triton_interpreted
from exitrl.runtime.fast_walk import FastWalker


def layers_equal_the_eager_ones(family: str) -> None:
    """Every layer, with all, some and no sequences alive, first in the window or anywhere in it (an ``order``),
    launched a program per tile or with few programs looping over tiles and heads: the eager layer's numbers on
    the alive rows' real tokens, and every other row untouched."""
    model, ids, mask = tiny(family, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    one_per_tile, looping = CountedLayers(model), CountedLayers(model, programs=3, heads_per_program=2)
    scattered = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    cases = [(n, None, one_per_tile) for n in (len(ids), 13, 1, 0)] + [(n, scattered, one_per_tile)
                                                                        for n in (len(ids), 7)]
    cases += [(n, order, looping) for n, order in ((len(ids), None), (13, scattered), (0, scattered))]
    with torch.no_grad():
        hidden, inputs = model.embed(ids, mask, materialize_mask=True)
        for index in range(model.num_layers):
            expected = model.run_layer(index, hidden.clone(), inputs)
            for alive, order, counted in cases:
                work = hidden.clone()
                counted.run(index, work, mask.float(), torch.tensor([alive], dtype=torch.int32), order)
                rows = torch.arange(alive) if order is None else order[:alive].long()
                others = torch.ones(len(ids), dtype=torch.bool)
                others[rows] = False
                if alive:
                    real = mask[rows].bool()
                    gap = float((work[rows] - expected[rows])[real].abs().max())
                    assert gap < 1e-5, f"{family} layer {index}, {alive} alive (order {order}): off by {gap}"
                assert torch.equal(work[others], hidden[others]), f"{family} layer {index}: a row not alive moved"
            hidden = expected


def heads_in_turn_equal_the_eager_layer() -> None:
    """Four heads, two per program (so the second program's heads start at head 2), rows listed out of order."""
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    order = torch.tensor([5, 0, 9, 3] + [i for i in range(len(ids)) if i not in (5, 0, 9, 3)], dtype=torch.int32)
    with torch.no_grad():
        hidden, inputs = model.embed(ids, mask, materialize_mask=True)
        expected = model.run_layer(0, hidden.clone(), inputs)
        work = hidden.clone()
        CountedLayers(model, programs=2, heads_per_program=2).run(0, work, mask.float(),
                                                                 torch.tensor([4], dtype=torch.int32), order)
    rows = order[:4].long()
    gap = float((work[rows] - expected[rows])[mask[rows].bool()].abs().max())
    assert gap < 1e-5, f"two heads a program: off by {gap}"
    assert torch.equal(work[order[4:].long()], hidden[order[4:].long()])


def several_tiles_equal_the_eager_layer() -> None:
    """Sequences of 80 tokens (two key blocks), heads 64 wide, a feed-forward 400 wide (several steps of the
    products' inner loop), one sequence whose first key block is all padding, 4 of 5 alive."""
    from transformers import AutoConfig, AutoModel

    from exitrl.backbones import MultiExitModel

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=100, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=400)
    model = MultiExitModel(AutoModel.from_config(config), 2, "mean").eval()
    ids, mask = torch.randint(5, 100, (5, 80)), torch.ones(5, 80, dtype=torch.long)
    mask[1, :70] = 0  # padding first: the first key block holds none of its real tokens
    mask[2, 30:] = 0
    with torch.no_grad():
        hidden, inputs = model.embed(ids, mask, materialize_mask=True)
        expected = model.run_layer(0, hidden.clone(), inputs)
        work = hidden.clone()
        CountedLayers(model).run(0, work, mask.float(), torch.tensor([4], dtype=torch.int32))
        # the alive sequences anywhere: 3 of them, listed out of order
        scattered = hidden.clone()
        CountedLayers(model).run(0, scattered, mask.float(), torch.tensor([3], dtype=torch.int32),
                                 torch.tensor([4, 1, 2, 0, 3], dtype=torch.int32))
    gap = float((work[:4] - expected[:4])[mask[:4].bool()].abs().max())
    assert gap < 1e-4, f"several tiles: off by {gap}"
    assert torch.equal(work[4:], hidden[4:])
    rows = torch.tensor([4, 1, 2])
    gap = float((scattered[rows] - expected[rows])[mask[rows].bool()].abs().max())
    assert gap < 1e-4, f"several tiles, rows listed out of order: off by {gap}"
    assert torch.equal(scattered[[0, 3]], hidden[[0, 3]])


def walk_through_the_kernels_equals_one_batch_at_a_time() -> None:
    """The device walk on counted layers (their kernels, interpreted) answers what the host walk does, exit for
    exit, windows of several batches included: a rule, a learned policy, one with walk memory and one whose memory
    changes shape (walks as without the device walk). The decision code is the host walk's, which
    `test_fast_path` runs for every agent and rule."""
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    with torch.no_grad():
        first = model(ids, mask).logits[:, 0].float()
    central = torch.softmax(first, -1).max(-1).values.sort().values[len(ids) // 2 - 1:len(ids) // 2 + 1]
    threshold = float(central.mean())  # between two rows: no row sits at it, where rounding would decide
    batches = [(ids[i:i + n], mask[i:i + n]) for i, n in ((0, 8), (8, 5), (13, 11), (4, 16))]
    several = 0
    chosen = ("confidence", "reinforce", "reinforce_history", "calm_saturation", "static")
    walked = {name: policy for name, policy in policies(model, threshold).items() if name in chosen}
    late = copy.deepcopy(walked["confidence"])
    late.first_exit_layer = 2  # no decision at layer 1: the rows listed before it stay listed through layer 2
    walked["confidence_from_2"] = late
    for name, policy in walked.items():
        one = FastWalker(model, copy.deepcopy(policy), max_batch=16, graphs=False, token_types=False, lanes=1)
        # the learned policy's walk launches few programs, each looping over tiles and heads
        looping = {"counted_programs": 3, "counted_heads": 2} if name == "reinforce" else {}
        counted = FastWalker(model, copy.deepcopy(policy), max_batch=16, graphs=False, token_types=False,
                             window=32, device_walk="counted", **looping)
        if not policy.graph_safe:
            assert counted.device_walk is False, name  # walks as without it
            continue
        assert counted.counted is not None, name
        assert (counted.counted.programs, counted.counted.heads_per_program) == ((3, 2) if looping else (None, 1))
        for (batch_ids, batch_mask), found in zip(batches, counted.run_batches(iter(batches))):
            expected = one.run(batch_ids, batch_mask)
            assert torch.equal(found.layers, expected.layers), name
            assert torch.equal(found.predictions, expected.predictions), name
            assert torch.allclose(found.logits, expected.logits, atol=1e-5), name
            several += len(set(found.layers.tolist())) > 1
        for window in (w for lane in counted.lanes for w in lane.windows.values()):
            # the decisions kept the count of listed rows: after the last one, none (else the kernels would
            # run rows that had left; the answers would not show it)
            assert int(window.live) == int(window.alive.sum()) == 0, name
    assert several >= 3  # rows left at several layers in several batches: counts below the window were walked


if __name__ == "__main__":
    assert triton_interpreted(), "run with TRITON_INTERPRET=1"
    for family in sys.argv[1:]:
        layers_equal_the_eager_ones(family)
    heads_in_turn_equal_the_eager_layer()
    several_tiles_equal_the_eager_layer()
    walk_through_the_kernels_equals_one_batch_at_a_time()
    print("counted layers: ok")
