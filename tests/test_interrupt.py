"""Ctrl-C ends a run with one line, status 130 and no traceback, and ``exitrl train resume=<dir>`` finishes it with
the numbers of an uninterrupted run; a run that fails leaves no half-written folder behind (issue 28)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import TESTS, run_cli
from test_resume import common, numbers

from exitrl.cli import discard_failed_run, folder_entries
from exitrl.core.checkpoint import Checkpoints, load_checked, save_on_interrupt

ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}


def test_ctrl_c_ends_with_one_line_and_the_run_resumes_to_the_same_numbers(tiny_bert, glue_dir, tmp_path):
    """Ctrl-C in the middle of policy training, with no periodic checkpoint due for an hour: the loop saves the step
    it is in, the run stops with one line, and resuming gives an uninterrupted run's numbers (nothing lost)."""
    overrides = [o for o in common(tiny_bert, glue_dir) if not o.startswith("checkpoint.")]
    overrides += ["agent.epochs=200", "checkpoint.every_seconds=3600"]
    reference = run_cli(tmp_path / "reference", *overrides)  # python -m exitrl.train, never interrupted
    assert reference.returncode == 0, reference.stderr[-3000:]

    # the reference's cache: its fine-tuned backbone and trace, so this run goes straight to policy training
    env = {**ENV, "EXITRL_CACHE_DIR": str(tmp_path / "reference" / "cache"), "EXITRL_PROGRESS_SECONDS": "0.2"}
    run = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "exitrl", "train", *overrides, f"hydra.run.dir={run}"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600

    def training_policy() -> bool:  # REINFORCE's progress lines have reached the run's log
        return (run / "train.log").is_file() and "reinforce:" in (run / "train.log").read_text()

    while not training_policy() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before Ctrl-C: " + process.stderr.read()[-2000:]
    assert not (run / "checkpoint_agent.pt").exists()
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-3000:]
    line = f"exitrl: interrupted; resume with `exitrl train resume={run}`"
    assert stderr.rstrip().splitlines()[-1] == line and stderr.count("interrupted") == 1
    assert "exitrl: saving a checkpoint at the end of this step, then stopping" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert (run / "checkpoint_agent.pt").is_file() and not (run / "metrics.json").exists()  # saved by the Ctrl-C
    assert line.removeprefix("exitrl: ") in (run / "train.log").read_text()

    resumed = subprocess.run([sys.executable, "-m", "exitrl", "train", f"resume={run}"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint" in (run / "train.log").read_text()
    assert numbers(run) == numbers(tmp_path / "reference" / "run")
    assert not list(run.glob("checkpoint_*.pt"))


def test_ctrl_c_waits_for_a_checkpointing_loop_only(tmp_path):
    """In-process: while a loop asks `due`, the first Ctrl-C makes the next save happen and end in
    KeyboardInterrupt; with no loop checkpointing, or on a second Ctrl-C, it stops at once."""
    checkpoints = Checkpoints(tmp_path / "state.pt", every_seconds=3600)
    before = signal.getsignal(signal.SIGINT)
    with save_on_interrupt():
        with pytest.raises(KeyboardInterrupt):  # nothing polled yet: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert not checkpoints.due()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert checkpoints.due()  # the step in progress ends with a save ...
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save({"step": 7})  # ... then stops
        assert load_checked(tmp_path / "state.pt")["step"] == 7
        checkpoints.due()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_failed_run_leaves_no_folder(tiny_bert, glue_dir, tmp_path):
    """The reward fails after the folder, its config, log and TensorBoard files were written: all of it goes, the
    cache keeps the fine-tuned backbone and the trace; compare finds nothing to compare."""
    out = run_cli(tmp_path, f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                  "data.limit.train=32", "data.limit.dev=16", "backbone.finetune.epochs=1", "reward=custom",
                  "reward.fn=example_rewards:broken_nan", run_name="runs/nan")
    assert out.returncode == 2 and "non-finite" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "nan").exists()
    assert list((tmp_path / "cache" / "traces").glob("*.pt"))
    late = run_cli(tmp_path, "agent=static", "agent.layer=9", f"backbone.name={tiny_bert}", "backbone.package=null",
                   "env=rte", f"data.dir={glue_dir}", "data.limit.train=32", "data.limit.dev=16",
                   "backbone.finetune.epochs=1", run_name="runs/layer")  # the depth is known only once loaded
    assert late.returncode == 2 and "agent.layer=9 is not a layer of this backbone" in late.stderr
    assert not (tmp_path / "runs" / "layer").exists()
    (tmp_path / "runs" / "ok").mkdir(parents=True)
    compared = subprocess.run([sys.executable, "-m", "exitrl", "compare", str(tmp_path / "runs")], env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert compared.returncode == 2 and "metrics.json" in compared.stderr, compared.stderr[-2000:]


def test_what_a_failed_run_removes(tmp_path):
    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)
    kept = folder_entries(fresh)
    (fresh / "train.log").write_text("log")
    (fresh / "tensorboard").mkdir()
    (fresh / "tensorboard" / "events").write_text("x")
    (fresh / "config.yaml").write_text("a: 1")
    assert discard_failed_run(fresh, kept) and not fresh.exists()

    reused = tmp_path / "reused"  # a folder the user named, holding their own file: only the run's files go
    reused.mkdir()
    (reused / "notes.txt").write_text("mine")
    kept = folder_entries(reused)
    (reused / ".hydra").mkdir()
    (reused / "config.yaml").write_text("a: 1")
    assert not discard_failed_run(reused, kept)
    assert sorted(p.name for p in reused.iterdir()) == ["notes.txt"]

    resumable = tmp_path / "resumable"  # a checkpoint to resume from: the folder stays whole
    resumable.mkdir()
    (resumable / "checkpoint_agent.pt").write_bytes(b"state")
    (resumable / "config.yaml").write_text("a: 1")
    assert not discard_failed_run(resumable, set())
    assert sorted(p.name for p in resumable.iterdir()) == ["checkpoint_agent.pt", "config.yaml"]
    assert not discard_failed_run(tmp_path / "never_made", set())


def test_a_sweep_point_that_fails_leaves_no_folder(tiny_bert, glue_dir, tmp_path):
    env = {**ENV, "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "exitrl", "sweep", "agent=reinforce", f"backbone.name={tiny_bert}",
                          "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=32",
                          "data.limit.dev=16", "backbone.finetune.epochs=1", "reward=custom",
                          "reward.fn=nan_reward:nan_with_alpha", "sweep.grids.reinforce=[0.1]",
                          f"hydra.run.dir={tmp_path / 'sweep'}"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2 and "non-finite" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert list((tmp_path / "sweep").iterdir()) == []  # the point's folder (written before the fit) and its family's


def test_ctrl_c_in_an_argparse_cli(tiny_llama, tmp_path):
    """generate (like predict, compare and export) ends with one line and status 130; the lines decoded before
    Ctrl-C are in --output."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the film was good {i}"}) + "\n" for i in range(3000)))
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "exitrl", "generate", str(tiny_llama), "--input", str(prompts),
                                "--batch-size", "1", "--max-new-tokens", "24", "--output", str(output)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (output.is_file() and output.stat().st_size) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "generate ended before Ctrl-C: " + process.stderr.read()[-2000:]
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == "exitrl: interrupted; the lines decoded so far are written"
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert 0 < len(rows) < 3000 and rows[0]["prompt"] == "the film was good 0"
