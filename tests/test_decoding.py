"""Greedy and self-speculative decoding with a `MultiExitLM`: the full model's greedy tokens, batch 1 and batches of
left-padded prompts of different lengths, against transformers' own `generate`."""

from __future__ import annotations

import pytest
import torch
from test_multi_exit_lm import tiny_lm

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import greedy, self_speculative


def prompts(batch: int, seed: int = 0):
    """Left-padded random prompts of different lengths (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9, 5][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, 101, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def reference(model: MultiExitLM, ids, mask, new: int) -> torch.Tensor:
    """transformers' own greedy `generate` (no end-of-sequence stop: all rows run ``new`` tokens)."""
    model.lm.generation_config.eos_token_id = None
    out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen3-sliding", "gpt2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_and_self_speculative_equal_the_full_models_greedy_tokens(family, batch):
    model = MultiExitLM(tiny_lm(family, seed=2))
    ids, mask = prompts(batch)
    expected = reference(model, ids, mask, 12)
    assert torch.equal(greedy(model, ids, mask, 12).tokens, expected)
    for exit_layer, draft in ((1, 1), (1, 3), (2, 4), (2, 12)):
        generation = self_speculative(model, ids, mask, 12, exit_layer, draft)
        assert torch.equal(generation.tokens, expected), (exit_layer, draft)
        # every verification emits the confirmed drafts and one more token (none after a fully confirmed draft)
        per_row = generation.info["emitted_per_cycle"]  # each row's tokens per cycle: its own pace
        assert generation.drafted == draft * sum(len(cycles) for cycles in per_row)
        assert generation.steps - 1 == max(len(cycles) for cycles in per_row)
        assert all(1 <= n <= draft for cycles in per_row for n in cycles)
        assert all(1 + sum(cycles) >= 12 and 1 + sum(cycles[:-1]) < 12 for cycles in per_row)


def test_a_draft_that_is_always_right_is_always_accepted():
    """With the first layers' exit equal to the full model's (every deeper layer made an identity), every draft
    is confirmed: k drafts give k tokens per verification."""
    model = MultiExitLM(tiny_lm("llama", seed=3))
    for layer in model.layers[1:]:  # residual blocks whose branches output zero: identities
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            torch.nn.init.zeros_(linear.weight)
    ids, mask = prompts(2)
    generation = self_speculative(model, ids, mask, 13, exit_layer=1, draft_tokens=4)
    assert torch.equal(generation.tokens, reference(model, ids, mask, 13))
    assert generation.acceptance == 1.0 and generation.steps == 1 + 3  # 1 + 4 + 4 + 4 tokens


def test_decoding_settings_are_checked():
    model = MultiExitLM(tiny_lm("llama"))
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match="exit_layer must lie in 1..2"):
        self_speculative(model, ids, mask, 4, exit_layer=3)
    with pytest.raises(ValueError, match="draft_tokens"):
        self_speculative(model, ids, mask, 4, exit_layer=1, draft_tokens=0)


def run_generate(arguments: list[str], capsys) -> tuple[int, str]:
    """``exitrl.generate``'s main in this process (argparse errors exit with 2): its status and stderr."""
    from exitrl.generate import main

    try:
        status = main(arguments)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def test_the_generate_cli_runs_every_method_and_refuses_bad_settings(tiny_llama, tmp_path, capsys):
    import json
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the good film"}\n{"prompt": "she said it was a bad story and"}\n\n')
    from exitrl.agents.static import StaticPolicy

    StaticPolicy(2).save(tmp_path / "policy.pt")
    outputs = {}
    settings = {"full": [], "selfspec": ["--exit-layer", "1"], "calm": ["--threshold", "0.5", "--exit-layers", "2"],
                "free": ["--shallow-layer", "1", "--threshold", "0.2"],
                "policy": ["--policy", str(tmp_path / "policy.pt"), "--propagation", "recompute"]}
    for method, extra in settings.items():
        arguments = [str(tiny_llama), "--input", str(prompts), "--method", method, "--max-new-tokens", "10", *extra,
                     "--output", str(tmp_path / f"{method}.jsonl")]
        if method == "full":  # once as the command a user types, the others in this process (same main)
            done = subprocess.run([sys.executable, "-m", "exitrl.generate", *arguments], capture_output=True,
                                  text=True, timeout=300)
            status, stderr = done.returncode, done.stderr
        else:
            status, stderr = run_generate(arguments, capsys)
        assert status == 0, stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / f"{method}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["the good film", "she said it was a bad story and"]
        outputs[method] = rows
        summary = json.loads(stderr.strip().splitlines()[-1])
        assert summary["method"] == method and summary["tokens"] == sum(len(r["tokens"]) for r in rows)
        if method in ("calm", "free", "policy"):
            assert (2 if method == "calm" else 1) <= summary["mean_exit_layer"] <= 3  # calm: layer 2 or 3 only
    assert outputs["full"] == outputs["selfspec"] and all(len(r["tokens"]) == 10 for r in outputs["full"])
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "junk.pt").write_text("not a policy")
    refused = {"--device 'gpux'": ["--input", str(prompts), "--device", "gpux"],
               "--policy": ["--input", str(prompts), "--method", "policy", "--policy", str(tmp_path / "junk.pt")],
               "No such file or directory": ["--input", str(prompts), "--output", str(tmp_path / "no" / "x.jsonl")],
               "line 1": ["--input", str(tmp_path / "bad.jsonl")],
               "full, selfspec, calm, free, policy": ["--input", str(prompts), "--method", "beam"],
               "needs a trained policy": ["--input", str(prompts), "--method", "policy"],
               "exit_layer must lie in 1..2": ["--input", str(prompts), "--method", "selfspec", "--exit-layer", "9"],
               "--shallow-layer must lie in 1..2": ["--input", str(prompts), "--method", "free",
                                                    "--shallow-layer", "3"],
               "--propagation": ["--input", str(prompts), "--method", "calm", "--propagation", "skip"],
               "has 3 layers": ["--input", str(prompts), "--method", "calm", "--exit-layers", "2", "9"],
               "1-indexed": ["--input", str(prompts), "--method", "policy", "--exit-layers", "0"]}
    for message, arguments in refused.items():
        status, stderr = run_generate([str(tiny_llama), *arguments], capsys)
        assert status == 2 and message in stderr and "Traceback" not in stderr, message


def test_rows_stop_at_their_end_of_sequence_token_and_no_mask_means_no_padding():
    model = MultiExitLM(tiny_lm("llama", seed=4))
    ids, mask = prompts(3, seed=1)
    free_run = reference(model, ids, mask, 10)
    eos = int(free_run[0, 3])  # a token the first row emits at step 4: it ends there, padded after
    expected = free_run.clone()
    for row in range(3):
        hits = (free_run[row] == eos).nonzero()
        if hits.numel():
            expected[row, int(hits[0]) + 1:] = 0
    for generation in (greedy(model, ids, mask, 10, eos_token_id=eos),
                       self_speculative(model, ids, mask, 10, 1, 3, eos_token_id=eos)):
        assert torch.equal(generation.tokens[:, :10], expected[:, :generation.tokens.shape[1]])
    single = ids[2:, mask[2].bool()]  # the longest prompt alone: no padding, no mask
    assert torch.equal(greedy(model, single, None, 6).tokens, reference(model, single, torch.ones_like(single), 6))


def test_a_policy_decides_per_token_with_copied_or_recomputed_states():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from exitrl.agents.static import StaticPolicy
    from exitrl.decoding import policy_decoding

    model = MultiExitLM(tiny_lm("llama", seed=5))
    ids, mask = prompts(3, seed=2)
    full = greedy(model, ids, mask, 8).tokens
    for propagation in ("copy", "recompute"):  # never early: the full model's tokens
        assert torch.equal(policy_decoding(model, StaticPolicy(3), ids, mask, 8, propagation=propagation).tokens,
                           full)
    # exit at layer 1, the rest recomputed: each token is layer 1's answer on the full model's states
    single = ids[:1, mask[0].bool()]
    out = policy_decoding(model, StaticPolicy(1), single, None, 6, propagation="recompute")
    sequence = torch.cat([single, out.tokens[:, :-1]], 1)
    with torch.no_grad():
        states = model.lm(input_ids=sequence, output_hidden_states=True).hidden_states[1]
        expected = model.exit_logits(0, states[:, single.shape[1] - 1:]).argmax(-1)
    assert torch.equal(out.tokens, expected) and out.accepted == 5 * 2  # 5 decided steps, 2 layers skipped each
    # exit at layer 1 with the state copied up: every deeper layer's keys for a generated token are its own
    # projection of the layer-1 state
    out = policy_decoding(model, StaticPolicy(1), single, None, 6, propagation="copy")
    sequence = torch.cat([single, out.tokens[:, :-1]], 1)
    prompt = single.shape[1]
    with torch.no_grad():
        hidden, inputs = model.embed(sequence, None)
        h1 = model.run_layer(0, hidden, inputs)  # layer 1 is computed as usual for every token
        cos, sin = inputs["position_embeddings"]
        for j in (1, 2):
            attention = model.layers[j].self_attn
            keys = attention.k_proj(model.layers[j].input_layernorm(h1))
            keys = keys.view(1, sequence.shape[1], -1, attention.head_dim).transpose(1, 2)
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            cached = out.info["cache"].keys[j][:, :, :sequence.shape[1]]
            torch.testing.assert_close(cached[:, :, prompt:], keys[:, :, prompt:], rtol=0, atol=1e-5)
            if j == 2:  # the prompt ran every layer: layer 3 read layer 2's output for it, not layer 1's
                assert not torch.allclose(cached[:, :, :prompt], keys[:, :, :prompt])
    with pytest.raises(ValueError, match="copy, recompute"):
        policy_decoding(model, StaticPolicy(1), single, None, 2, propagation="skip")


@pytest.mark.parametrize("policy_name", ["confidence", "patience", "reinforce"])
def test_decoding_with_a_policy_equals_its_walk_on_the_token_trace_of_the_same_text(policy_name):
    """With the skipped layers recomputed, the cache is the full model's, so every decision the policy makes while
    decoding is the one it makes on the token trace of the produced text ("runtime equals trace")."""
    from exitrl.agents.confidence import ConfidencePolicy
    from exitrl.agents.patience import PatiencePolicy
    from exitrl.decoding import policy_decoding
    from exitrl.evaluation.evaluate import run_policy
    from exitrl.traces.tokens import build_token_split, state_projection

    model = MultiExitLM(tiny_lm("llama", seed=6))
    prompt = prompts(1, seed=3)[0]
    from exitrl.agents.reinforce import ReinforcePolicy

    torch.manual_seed(0)
    policy = {"confidence": ConfidencePolicy(0.0133),  # a random model's exits are flat
              "patience": PatiencePolicy(1),
              "reinforce": ReinforcePolicy(3, 8, 5, hidden=16, threshold=0.5)}[policy_name]  # untrained MLP
    out = policy_decoding(model, policy, prompt, None, 10, top_k=4, state_projection=state_projection(32, 8),
                          propagation="recompute")
    sequence = torch.cat([prompt, out.tokens], 1)  # the trace's row p predicts token p + 1
    split = build_token_split(model, [{"input_ids": sequence[0].tolist()}], k=4, state_dim=8)
    decided = torch.arange(prompt.shape[1], sequence.shape[1] - 1)  # inputs: generated tokens 1..9 came from them
    layers, predictions = run_policy(policy, split.select(decided))
    assert torch.equal(predictions, out.tokens[0, 1:])
    assert int((model.num_layers - layers).sum()) == out.accepted
    assert 0 < out.accepted < 9 * (model.num_layers - 1)  # some tokens left early, not all at layer 1


def test_one_draft_is_accepted_exactly_where_the_draft_layer_agrees_with_the_full_model():
    """With one draft per cycle every generated token after the first is drafted once, so the accepted count must
    equal the number of those positions where the draft layer's exit, teacher-forced on the produced text, emits
    the last layer's token."""
    model = MultiExitLM(tiny_lm("llama", seed=13))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a random model's exits are flat; this spreads them without moving argmaxes
    ids, mask = prompts(1, seed=9)
    prompt = ids[:, mask[0].bool()]
    for exit_layer in (1, 2):
        out = self_speculative(model, prompt, None, 16, exit_layer, 1)
        sequence = torch.cat([prompt, out.tokens[:, :-1]], 1)
        with torch.no_grad():
            states = model.layer_states(sequence)
        start = prompt.shape[1]  # the state at position p predicts token p + 1: generated tokens 2..16
        draft = model.exit_logits(exit_layer - 1, states[exit_layer - 1][:, start:]).argmax(-1)
        final = model.exit_logits(model.num_layers - 1, states[-1][:, start:]).argmax(-1)
        assert torch.equal(final, out.tokens[:, 1:])
        assert out.drafted == 15 and out.accepted == int((draft == final).sum())


def test_in_a_batch_every_row_drafts_and_accepts_at_its_own_pace():
    """Rows advance by their own confirmed drafts: a batch accepts, row by row and cycle by cycle, exactly what each
    prompt accepts decoded alone (a shared, shortest prefix would accept less)."""
    model = MultiExitLM(tiny_lm("llama", seed=15))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    ids, mask = prompts(3, seed=11)
    batch = self_speculative(model, ids, mask, 14, exit_layer=2, draft_tokens=3)
    alone = [self_speculative(model, ids[r:r + 1, mask[r].bool()], None, 14, exit_layer=2, draft_tokens=3)
             for r in range(3)]
    assert batch.info["emitted_per_cycle"] == [a.info["emitted_per_cycle"][0] for a in alone]
    assert batch.accepted == sum(a.accepted for a in alone) > 0
    assert torch.equal(batch.tokens, torch.cat([a.tokens for a in alone]))
