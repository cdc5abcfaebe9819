"""Two processes (torch.distributed, gloo on the CPU) do what one does: the same sharded trace, bit for bit, and the
same optimiser steps (loss of every step, weights at the end) when a global batch is shared out row by row, even
when a last batch leaves a process without rows; ``torchrun -m exitrl.train`` writes one run and a cache entry a
one-process run reuses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from distributed_worker import interrupted, work

from exitrl.distributed import World, launched_world, share

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shares_and_the_launched_world(monkeypatch):
    assert [share(list(range(7)), World(r, 3)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world() == World() and not World().active
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_world() == World(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        launched_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="torchrun"):
        launched_world()


def test_two_processes_trace_and_train_as_one_does(tiny_bert, tiny_llama, glue_dir, tmp_path):
    for size in (1, 2):
        mp.spawn(work, args=(size, free_port(), str(tiny_bert), str(tiny_llama), str(glue_dir), str(tmp_path)),
                 nprocs=size)
    one, two = (torch.load(tmp_path / f"result_{n}.pt") for n in (1, 2))
    assert two["world"] == 2
    for split in ("train", "dev"):  # the merged trace is the one-process trace, bit for bit
        assert torch.equal(one["trace"][split], two["trace"][split])
        assert torch.equal(one["logits"][split], two["logits"][split])
    assert one["tokens"]["labels"].shape == (5 * 11,)  # a causal LM's token trace: 5 chunks in 3 batches
    for table in ("states", "logits", "labels"):
        assert torch.equal(one["tokens"][table], two["tokens"][table]), table
    assert len(one["losses"]) == len(two["losses"]) == 6  # 2 epochs of batches of 8, 8 and 1
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)  # the same first batch, the same loss
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert one["moved"] > 1e-3 and two["moved"] > 1e-3  # they trained


def test_a_checkpoint_of_two_processes_resumes_in_one(tiny_bert, glue_dir, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, resumed):
        folder.mkdir()
    mp.spawn(interrupted, args=(1, free_port(), str(tiny_bert), str(glue_dir), str(whole), 0), nprocs=1)
    mp.spawn(interrupted, args=(2, free_port(), str(tiny_bert), str(glue_dir), str(resumed), 4), nprocs=2)
    assert (resumed / "checkpoint.pt").is_file() and not list(resumed.glob("weights_*"))  # stopped at step 4
    mp.spawn(interrupted, args=(1, free_port(), str(tiny_bert), str(glue_dir), str(resumed), 0), nprocs=1)
    one, two_then_one = (torch.load(f / "weights_1_0.pt") for f in (whole, resumed))
    assert one["steps"] == [1, 2, 3, 4, 5, 6] and two_then_one["steps"] == [4, 5, 6]  # it resumed after step 3
    one, two_then_one = one["weights"], two_then_one["weights"]
    for name, weight in one.items():
        torch.testing.assert_close(two_then_one[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_writes_one_run_and_a_cache_entry_one_process_reuses(tiny_bert, glue_dir, tmp_path):
    overrides = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                 "data.limit.train=64", "data.limit.dev=24", "backbone.finetune.epochs=1",
                 "backbone.finetune.batch_size=8", "agent=confidence", "device=cpu", "threads=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / 'two'}"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["environment"]["processes"] == 2 and metrics["backbone"]["cached"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "two"]  # process 1 wrote no run folder
    one = subprocess.run([sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    again = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert again["backbone"]["cached"] is True and again["backbone"]["path"] == metrics["backbone"]["path"]
    assert again["trace_key"] == metrics["trace_key"] and again["environment"]["processes"] == 1
    assert again["results"] == metrics["results"]


def test_torchrun_cotrains_with_process_zeros_policy(tiny_bert, glue_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    overrides = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                 "data.limit.train=64", "data.limit.dev=24", "backbone.finetune.epochs=1",
                 "backbone.finetune.batch_size=8", "agent=reinforce", "agent.epochs=2", "agent.batch_size=8",
                 "backbone.mode=cotrain", "cotrain.rounds=2", "cotrain.lr=1e-3", "cotrain.head_lr=1e-3",
                 "device=cpu", "threads=1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "exitrl.train", *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backbone_mode"] == "cotrain" and metrics["environment"]["processes"] == 2
    assert [r["round"] for r in metrics["cotrain"]["rounds"]] == [0, 1, 2]
    assert (tmp_path / "run" / "backbone" / "exitrl_backbone.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


def test_torchrun_continues_an_lm_with_layerskip_and_one_process_reuses_it(glue_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    overrides = ["env=lm_text", "backbone=tiny_llama", "env.lm_text.length=16",
                 "env.lm_text.max_chunks={train: 24, dev: 12, policy: 16}", "backbone.finetune.epochs=1",
                 "data.policy_split=0.3", "seed=1", f"data.dir={glue_dir}", "backbone.continue_training=true",
                 "backbone.finetune.objective=layerskip", "agent=confidence", "device=cpu", "threads=1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / 'two'}"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    first, again = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one"))
    assert first["environment"]["processes"] == 2 and again["environment"]["processes"] == 1
    assert first["backbone"]["path"] == again["backbone"]["path"]  # the continued LM, written once, reused
    assert len(list((tmp_path / "cache" / "lm_backbones").iterdir())) == 1
    assert again["trace_key"] == first["trace_key"] and again["results"] == first["results"]
