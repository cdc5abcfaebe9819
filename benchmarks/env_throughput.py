"""Env steps per second: the single Gymnasium env, a Gymnasium SyncVectorEnv of it, and the batched torch
`TraceVectorEnv` at about 1k, 16k and 256k episodes. Prints a table and saves JSON.

The trace is synthetic with the default backbone's shape (6 layers, 384-float states, 2 classes): env speed does
not depend on the values. Run on the CPU or, through the device tool, on a GPU:

    python benchmarks/env_throughput.py --out benchmarks/results/env_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from exitrl.envs import EarlyExitEnv, TraceVectorEnv
from exitrl.traces.trace import SplitTrace


def synthetic_trace(n: int, num_layers: int = 6, hidden: int = 384, classes: int = 2, seed: int = 0) -> SplitTrace:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, num_layers, hidden, generator=g).half()
    logits = torch.randn(n, num_layers, classes, generator=g)
    labels = torch.randint(classes, (n,), generator=g)
    return SplitTrace.from_logits(states, logits, labels)


def bench_single(trace: SplitTrace, seconds: float) -> float:
    env = EarlyExitEnv(trace)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.random(100_000) < 0.3
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:10_000]:
            _, _, terminated, _, _ = env.step(int(a))
            if terminated:
                env.reset()
        steps += 10_000
    return steps / (time.perf_counter() - start)


def bench_sync_vector(trace: SplitTrace, num_envs: int, seconds: float) -> float:
    envs = gym.vector.SyncVectorEnv([lambda: EarlyExitEnv(trace) for _ in range(num_envs)])
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            envs.step((rng.random(num_envs) < 0.3).astype(np.int64))
        steps += 200 * num_envs
    return steps / (time.perf_counter() - start)


def bench_batched(trace: SplitTrace, num_envs: int, device: torch.device, seconds: float) -> float:
    env = TraceVectorEnv(trace, num_envs, device=device, seed=0)
    env.reset()
    actions = [(torch.rand(num_envs, device=device) < 0.3).long() for _ in range(8)]
    for i in range(5):  # warm-up
        env.step(actions[i % 8])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(20):
            env.step(actions[i % 8])
        sync()
        steps += 20 * num_envs
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples in the synthetic trace")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--sync-envs", type=int, default=16)
    parser.add_argument("--batched", type=int, nargs="+", default=[1024, 16384, 262144])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/env_throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    trace = synthetic_trace(args.examples)
    results = {"single_env": bench_single(trace, args.seconds),
               f"sync_vector_env_{args.sync_envs}": bench_sync_vector(trace, args.sync_envs, args.seconds)}
    for n in args.batched:
        results[f"batched_{n}_{device.type}"] = bench_batched(trace, n, device, args.seconds)
    best_batched = max(v for k, v in results.items() if k.startswith("batched"))
    ratio = best_batched / results[f"sync_vector_env_{args.sync_envs}"]
    record = {
        "benchmark": "env_throughput", "unit": "steps/s", "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "trace_shape": [args.examples, 6, 384],
        "results": results, "batched_over_sync_vector": ratio, "date": time.strftime("%Y-%m-%d"),
    }
    for name, value in results.items():
        print(f"{name:<32}{value:>16,.0f} steps/s")
    print(f"{'best batched / SyncVectorEnv':<32}{ratio:>16.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
