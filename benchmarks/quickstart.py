"""The README's main job as a newcomer meets it: ``exitrl train agent=reinforce env=rte`` with an empty exitrl cache
(so the backbone is fine-tuned and traced, not reused), timed from the outside, then once more with the cache warm.

    python benchmarks/quickstart.py --data ../shared/data/glue [--machine cpu] [--workdir DIR]

Prints and saves ``benchmarks/reference/quickstart_<machine>_<date>.json``: the command, wall seconds (cold and warm),
the dev table (the agent, the max-prob baseline, the full model, the consistency oracle) and the environment the run
recorded. The documentation's results pages are generated from that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"
COMMAND = ["exitrl", "train", "agent=reinforce", "env=rte"]


def run_once(workdir: Path, env: dict) -> tuple[float, Path]:
    """Run the main job in ``workdir``; returns its wall seconds and the run folder it wrote."""
    before = set((workdir / "runs" / "rte" / "reinforce").glob("*"))
    start = time.perf_counter()
    log = workdir / "quickstart.log"
    with log.open("a") as out:
        done = subprocess.run(COMMAND, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the main job failed with status {done.returncode}; see {log}")
    new = sorted(set((workdir / "runs" / "rte" / "reinforce").glob("*")) - before)
    return seconds, new[-1]


def summary(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    pick = ("accuracy", "avg_exit_layer", "speedup", "saved_layers")
    table = {name: {k: result[k] for k in pick} for name, result in record["results"].items()}
    oracle = record["oracle"]
    return {"dev": table, "full_model": {k: oracle["full_model"][k] for k in pick},
            "consistency_oracle": {k: oracle["consistency_oracle"][k] for k in pick},
            "examples": record["results"][record["agent"]]["num_examples"], "environment": record["environment"],
            "total_seconds_recorded": record["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the GLUE folder (EXITRL_DATA_DIR)")
    parser.add_argument("--machine", default="cpu", help="a short machine name for the file name, e.g. cpu, h100")
    parser.add_argument("--workdir", default=None, help="where runs/ goes (default: a new temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="exitrl-quickstart-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="exitrl-quickstart-cache-")
    env = {**os.environ, "EXITRL_DATA_DIR": str(Path(args.data).resolve()), "EXITRL_CACHE_DIR": cache}
    cold, run_dir = run_once(workdir, env)
    warm, _ = run_once(workdir, env)
    today = datetime.date.today().isoformat()
    result = {"what": "the README's main job, `exitrl train agent=reinforce env=rte`, with an empty exitrl cache, "
                      "then again with the backbone and trace cached",
              "command": " ".join(COMMAND), "date": today, "machine": args.machine, "cpu_count": os.cpu_count(),
              "cold_seconds": round(cold, 1), "warm_seconds": round(warm, 1), **summary(run_dir)}
    out = REFERENCE / f"quickstart_{args.machine}_{today}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
