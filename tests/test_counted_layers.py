"""Counted layers (`exitrl.runtime.counted_layer`): Triton kernels whose work follows an alive count held on the
device, so a window's whole walk is one plain CUDA graph. Their own kernels run here on the CPU, under Triton's
interpreter in a process of their own (`counted_worker`); which models they take, and the device walk's choice
between them and conditional buckets, are checked in this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_architectures import FAMILIES, tiny

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.runtime.counted_layer import counted_support, triton_available
from exitrl.runtime.fast_walk import FastWalker, device_walk_mode

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton; Linux x86-64)")
def test_the_kernels_equal_the_eager_layers_and_their_walk_equals_the_host_walk():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TESTS / "counted_worker.py"), "bert"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=TESTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "counted layers: ok" in done.stdout


def test_which_models_counted_layers_take():
    bert, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert counted_support(bert) is None
    for family, reason in (("distilbert", "not BERT-style"), ("deberta-v2", "not BERT-style"),
                           ("modernbert", "not BERT-style")):
        model, _, _ = tiny(family, **FAMILIES[family])
        assert reason in counted_support(model), family
    relative, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          position_embedding_type="relative_key")
    assert "relative_key" in counted_support(relative)
    tanh, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      hidden_act="gelu_new")
    assert "'gelu_new'" in counted_support(tanh)


def test_the_device_walk_takes_counted_layers_where_they_run_and_says_why_not():
    bert, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    distil, _, _ = tiny("distilbert", **FAMILIES["distilbert"])
    assert device_walk_mode(True, bert, graphs=False) == "counted"
    assert device_walk_mode(True, distil, graphs=False) == "buckets"  # no graphs: the host reads each choice
    assert device_walk_mode(False, bert, graphs=False) is False
    with pytest.raises(ValueError, match="device_walk='counted': counted layers cannot run this model: its layers"):
        device_walk_mode("counted", distil, graphs=False)
    with pytest.raises(ValueError, match="device_walk must be a bool or one of counted, buckets; got 'fast'"):
        FastWalker(bert, ConfidencePolicy(0.5), max_batch=8, token_types=False, device_walk="fast")
    from exitrl.runtime.fast_walk import DEVICE_WALKS
    from exitrl.serve import arguments

    served = next(action for action in arguments()._actions if action.dest == "device_walk")
    assert tuple(served.choices) == DEVICE_WALKS  # `exitrl serve --device-walk` offers what the runtime takes
    walker = FastWalker(bert, ConfidencePolicy(0.5), max_batch=8, token_types=False, device_walk=True)
    # on the CPU without Triton's interpreter the counted walk runs the eager layers on every row
    assert walker.device_walk == "counted" and walker.counted is None
    _, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    host = FastWalker(bert, ConfidencePolicy(0.5), max_batch=8, token_types=False)
    for start in (0, 8, 16):
        found, expected = walker.run(ids[start:start + 8], mask[start:start + 8]), host.run(ids[start:start + 8],
                                                                                           mask[start:start + 8])
        assert torch.equal(found.layers, expected.layers) and torch.equal(found.logits, expected.logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_cuda_the_kernels_equal_the_eager_layer_in_each_precision(dtype):
    """The production path: compiled (not interpreted) kernels, heads 64 wide, two key blocks, several inner steps,
    padding first in one sequence, 12 of 16 alive; bfloat16 to its rounding."""
    from transformers import AutoConfig, AutoModel

    from exitrl.backbones import MultiExitModel
    from exitrl.runtime.counted_layer import CountedLayers

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=400)
    model = MultiExitModel(AutoModel.from_config(config), 2, "mean").eval().to("cuda", dtype)
    ids = torch.randint(5, 100, (16, 80), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    for row in range(2, 16):
        mask[row, 10 + 4 * row:] = 0
    counted = CountedLayers(model)
    with torch.no_grad():
        hidden, inputs = model.embed(ids, mask, materialize_mask=True)
        for index in range(2):
            expected = model.run_layer(index, hidden.clone(), inputs)
            work = hidden.clone()
            counted.run(index, work, mask.to(dtype), torch.tensor([12], dtype=torch.int32, device="cuda"))
            real = mask[:12].bool()
            gap = float((work[:12] - expected[:12])[real].abs().max().float())
            assert gap < (0.1 if dtype == torch.bfloat16 else 1e-4), (index, gap)
            assert torch.equal(work[12:], hidden[12:])
            hidden = expected
