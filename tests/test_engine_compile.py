"""Compiled engine steps (the path a GPU takes to fuse each layer's small kernels) decode the tokens the eager
steps decode: the same code on the CPU, through ``torch.compile``'s CPU backend."""

from __future__ import annotations

import pytest
import torch
from test_decoding import prompts
from test_decoding_methods import sharpened
from test_multi_exit_lm import tiny_lm

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import greedy, policy_decoding
from exitrl.decoding.engine import CAPACITY_BUCKET


@pytest.mark.xdist_group("inductor")  # with the fast path's compiled tests: torch.compile's first use paid once
def test_compiled_steps_decode_what_eager_steps_decode():
    model = sharpened(MultiExitLM(tiny_lm("llama", seed=21)))
    ids, mask = prompts(2, seed=21)
    eager = greedy(model, ids, mask, 6)
    compiled = greedy(model, ids, mask, 6, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    exits = policy_decoding(model, StaticPolicy(2), ids, mask, 6)
    compiled_exits = policy_decoding(model, StaticPolicy(2), ids, mask, 6, compile=True)
    assert torch.equal(compiled_exits.tokens, exits.tokens)
    assert torch.equal(compiled_exits.exit_layers, exits.exit_layers)
    # a compiled step specializes on the cache's shape: it is bucketed, so nearby prompt lengths share one
    assert compiled_exits.info["cache"].capacity % CAPACITY_BUCKET == 0
