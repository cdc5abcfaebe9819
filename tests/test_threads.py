"""Threads chosen for the work (`exitrl.core.threads`): ``auto`` runs the backbone's phases on every core torch
found at start and the policy's on one; an explicit count wins everywhere; bad values name the key; a busy machine
gets one warning per process."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import exitrl
from exitrl.core import threads
from exitrl.core.threads import busy_warning, check_threads, phase_threads, threads_for

CORES = 4  # the count torch found at start, as on a 4-core machine (the suite itself starts on OMP_NUM_THREADS=1)


@pytest.fixture(autouse=True)
def four_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "STARTUP_THREADS", CORES)
    yield
    torch.set_num_threads(before)


def test_each_phase_runs_on_its_count_and_the_previous_count_returns():
    torch.set_num_threads(3)
    with threads_for("backbone", "auto") as count:
        assert count == torch.get_num_threads() == CORES
        with threads_for("policy", "auto"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == CORES
    assert torch.get_num_threads() == 3
    for phase in ("backbone", "policy"):
        with threads_for(phase, 2):  # an explicit count is that count in every phase
            assert torch.get_num_threads() == 2
        with threads_for(phase, None):  # null: torch's count as it is
            assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError), threads_for("policy", "auto"):
        raise RuntimeError("the count is restored on the way out of an error too")
    assert torch.get_num_threads() == 3


def test_bad_values_are_refused_naming_the_key():
    assert check_threads("2") == 2 and check_threads("auto") == "auto" and check_threads(None) is None
    for bad in (0, -1, 1.5, True, "two", "", [2]):
        with pytest.raises(ValueError, match=r"^threads must be a whole number >= 1, auto"):
            check_threads(bad)
    with pytest.raises(ValueError, match="Unknown thread phase 'decoding'"):
        phase_threads("auto", "decoding")
    from exitrl.cli import compose_config
    from exitrl.train import plan

    for bad in ("threads=0", "threads=many", "threads=1.5"):
        cfg = compose_config(["env=rte", bad])
        cfg.pop("run_dir")
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            plan(cfg)
    from exitrl.export import main

    with pytest.raises(SystemExit) as exit_status:
        main(["some_run", "--threads", "0"])
    assert exit_status.value.code == 2


def test_a_busy_machine_gets_one_warning(monkeypatch):
    monkeypatch.setattr(threads, "_warned", [])
    quiet = io.StringIO()
    assert busy_warning("auto", load=lambda: 1.2, cores=2, stream=quiet) is None  # not busier than its cores
    assert busy_warning(1, load=lambda: 9.0, cores=2, stream=quiet) is None  # one thread already
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    line = busy_warning("auto", load=lambda: 3.5, cores=2, stream=shown)
    assert shown.getvalue() == line + "\n" and len(shown.getvalue().splitlines()) == 1
    assert "load 3.5 on 2 cores" in line and "threads=1 (--threads 1)" in line
    assert busy_warning(4, load=lambda: 7.0, cores=2, stream=shown) is None  # once per process
    assert len(shown.getvalue().splitlines()) == 1


def test_a_run_gives_each_phase_its_count_and_records_them(tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Through the Python API (the CLI's pipeline): fine-tuning and tracing (`prepare`) on all cores, the agent's
    fit and the evaluation on one thread under ``auto``; ``threads=3`` everywhere; the record says so."""
    train_module = sys.modules["exitrl.train"] if "exitrl.train" in sys.modules else exitrl.train
    seen = {}

    def spy(name, function):
        def call(*args, **kwargs):
            seen.setdefault(name, []).append(torch.get_num_threads())
            return function(*args, **kwargs)
        monkeypatch.setattr(train_module, name, call)

    spy("prepare", train_module.prepare)
    spy("record_run", train_module.record_run)
    options = {"backbone": {"name": str(tiny_bert), "package": None, "finetune": {"epochs": 1, "batch_size": 16}},
               "data": {"dir": str(glue_dir), "limit": {"train": 32, "dev": 16}}, "plugins": ["threads_agent"],
               "cache_dir": str(tmp_path / "cache"), "baselines": []}
    for setting, backbone, policy in (("auto", CORES, 1), (3, 3, 3)):
        seen.clear()
        torch.set_num_threads(2)
        run = exitrl.train("threads_probe", "rte", run_dir=tmp_path / f"run_{setting}", threads=setting, **options)
        assert seen == {"prepare": [backbone], "record_run": [policy]}
        assert run.metrics["agent_info"]["threads"] == policy
        recorded = json.loads((run.dir / "metrics.json").read_text())["environment"]["threads"]
        assert recorded == (backbone if backbone == policy else {"backbone": backbone, "policy": policy})
        assert torch.get_num_threads() == (2 if setting == "auto" else 3)  # a number is the whole run's
