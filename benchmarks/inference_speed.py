"""Wall-clock speed of early-exit inference. Rows: HF eager full forward (`AutoModel`, inputs already on the
device), exitrl's full forward on the fast path (no exits), a naive early-exit loop (every row computed until all
have exited, one host read per layer), exitrl's eager walk, and the exitrl runtime (on CUDA: the fast path, with
CUDA graphs; inputs start on the host, as a tokenizer leaves them), for static exits at L/4, L/2, 3L/4 and, with
``--run``, a trained policy on real text (whole-split examples/s, full vs early exit, at each batch size).

    python benchmarks/inference_speed.py --device cpu --shapes minilm --batches 32 --reps 5 \
        --run runs/rte/reinforce/<time> --texts ../shared/data/glue/RTE/dev.tsv --out benchmarks/reference/x.json

Random weights for the shapes (speed does not depend on the values), bf16 on CUDA and fp32 on the CPU; ms per
batch is the median of ``--reps`` timed calls after ``--warmup`` calls (which also capture the graphs), with CUDA
synchronised around each. Prints a table, saves JSON and, where matplotlib is installed, a PNG of achieved vs ideal
speedup beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.core.device import autocast
from exitrl.data import read_texts
from exitrl.evaluation.walk import walk
from exitrl.runtime.classifier import EarlyExitClassifier, LiveSource
from exitrl.runtime.fast_walk import FastWalker

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.no_grad()
def naive_loop(model: MultiExitModel, policy, ids, mask) -> None:
    """Research-code style: every row runs every layer until all rows have exited; one host read per layer."""
    hidden, layer_inputs = model.embed(ids, mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    memory = policy.init_memory(ids.shape[0], ids.device)
    from exitrl.policy import LayerBatch

    for i in range(model.num_layers):
        hidden = model.run_layer(i, hidden, layer_inputs)
        pooled = model.pool(hidden, mask)
        logits = model.exit_logits(i, pooled)
        done |= policy.decide(LayerBatch(i + 1, model.num_layers, pooled.float(), logits.float()), memory)
        if bool(done.all()):  # the host read that syncs every layer
            break


def rows_for(model, policy, ids, mask, device, warmup, reps, full: float) -> dict:
    """One policy on one batch: the naive loop, the eager walk and the runtime, against ``full`` (ms)."""
    batch = ids.shape[0]
    host_ids, host_mask = ids.cpu(), mask.cpu()
    fast = FastWalker(model, policy, batch, token_types=False)  # the weights are bf16 already: no autocast
    runtime = timed(lambda: fast.run(host_ids, host_mask), device, warmup, reps)
    exits = fast.run(host_ids, host_mask)
    with autocast(device):
        eager = timed(lambda: walk(policy, LiveSource(model, ids, mask), batch, device), device, warmup, reps)
        naive = timed(lambda: naive_loop(model, policy, ids, mask), device, warmup, reps)
    mean_exit = float(exits.layers.float().mean())
    ideal = model.num_layers / mean_exit
    return {"naive_ms": naive, "eager_walk_ms": eager, "runtime_ms": runtime, "examples_per_second":
            1000 * batch / runtime, "mean_exit_layer": mean_exit, "ideal_speedup": ideal,
            "speedup": full / runtime, "achieved_over_ideal": (full / runtime) / ideal}


def shape_benchmark(name: str, batch: int, seq: int, device: torch.device, warmup: int, reps: int) -> list[dict]:
    config = BertConfig(vocab_size=30522, **SHAPES[name])
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config)
    model = MultiExitModel(encoder, 2, "mean").to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    ids = torch.randint(1000, 30000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad(), autocast(device):
        hf = timed(lambda: encoder(input_ids=ids, attention_mask=mask), device, warmup, reps)
    full_walker = FastWalker(model, StaticPolicy(model.num_layers), batch, token_types=False)
    host_ids, host_mask = ids.cpu(), mask.cpu()
    full = timed(lambda: full_walker.run(host_ids, host_mask), device, warmup, reps)
    out = []
    for fraction in (0.25, 0.5, 0.75):
        layer = max(1, round(fraction * model.num_layers))
        row = {"shape": name, "batch": batch, "seq": seq, "policy": f"static {layer}/{model.num_layers}",
               "hf_eager_ms": hf, "exitrl_full_ms": full,
               **rows_for(model, StaticPolicy(layer), ids, mask, device, warmup, reps, full)}
        row["speedup_over_hf"] = hf / row["runtime_ms"]
        out.append(row)
    return out


def hf_pipeline(classifier: EarlyExitClassifier, batch: int):
    """What a user would run instead: Hugging Face's text-classification pipeline on the same fine-tuned weights
    (the run's encoder, its mean pooling and its last exit head, wrapped as a `PreTrainedModel`; same dtype and
    device)."""
    import copy

    from transformers import PreTrainedModel, TextClassificationPipeline
    from transformers.modeling_outputs import SequenceClassifierOutput
    from transformers.utils import logging as hf_logging

    class MeanPooledClassifier(PreTrainedModel):
        _supports_sdpa = _supports_flash_attn = _supports_attention_backend = True

        def __init__(self, model, label_names):
            config = copy.deepcopy(model.encoder.config)
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
            config.problem_type = "single_label_classification"
            super().__init__(config)
            self.multi_exit = model

        def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
            m = self.multi_exit
            hidden = m.encoder(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            return SequenceClassifierOutput(logits=m.exit_logits(m.num_layers - 1, m.pool(hidden, attention_mask)))

    hf_logging.set_verbosity(50)  # the pipeline logs an error that it does not know this model class
    model = MeanPooledClassifier(classifier.model, classifier.label_names).eval()
    return TextClassificationPipeline(model=model, tokenizer=classifier.tokenizer, device=classifier.device,
                                      batch_size=batch, truncation=True, max_length=classifier.max_length)


def file_labels(path: str) -> list[int] | None:
    """Class indices from a GLUE TSV's ``label`` column of digits (SST-2, RTE ids differ: then None)."""
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or "label" not in rows[0] or not all(r["label"].isdigit() for r in rows):
        return None
    return [int(r["label"]) for r in rows]


def run_benchmark(run_dir: str, texts_path: str, batches: list[int], device: torch.device, warmup: int,
                  reps: int, text_columns: list[str] | None = None, compile_decisions: bool = False) -> dict:
    """A trained run on real text (its real lengths, sorted into length buckets): whole-split examples/s of the
    full model and of early exit at each batch size, on the runtime's default path and on the eager walk; and how
    often the default path's exits and answers equal the eager walk's."""
    if text_columns is None:
        from exitrl.predict import run_task  # reads the run's config (omegaconf)

        text_columns = run_task(Path(run_dir)).text_columns
    classifier = EarlyExitClassifier.from_run(run_dir, str(device), compile_decisions=compile_decisions)
    eager = EarlyExitClassifier.from_run(run_dir, str(device), fast=False)
    first, second = read_texts(texts_path, text_columns)
    layers = classifier.model.num_layers
    labels = file_labels(texts_path)
    out = {"run": str(run_dir), "texts": texts_path, "examples": len(first), "fast_path": classifier.fast,
           "compiled": compile_decisions,
           "batches": []}
    for batch in batches:
        policy = classifier.policy
        timings = {}
        for label, runner, chosen in (("full", classifier, StaticPolicy(layers)), ("early_exit", classifier, policy),
                                      ("eager_walk_early_exit", eager, eager.policy)):
            runner.policy = chosen
            seconds = timed(lambda r=runner, b=batch: r.exits(first, second, batch_size=b), device, warmup, reps) / 1000
            timings[label] = {"seconds": seconds, "examples_per_second": len(first) / seconds}
        classifier.policy = policy
        pipe = hf_pipeline(classifier, batch)
        inputs = first if second is None else [{"text": a, "text_pair": b} for a, b in zip(first, second)]
        seconds = timed(lambda p=pipe, x=inputs: p(x), device, 1, max(1, min(reps, 3))) / 1000
        piped = pipe(inputs)
        index = {name: i for i, name in enumerate(classifier.label_names)}
        piped_predictions = torch.tensor([index[a["label"]] for a in piped])
        timings["hf_pipeline"] = {"seconds": seconds, "examples_per_second": len(first) / seconds}
        if classifier.fast:  # the model's time alone: batches tokenized and padded beforehand
            timings.update(pretokenized(classifier, first, second, batch, StaticPolicy(layers), device, warmup, reps))
        found = classifier.exits(first, second, batch_size=batch)
        walked = eager.exits(first, second, batch_size=batch)
        mean_exit = float(found.layers.float().mean())
        speedup = timings["full"]["seconds"] / timings["early_exit"]["seconds"]
        row = {"batch": batch, **timings, "mean_exit_layer": mean_exit, "ideal_speedup": layers / mean_exit,
               "speedup": speedup, "achieved_over_ideal": speedup / (layers / mean_exit),
               **({"model_only_speedup": timings["model_only_full"]["seconds"]
                   / timings["model_only_early_exit"]["seconds"]} if classifier.fast else {}),
               "exits_equal_eager_walk": float((found.layers == walked.layers).float().mean()),
               "predictions_equal_eager_walk": float((found.predictions == walked.predictions).float().mean())}
        row["over_hf_pipeline"] = timings["hf_pipeline"]["seconds"] / timings["early_exit"]["seconds"]
        if labels is not None:
            row["accuracy_hf_pipeline"] = float((piped_predictions == torch.tensor(labels)).float().mean())
            row["accuracy"] = float((found.predictions == torch.tensor(labels)).float().mean())
            row["accuracy_eager_walk"] = float((walked.predictions == torch.tensor(labels)).float().mean())
        out["batches"].append(row)
    return out


def pretokenized(classifier: EarlyExitClassifier, first, second, batch: int, full_policy, device, warmup: int,
                 reps: int) -> dict:
    """Whole-split time of the fast path alone (full and early exit), on batches tokenized, sorted by length and
    padded beforehand: what the runtime costs once tokenization is done (or pipelined) elsewhere."""
    examples = classifier.encode(first, second)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    padded = [classifier.tokenizer.pad([examples[i] for i in order[start:start + batch]], return_tensors="pt")
              for start in range(0, len(order), batch)]
    policy, out = classifier.policy, {}
    for label, chosen in (("model_only_full", full_policy), ("model_only_early_exit", policy)):
        classifier.policy = chosen
        walker = classifier.walker(batch)
        seconds = timed(lambda w=walker: [w.run(p["input_ids"], p["attention_mask"], p.get("token_type_ids"))
                                          for p in padded], device, warmup, reps) / 1000
        out[label] = {"seconds": seconds, "examples_per_second": len(first) / seconds}
    classifier.policy = policy
    return out


def plot(record: dict, path: Path) -> None:
    """Achieved vs ideal speedup of every row: a point on the diagonal turns every saved layer into saved time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    figure, axes = plt.subplots(figsize=(6, 5))
    for batch in sorted({r["batch"] for r in record["rows"]}):
        rows = [r for r in record["rows"] if r["batch"] == batch]
        axes.scatter([r["ideal_speedup"] for r in rows], [r["speedup"] for r in rows], label=f"static, batch {batch}")
    for row in record.get("trained_run", {}).get("batches", []):
        axes.scatter([row["ideal_speedup"]], [row["speedup"]], marker="*", s=140,
                     label=f"trained policy, batch {row['batch']}")
    points = record["rows"] + record.get("trained_run", {}).get("batches", [])
    top = max([r["ideal_speedup"] for r in points] + [r["speedup"] for r in points]) * 1.05
    axes.plot([1, top], [1, top], "k--", linewidth=1, label="ideal")
    axes.plot([1, top], [0.9, 0.9 * top], ":", color="grey", linewidth=1, label="0.9 of ideal")
    axes.set_xlabel("ideal speedup (L / mean exit layer)")
    axes.set_ylabel("achieved speedup over exitrl's full forward")
    axes.set_title(f"{record['machine']}, {record['date']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["minilm", "bert-base"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--run", help="a trained run folder (exitrl.train) for the real-text rows")
    parser.add_argument("--texts", help="a TSV/CSV/JSONL of texts for --run (e.g. the task's dev file)")
    parser.add_argument("--run-batches", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--text-columns", nargs="+", help="the --texts columns (default: the run's task's)")
    parser.add_argument("--compile", action="store_true",
                        help="the trained run's fast path with torch.compile'd exit heads and decisions")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [row for shape in args.shapes for batch in args.batches
            for row in shape_benchmark(shape, batch, args.seq, device, args.warmup, args.reps)]
    print(f"{'shape':<11}{'batch':>6}{'policy':>14}{'HF eager':>10}{'full':>9}{'naive':>9}{'eager':>9}{'exitrl':>9}"
          f"{'ex/s':>10}{'speedup':>9}{'ideal':>7}{'ratio':>7}{'vs HF':>7}   (ms per batch)")
    for r in rows:
        print(f"{r['shape']:<11}{r['batch']:>6}{r['policy']:>14}{r['hf_eager_ms']:>10.2f}{r['exitrl_full_ms']:>9.2f}"
              f"{r['naive_ms']:>9.2f}{r['eager_walk_ms']:>9.2f}{r['runtime_ms']:>9.2f}"
              f"{r['examples_per_second']:>10.0f}{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x"
              f"{r['achieved_over_ideal']:>7.2f}{r['speedup_over_hf']:>6.2f}x")
    record = {"date": date.today().isoformat(), "device": str(device),
              "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "seq": args.seq,
              "warmup": args.warmup, "reps": args.reps, "rows": rows}
    if args.run:
        trained = run_benchmark(args.run, args.texts, args.run_batches, device, max(1, min(args.warmup, 2)),
                                max(1, min(args.reps, 5)), args.text_columns, args.compile)
        record["trained_run"] = trained
        for row in trained["batches"]:
            rates = {k: row[k]["examples_per_second"] for k in ("full", "early_exit", "eager_walk_early_exit")}
            print(f"trained run, {trained['examples']} texts at batch {row['batch']}: full {rates['full']:.0f}/s, "
                  f"early exit {rates['early_exit']:.0f}/s (eager walk {rates['eager_walk_early_exit']:.0f}/s); "
                  f"{row['speedup']:.2f}x, ideal {row['ideal_speedup']:.2f}x, "
                  f"ratio {row['achieved_over_ideal']:.2f}; exits equal to the eager walk "
                  f"{row['exits_equal_eager_walk']:.3f}"
                  + (f"; model only (pre-tokenized): full {row['model_only_full']['examples_per_second']:.0f}/s, "
                     f"early exit {row['model_only_early_exit']['examples_per_second']:.0f}/s, "
                     f"{row['model_only_speedup']:.2f}x, ratio {row['model_only_speedup'] / row['ideal_speedup']:.2f}"
                     if "model_only_speedup" in row else "")
                  + f"; HF pipeline {row['hf_pipeline']['examples_per_second']:.0f}/s (early exit "
                    f"{row['over_hf_pipeline']:.2f}x of it)"
                  + (f"; accuracy {row['accuracy']:.4f} (eager {row['accuracy_eager_walk']:.4f}, HF pipeline "
                     f"{row['accuracy_hf_pipeline']:.4f})"
                     if "accuracy" in row else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")
    plot(record, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
