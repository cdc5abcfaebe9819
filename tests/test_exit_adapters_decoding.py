"""Exit adapters in the decoding methods (CPU, tiny random Llama): self-speculative decoding through an adapted
drafter (and a draft vocabulary) still emits exactly the full model's greedy tokens, and per-token exits through an
attending adapter keep its cache whole for tokens that left before it."""

from __future__ import annotations

import pytest
import torch
from test_decoding import prompts
from test_exit_adapters import llama, perturbed, sharpened

from exitrl.agents.calm import CalmPolicy
from exitrl.backbones.exit_adapters import ExitAdapters
from exitrl.decoding import greedy, self_speculative
from exitrl.decoding.calm import CalmDecider
from exitrl.decoding.per_token import per_token_decoding
from exitrl.decoding.self_speculative import draft_vocabulary


@pytest.mark.parametrize("kind", ["linear", "mlp", "layer"])
def test_self_speculative_through_an_adapted_drafter_emits_the_full_models_tokens(kind):
    model = sharpened(llama(seed=31, num_hidden_layers=5))
    ids, mask = prompts(3, seed=31)
    reference = greedy(model, ids, mask, 14)
    bare = self_speculative(model, ids, mask, 14, exit_layer=2, draft_tokens=3)
    model.attach_exit_adapters(perturbed(ExitAdapters(model, [2], kind)))
    adapted = self_speculative(model, ids, mask, 14, exit_layer=2, draft_tokens=3)
    assert torch.equal(adapted.tokens, reference.tokens) and torch.equal(bare.tokens, reference.tokens)
    assert adapted.acceptance != bare.acceptance  # the drafts did go through the adapter
    # a draft vocabulary of the tokens the full model emits drafts as well as the full one does, and one that
    # holds none of them is never accepted: the output is the full model's either way
    produced = draft_vocabulary(reference.tokens, 1000, model.vocab_size)
    narrow = self_speculative(model, ids, mask, 14, exit_layer=2, draft_tokens=3, vocabulary=produced)
    assert torch.equal(narrow.tokens, reference.tokens) and narrow.acceptance >= adapted.acceptance
    unused = [t for t in range(model.vocab_size) if t not in set(reference.tokens.flatten().tolist())][:1]
    never = self_speculative(model, ids, mask, 14, exit_layer=2, draft_tokens=3, vocabulary=torch.tensor(unused))
    assert torch.equal(never.tokens, reference.tokens) and never.accepted == 0
    model.attach_exit_adapters(None)


def test_a_draft_vocabulary_is_the_most_frequent_tokens_and_refuses_bad_input():
    ids = torch.tensor([[5, 5, 5, 7, 7, 9], [7, 5, 3, 3, 3, 3]])
    assert draft_vocabulary(ids, 2).tolist() == [3, 5]  # 3 and 5 (4 each) over 7 (3) and 9 (1)
    assert draft_vocabulary([[1, 1, 2]], 10).tolist() == [1, 2]  # never more ids than were seen
    for bad, match in ((lambda: draft_vocabulary(ids, 0), "size"), (lambda: draft_vocabulary([], 3), "none"),
                       (lambda: draft_vocabulary(ids, 2, vocab_size=8), "0..7")):
        with pytest.raises(ValueError, match=match):
            bad()
    model = llama(seed=1)
    with pytest.raises(ValueError, match="vocabulary"):
        self_speculative(model, *prompts(1, seed=1), 4, exit_layer=1, vocabulary=torch.tensor([model.vocab_size]))


@pytest.mark.parametrize("read_ahead", [False, True])
def test_per_token_exits_through_an_attending_adapter_keep_its_cache_whole(read_ahead):
    model = sharpened(llama(seed=32, num_hidden_layers=5))
    adapters = perturbed(ExitAdapters(model, [2, 4], "layer"))
    model.attach_exit_adapters(adapters)
    ids, mask = prompts(3, seed=32)

    def decode(threshold: float):
        decider = CalmDecider(CalmPolicy("margin"), threshold, model, 12, ids.device, decay=False)
        return per_token_decoding(model, decider, ids, mask, 12, exit_layers=[2, 4], graphs=False,
                                  read_ahead=read_ahead)

    out = decode(0.1)
    assert {2, 4} <= set(out.exit_layers[:, 1:].unique().tolist())  # tokens left at both adapted exits
    cache, written = out.info["cache"], ids.shape[1] + 11
    for exit_layer in (2, 4):
        (index,) = adapters.cache_layer_indices(exit_layer)
        # every real slot (prompt and new tokens) holds the adapter's keys: none was skipped by an early exit
        keys = cache.keys[index][:, :, :written].abs().sum((1, 3))
        assert bool((keys[:, :ids.shape[1]][mask.bool()] > 0).all()) and bool((keys[:, ids.shape[1]:] > 0).all())
    # a threshold no token passes: the full model's tokens, the adapters' caches notwithstanding
    assert torch.equal(decode(1.01).tokens, greedy(model, ids, mask, 12).tokens)
    model.attach_exit_adapters(None)
