"""Encoder families beyond BERT, each on a tiny random config: the layer-by-layer path equals the model's own
forward, and the runtime's live walk (eager, and the fast path's buckets) equals the walk over a trace of the same
model. Families whose layers need inputs exitrl does not pass yet are refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.backbones import BackboneError, MultiExitModel
from exitrl.evaluation.evaluate import run_policy
from exitrl.evaluation.walk import walk
from exitrl.runtime.classifier import LiveSource
from exitrl.runtime.fast_walk import FastWalker
from exitrl.traces.trace import STATE_DTYPE, SplitTrace

FAMILIES = {
    "distilbert": dict(dim=32, n_layers=3, n_heads=2, hidden_dim=64),
    "albert": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                   embedding_size=16, num_hidden_groups=2),
    "mpnet": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64),
    # ELECTRA-small's embeddings are narrower than its layers, as here: the encoder's own projection between them
    "electra": dict(hidden_size=32, embedding_size=16, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       relative_attention=True, position_buckets=16, max_relative_positions=32,
                       pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", conv_kernel_size=3,
                       share_att_key=True),
    "modernbert": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       global_attn_every_n_layers=2, local_attention=4, eos_token_id=2, bos_token_id=3,
                       cls_token_id=3, sep_token_id=2),
}


def tiny(model_type: str, vocab_size: int = 100, **options) -> tuple[MultiExitModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=1, **options)
    model = MultiExitModel(AutoModel.from_config(config), 2, "mean").eval()
    ids = torch.randint(5, 100, (24, 11))
    mask = torch.ones_like(ids)
    for row in range(24):  # varied lengths: padding is exercised
        mask[row, 3 + row % 8:] = 0
    return model, ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_by_layer_equals_the_models_own_forward(family):
    model, ids, mask = tiny(family, **FAMILIES[family])
    with torch.no_grad():
        ours = model.hidden_states(ids, mask)
        ref = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == len(ref) == model.num_layers
    keep = mask.bool()
    assert max(float((a - b)[keep].abs().max()) for a, b in zip(ours, ref)) < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runtime_walk_equals_the_trace_walk(family):
    model, ids, mask = tiny(family, **FAMILIES[family])
    with torch.no_grad():
        out = model(ids, mask)
    trace = SplitTrace.from_logits(out.pooled.to(STATE_DTYPE), out.logits, torch.zeros(len(ids), dtype=torch.long))
    threshold = float(torch.softmax(out.logits[:, 0], -1).max(-1).values.median())  # about half exit at layer 1
    expected_layers, expected_predictions = run_policy(ConfidencePolicy(threshold), trace)
    with torch.no_grad():
        found = walk(ConfidencePolicy(threshold), LiveSource(model, ids, mask), len(ids), torch.device("cpu"))
    assert len(set(expected_layers.tolist())) > 1
    assert torch.equal(found.layers, expected_layers) and torch.equal(found.predictions, expected_predictions)
    fast = FastWalker(model, ConfidencePolicy(threshold), max_batch=32, token_types=False).run(ids, mask)
    assert torch.equal(fast.layers, expected_layers) and torch.equal(fast.predictions, expected_predictions)
    # three batches in one window, each layer in launches of at most 8 rows: the same exits
    windowed = FastWalker(model, ConfidencePolicy(threshold), max_batch=8, window=24, token_types=False)
    parts = list(windowed.run_batches([(ids[i:i + 8], mask[i:i + 8]) for i in (0, 8, 16)]))
    assert torch.equal(torch.cat([p.layers for p in parts]), expected_layers)
    assert torch.equal(torch.cat([p.predictions for p in parts]), expected_predictions)


def test_albert_shares_its_layer_groups_across_depth():
    model, _, _ = tiny("albert", **FAMILIES["albert"])
    assert model.num_layers == 4 and model.layers[0] is model.layers[1] and model.layers[2] is model.layers[3]
    assert model.layers[1] is not model.layers[2]


def test_modernbert_mixes_full_and_sliding_attention_and_its_exits_read_the_final_norm():
    model, ids, mask = tiny("modernbert", **FAMILIES["modernbert"])
    assert [layer.attention_type for layer in model.layers] == ["full_attention", "sliding_attention"] * 2
    with torch.no_grad():
        last = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
        pooled = model(ids, mask).pooled[:, -1]
    weights = mask.unsqueeze(-1).float()
    torch.testing.assert_close(pooled, (last * weights).sum(1) / weights.sum(1), atol=1e-5, rtol=1e-5)


def test_an_encoder_without_a_layer_list_is_refused_clearly():
    config = AutoConfig.for_model("xlnet", vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=64)
    with pytest.raises(BackboneError, match="Cannot find the layer list of XLNetModel"):
        MultiExitModel(AutoModel.from_config(config), 2)
