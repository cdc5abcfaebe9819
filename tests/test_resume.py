"""A train run killed with SIGKILL at a random point (in fine-tuning, and in policy training) and resumed with
``resume=RUN_DIR`` ends with exactly the numbers of an uninterrupted run; checked files catch corruption."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import TESTS, run_cli

from exitrl.core.checkpoint import Checkpoints, CorruptFile, load_checked, save_checked
from exitrl.core.hashing import hash_state_dict


def common(tiny_bert, glue_dir) -> list[str]:
    return [f"backbone.name={tiny_bert}", "backbone.package=null", "backbone.pooling=cls", "env=rte",
            f"data.dir={glue_dir}", "data.limit.train=192", "data.limit.dev=48", "backbone.finetune.epochs=2",
            "backbone.finetune.batch_size=8", "agent=reinforce", "agent.epochs=80", "agent.batch_size=8",
            "data.policy_split=0.25", "checkpoint.every_seconds=0", "seed=3", "threads=1"]


def numbers(run: Path) -> dict:
    """What must not depend on an interruption: every score, the backbone's weights (the trace key hashes them) and
    its learning curve, the policy's learning curve and its weights, bit for bit."""
    from exitrl.policy import load_policy

    metrics = json.loads((run / "metrics.json").read_text())
    finetuned = json.loads((Path(metrics["backbone"]["path"]) / "finetune.json").read_text())
    policy = load_policy(run / "policy.pt")
    return {"results": metrics["results"], "validation": metrics["validation_results"],
            "dev_per_layer": metrics["dev_per_layer"], "oracle": metrics["oracle"], "trace_key": metrics["trace_key"],
            "history": metrics["agent_info"]["history"], "updates": metrics["agent_info"]["updates"],
            "backbone_history": finetuned["dev_accuracy_per_epoch"],
            "policy": hash_state_dict(policy.module),
            "cotrain_rounds": [{k: v for k, v in r.items() if k != "seconds"}
                               for r in (metrics.get("cotrain") or {}).get("rounds", [])]}


def kill_when(tmp_path: Path, overrides: list[str], marker, run_name: str, delay=(0.0, 0.2)) -> Path:
    """Start the run, wait until ``marker()`` finds a checkpoint, SIGKILL it at a random moment ``delay`` s after."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / run_name
    process = subprocess.Popen([sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={run}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    time.sleep(random.uniform(*delay))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "metrics.json").exists()
    return run


def resume(tmp_path: Path, run: Path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "exitrl.train", f"resume={run}"], env=env, capture_output=True,
                          text=True, timeout=600)


PPO = ["agent=ppo", "agent.total_timesteps=16384", "agent.n_envs=4", "agent.n_steps=128", "agent.batch_size=128",
       "agent.eval_every=2048"]


COTRAIN = ["agent.epochs=15", "backbone.mode=cotrain", "cotrain.rounds=2", "cotrain.lr=1e-3", "cotrain.head_lr=1e-3"]


@pytest.mark.xdist_group("reference_numbers")
@pytest.mark.parametrize("stage", ["fine-tuning", "policy training", "ppo training", "co-training"])
def test_a_killed_run_resumes_to_the_same_numbers(tiny_bert, glue_dir, tmp_path, stage, reference_numbers):
    overrides = common(tiny_bert, glue_dir)
    if stage == "ppo training":
        overrides = [o for o in overrides if not o.startswith("agent")] + PPO
    if stage == "co-training":
        overrides = [o for o in overrides if not o.startswith("agent.epochs")] + COTRAIN
    expected = reference_numbers(overrides)

    interrupted = tmp_path / "interrupted"
    if stage == "fine-tuning":
        def marker():
            return any((interrupted / "cache" / "backbones").glob("*.checkpoint"))
    elif stage == "co-training":  # killed in the second round: its backbone's or its policy's training
        def marker():
            return any((interrupted / "run").glob("checkpoint_cotrain_*_round2.pt"))
    else:
        def marker():
            return (interrupted / "run" / "checkpoint_agent.pt").is_file()
    delay = (0.5, 1.5) if stage == "ppo training" else (0.0, 0.2)
    run = kill_when(interrupted, overrides, marker, "run", delay)
    if stage == "ppo training":  # it resumes from a later rollout than the first, whose state a fresh start has too
        assert load_checked(run / "checkpoint_agent.pt")["sb3"]["num_timesteps"] > 0
    resumed = resume(interrupted, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    resumed_from = {"fine-tuning": ".checkpoint", "co-training": "checkpoint_cotrain_"}.get(stage,
                                                                                            "checkpoint_agent.pt")
    assert f"Resuming from the checkpoint {interrupted}" in log and resumed_from in log.split("Resuming from", 1)[1]
    assert numbers(run) == expected
    assert not list(run.glob("checkpoint_*.pt"))
    assert not list((interrupted / "cache" / "backbones").glob("*.checkpoint"))


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    from exitrl.train import resume_arguments

    with pytest.raises(ValueError, match="no .hydra/overrides.yaml"):
        resume_arguments([f"resume={tmp_path}"])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- agent=reinforce\n- env=rte\n- resume=/old\n")
    assert resume_arguments([f"resume={tmp_path}"]) == ["agent=reinforce", "env=rte", f"hydra.run.dir={tmp_path}",
                                                        f"resume={tmp_path}"]
    with pytest.raises(ValueError, match="drop the other overrides"):
        resume_arguments([f"resume={tmp_path}", "agent.epochs=3"])
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="already finished"):
        resume_arguments([f"resume={tmp_path}"])


def test_checked_files_catch_truncation_and_tampering(tmp_path, caplog):
    path = save_checked({"weights": torch.arange(1000.0)}, tmp_path / "state.pt")
    assert torch.equal(load_checked(path)["weights"], torch.arange(1000.0))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CorruptFile, match="checksum"):
        load_checked(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptFile, match="checksum"):
        load_checked(path)
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(CorruptFile, match="not a checked"):
        load_checked(path)
    checkpoints = Checkpoints(path)  # a corrupt checkpoint is reported and ignored: the work starts over
    assert checkpoints.load() is None and "starting this work from the beginning" in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    with pytest.raises(ValueError, match="every_seconds"):
        Checkpoints(path, -1)


def test_corrupt_cache_entries_are_rebuilt_never_used(tiny_bert, glue_dir, tmp_path):
    """A truncated trace and an altered backbone file in the cache are detected, set aside or rebuilt with a
    warning, and the run's numbers equal a clean run's."""
    overrides = [*common(tiny_bert, glue_dir), "agent.epochs=2"]
    clean = run_cli(tmp_path, *overrides, run_name="clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    cache = tmp_path / "cache"
    trace = next((cache / "traces").glob("*.pt"))
    trace.write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    heads = next((cache / "backbones").glob("*/heads.pt"))
    data = bytearray(heads.read_bytes())
    data[-1] ^= 1
    heads.write_bytes(bytes(data))
    again = run_cli(tmp_path, *overrides, run_name="again")
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "again" / "train.log").read_text()
    assert "does not match its checksum" in log and "fine-tuning again" in log and "rebuilding it" in log
    assert list((cache / "backbones").glob("*.corrupt-*"))
    assert numbers(tmp_path / "again") == numbers(tmp_path / "clean")


def test_two_processes_building_one_cache_entry_at_once(tiny_bert, glue_dir, tmp_path):
    """Both runs fine-tune and trace the same entry at the same time; both finish with the same numbers, and the
    cache holds one whole backbone and one whole trace."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    overrides = [*common(tiny_bert, glue_dir), "agent.epochs=2", "checkpoint.every_seconds=300"]
    processes = [subprocess.Popen([sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / n}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in ("a", "b")]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-3000:]
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    from exitrl.core.checkpoint import verify_manifest
    from exitrl.traces.trace import Trace

    backbones = [p for p in (tmp_path / "cache" / "backbones").iterdir() if p.is_dir()]
    assert len(backbones) == 1 and (backbones[0] / "checksums.json").is_file()
    verify_manifest(backbones[0])
    traces = list((tmp_path / "cache" / "traces").glob("*.pt"))
    assert len(traces) == 1 and Trace.load(traces[0]).meta["task"] == "rte"


def test_checkpoints_of_other_work_are_ignored_and_files_are_readable(tmp_path, caplog):
    checkpoints = Checkpoints(tmp_path / "agent.pt", 0, work="reinforce lr=3e-4")
    checkpoints.save({"step": 7})
    assert Checkpoints(tmp_path / "agent.pt", 0, work="reinforce lr=3e-4").load()["step"] == 7
    assert Checkpoints(tmp_path / "agent.pt", 0, work="reinforce lr=1e-2").load() is None
    assert "belongs to other work" in caplog.text
    umask = os.umask(0o022)
    try:
        path = save_checked({"x": 1}, tmp_path / "shared.pt")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # others can read a shared cache


def test_an_unreadable_manifest_is_corruption(tmp_path):
    from exitrl.core.checkpoint import verify_manifest, write_manifest

    (tmp_path / "heads.pt").write_bytes(b"weights")
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "checksums.json").write_text('{"heads.pt": "ab')
    with pytest.raises(CorruptFile, match="cannot be read"):
        verify_manifest(tmp_path)


class Interrupted(Exception):
    """Stands for a kill: raised right after the ``after``-th checkpoint is on disk."""


class KilledAfter(Checkpoints):
    def __init__(self, path, after: int, work: str):
        super().__init__(path, every_seconds=0, work=work)
        self.after = after

    def save(self, state: dict) -> None:
        super().save(state)
        if self.saves == self.after:
            raise Interrupted


INTERRUPTIBLE = {  # agent: (options that keep it short, the save after which it is "killed")
    "ppo_torchrl": ({"total_frames": 4096, "num_envs": 64, "frames_per_batch": 512, "minibatch_size": 256,
                     "n_epochs": 2}, 3),
    "bandit_ucb": ({"rounds": 3000, "log_every": 100}, 7),
    "bandit_thompson": ({"rounds": 3000, "log_every": 100}, 11),
    "linucb": ({"rounds": 3000, "batch_size": 64, "eval_every": 10}, 20),
    "exit_scorer": ({"steps": 30, "folds": 2}, 40),  # in the second part's fit
}


def comparable(fitted) -> dict:
    info = {k: v for k, v in fitted.info.items() if k not in ("train_seconds", "checkpoints")}
    return {"info": info, "policy": hash_state_dict(fitted.policy.module) if hasattr(fitted.policy, "module")
            else fitted.policy.config()}


@pytest.mark.parametrize("agent", sorted(INTERRUPTIBLE))
def test_every_learned_agent_resumes_to_the_same_policy(agent, tmp_path):
    """Each agent that checkpoints, interrupted after a save in the middle of training and run again with the same
    checkpoint file, ends with the policy and record of an uninterrupted run (the RNGs are disturbed in between,
    as a new process would have them)."""
    if agent == "ppo_torchrl":
        pytest.importorskip("torchrl")
    from conftest import synthetic_trace

    from exitrl.experiments.pipeline import AgentRun
    from exitrl.traces.trace import Trace

    learn, _ = synthetic_trace(n=600, num_layers=4, hidden=8, seed=1)
    dev, _ = synthetic_trace(n=100, num_layers=4, hidden=8, seed=2)
    trace = Trace({"train": learn, "dev": dev})
    options, after = INTERRUPTIBLE[agent]
    run = AgentRun.create(agent, options, "hardness", "train", seed=5)
    reference = run.fit(trace, torch.device("cpu"), checkpoints=Checkpoints(tmp_path / "ref.pt", 1e9, work="w"))
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted):
        run.fit(trace, torch.device("cpu"), checkpoints=KilledAfter(path, after, work="w"))
    assert path.is_file()
    torch.manual_seed(12345)  # a new process starts from other RNG states
    random.seed(12345)
    resumed = run.fit(trace, torch.device("cpu"), checkpoints=Checkpoints(path, 1e9, work="w"))
    assert comparable(resumed) == comparable(reference)
    assert resumed.info["checkpoints"]["saves"] == 0
