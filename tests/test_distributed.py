"""Two processes (torch.distributed, gloo on the CPU) do what one does: the same sharded trace, bit for bit, and the
same optimiser steps (loss of every step, weights at the end) when a global batch is shared out row by row, even
when a last batch leaves a process without rows, with DDP and with FSDP2 (a tied LM too); a checkpoint FSDP2 wrote
on two processes resumes on one; ``torchrun -m exitrl.train`` writes one run and a cache entry a
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
from distributed_worker import interrupted, sharded, work
from omegaconf import OmegaConf

from exitrl.core.distributed import World, launched_world, share
from exitrl.train import sharding

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
    assert sharding(OmegaConf.create({})) == "ddp"
    assert sharding(OmegaConf.create({"distributed": {"sharding": "fsdp"}})) == "fsdp"
    with pytest.raises(ValueError, match="distributed.sharding='zero'; valid: ddp, fsdp"):
        sharding(OmegaConf.create({"distributed": {"sharding": "zero"}}))


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
    # FSDP2 (a sharded copy trains, the plain model gets the gathered weights) takes the same steps
    assert two["fsdp"]["trained"] == two["lm"]["trained"] == ["DTensor"]  # the sharded copy trained
    assert one["lm"]["trained"] == ["Parameter"]
    assert two["fsdp"]["losses"] == pytest.approx(one["losses"], rel=1e-4)
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["fsdp"]["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert len(one["lm"]["losses"]) == 3  # a tied LM: 5 chunks in batches of 2, 2 and 1
    assert two["lm"]["losses"] == pytest.approx(one["lm"]["losses"], rel=1e-4)
    for name, weight in one["lm"]["weights"].items():
        torch.testing.assert_close(two["lm"]["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_shards_a_layer_shared_across_depth(tmp_path, glue_dir):
    """ALBERT runs one layer module at every depth: FSDP2 shards it once and still takes one process's steps."""
    from conftest import save_tiny_encoder
    from transformers import AutoConfig, AutoModel

    albert = save_tiny_encoder(tmp_path / "albert", "albert")
    config = AutoConfig.from_pretrained(albert)
    config.type_vocab_size = 2  # RTE's sentence pairs
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(albert)
    for size in (1, 2):
        mp.spawn(sharded, args=(size, free_port(), str(albert), str(glue_dir), str(tmp_path)), nprocs=size)
    one, two = (torch.load(tmp_path / f"sharded_{n}.pt") for n in (1, 2))
    assert len(one["losses"]) == 6 and two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoints_resume_across_process_counts_and_shardings(tiny_bert, glue_dir, tmp_path):
    """FSDP2 on two processes stops after step 2; one process resumes it and stops after step 4; FSDP2 on two
    processes finishes: the weights of one uninterrupted process."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, resumed):
        folder.mkdir()
    mp.spawn(interrupted, args=(1, free_port(), str(tiny_bert), str(glue_dir), str(whole), 0), nprocs=1)
    for size, stop_at in ((2, 3), (1, 5), (2, 0)):
        mp.spawn(interrupted, args=(size, free_port(), str(tiny_bert), str(glue_dir), str(resumed), stop_at, "fsdp"),
                 nprocs=size)
        assert (resumed / "checkpoint.pt").is_file() and (resumed / "weights.pt").is_file() == (stop_at == 0)
    one, resumed = (torch.load(f / "weights.pt") for f in (whole, resumed))
    assert one["steps"] == [1, 2, 3, 4, 5, 6] and resumed["steps"] == [5, 6]  # the last run resumed after step 4
    for name, weight in one["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resumed_run_of_two_processes_draws_their_own_dropout_masks(tiny_bert, glue_dir, tmp_path):
    """With dropout on, two processes stopped after step 2 and resumed on two take the uninterrupted run's steps:
    each process's own RNG state is in the checkpoint."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, resumed):
        folder.mkdir()
    for folder, stop_at in ((whole, 0), (resumed, 3), (resumed, 0)):
        mp.spawn(interrupted, args=(2, free_port(), str(tiny_bert), str(glue_dir), str(folder), stop_at, "ddp", 0.1),
                 nprocs=2)
    one, again = (torch.load(f / "weights.pt") for f in (whole, resumed))
    assert again["steps"] == [3, 4, 5, 6]
    for name, weight in one["weights"].items():
        torch.testing.assert_close(again["weights"][name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_a_sharded_optimizer_state_saves_and_loads_no_state_a_parameter_never_had(tmp_path):
    """torch fills every parameter's AdamW state with a dummy step before loading a full optimizer state; a layer
    that never had a gradient must come back without state, as in the run that saved it."""
    import torch.distributed as dist

    from exitrl.backbones.recipes.base import Progress, Stage
    from exitrl.backbones.sharded import ShardedStage

    class Layered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
            self.head = torch.nn.Linear(4, 2)

    def first_layer_only(model, batch, labels, where):
        return model.head(model.layers[0](batch["x"])).square().mean()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Layered()
        stage = Stage("s", 1, [{"params": list(model.parameters()), "lr": 0.1}], first_layer_only)
        saving = ShardedStage(model, stage, torch.device("cpu"), 1)
        optimizer = torch.optim.AdamW(saving.groups)
        saving.loss({"x": torch.randn(3, 4)}, torch.zeros(3), Progress(0, 1)).backward()
        optimizer.step()
        state = saving.optimizer_state(optimizer)
        had = sorted(saving.order[i] for i in state["state"])
        assert had == ["model.head.bias", "model.head.weight", "model.layers.0.bias", "model.layers.0.weight"]
        loading = ShardedStage(model, stage, torch.device("cpu"), 1)
        fresh = torch.optim.AdamW(loading.groups)
        loading.load_optimizer_state(fresh, state)
        assert sorted(n for n, p in zip(loading.order, loading.trained, strict=True) if p in fresh.state) == had
        for i, saved in state["state"].items():
            loaded = fresh.state[loading.trained[i]]
            torch.testing.assert_close(loaded["exp_avg"].full_tensor(), saved["exp_avg"])
    finally:
        dist.destroy_process_group()


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


def test_torchrun_cotraining_killed_after_a_round_resumes_everywhere(tiny_bert, glue_dir, tmp_path):
    """Co-training under torchrun with FSDP2, killed once process 0 saved a round, then resumed under torchrun:
    every process reads process 0's checkpoints, so all resume at the same round (a process starting over would
    wait forever on collectives the others never make)."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    overrides = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                 "data.limit.train=64", "data.limit.dev=24", "backbone.finetune.epochs=1",
                 "backbone.finetune.batch_size=8", "agent=reinforce", "agent.epochs=2", "agent.batch_size=8",
                 "backbone.mode=cotrain", "cotrain.rounds=3", "cotrain.lr=1e-3", "cotrain.head_lr=1e-3",
                 "distributed.sharding=fsdp", "device=cpu", "threads=1", f"hydra.run.dir={run}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "exitrl.train"]
    first = subprocess.Popen([*torchrun, *overrides], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = run / "checkpoint_cotrain_rounds.pt"
    deadline = time.time() + 300
    while not saved.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun takes its workers down with it
    first.wait(timeout=60)
    assert saved.is_file() and not (run / "metrics.json").exists()  # killed after a round, before the end
    resumed = subprocess.run([*torchrun, f"resume={run}"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint {saved}" in resumed.stdout + resumed.stderr  # the rounds, not a restart
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone_mode"] == "cotrain" and metrics["environment"]["processes"] == 2
    assert metrics["environment"]["sharding"] == "fsdp"
    assert [r["round"] for r in metrics["cotrain"]["rounds"]] == [0, 1, 2, 3]
    assert (run / "backbone" / "exitrl_backbone.json").is_file() and not list(run.glob("checkpoint_*.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


def test_torchrun_continues_an_lm_sharded_and_one_process_reuses_it(glue_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    overrides = ["env=lm_text", "backbone=tiny_llama", "env.lm_text.length=16",
                 "env.lm_text.max_chunks={train: 24, dev: 12, policy: 16}", "backbone.finetune.epochs=1",
                 "data.policy_split=0.3", "seed=1", f"data.dir={glue_dir}", "backbone.continue_training=true",
                 "backbone.finetune.objective=layerskip", "agent=confidence", "device=cpu", "threads=1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "exitrl.train", *overrides, "distributed.sharding=fsdp",
                          f"hydra.run.dir={tmp_path / 'two'}"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    first, again = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one"))
    assert first["environment"]["processes"] == 2 and again["environment"]["processes"] == 1
    assert first["backbone"]["path"] == again["backbone"]["path"]  # the continued LM, written once, reused
    assert len(list((tmp_path / "cache" / "lm_backbones").iterdir())) == 1
    assert again["trace_key"] == first["trace_key"] and again["results"] == first["results"]
