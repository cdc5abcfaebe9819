"""Every learner, token tracing and decoding report progress through `exitrl.core.progress`: with output going to a
file, log lines that end at the work's total; ``TQDM_DISABLE=1`` silences them. And a train run whose output goes to
a file writes the learner's lines into it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import synthetic_trace
from test_cli import TESTS

from exitrl.experiments.pipeline import AgentRun
from exitrl.traces.trace import Trace

LEARNERS = [  # agent, options, the bar's name, its total
    ("reinforce", {"epochs": 2, "batch_size": 50}, "reinforce", "8/8 update"),
    ("ppo", {"total_timesteps": 512, "n_envs": 2, "n_steps": 128, "batch_size": 128, "eval_every": 256}, "ppo",
     "512/512 step"),
    ("ppo_torchrl", {"total_frames": 1024, "num_envs": 64, "frames_per_batch": 512, "minibatch_size": 256},
     "ppo_torchrl", "1024/1024 frame"),
    ("bandit_ucb", {"rounds": 300}, "bandit_ucb", "300/300 round"),
    ("bandit_thompson", {"rounds": 300}, "bandit_thompson", "300/300 round"),
    ("linucb", {"rounds": 640}, "linucb", "640/640 example"),
    ("exit_scorer", {"steps": 20, "folds": 2}, "exit_scorer", "40/40 step"),
    ("stopping", {"steps": 20, "folds": 2}, "stopping", "8/8 fit"),
    ("calm", {"measure": "meta", "threshold": 0.5, "meta_epochs": 2, "meta_batch_size": 256},
     "calm meta classifier", "6/6 batch"),
    ("lte", {"epochs": 2, "batch_size": 256}, "lte", "8/8 batch"),
]


@pytest.fixture(scope="module")
def trace() -> Trace:
    return Trace({"train": synthetic_trace(n=200, seed=0)[0], "dev": synthetic_trace(n=100, seed=1)[0]})


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "exitrl.core.progress"]


@pytest.mark.parametrize("agent, options, name, total", LEARNERS, ids=[a for a, *_ in LEARNERS])
def test_learners_log_progress_to_the_end(trace, agent, options, name, total, monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("EXITRL_PROGRESS_SECONDS", "0")  # a line per update: every loop shows
    with caplog.at_level(logging.INFO, logger="exitrl.core.progress"):
        AgentRun.create(agent, dict(options), reward="vanilla").fit(trace, torch.device("cpu"))
    lines = [line for line in progress_lines(caplog) if line.startswith(f"{name}: ")]
    assert len(lines) >= 2, progress_lines(caplog)  # progress on the way, not only at the end
    assert lines[-1].startswith(f"{name}: {total} in "), lines[-1]


@pytest.mark.parametrize("agent, options", [(a, o) for a, o, *_ in LEARNERS if a in ("reinforce", "linucb", "lte")])
def test_tqdm_disable_silences_the_learners(trace, agent, options, monkeypatch, caplog):
    monkeypatch.setenv("EXITRL_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with caplog.at_level(logging.INFO, logger="exitrl.core.progress"):
        AgentRun.create(agent, dict(options), reward="vanilla").fit(trace, torch.device("cpu"))
    assert progress_lines(caplog) == []


def test_token_tracing_and_decoding_log_progress(tiny_llama, monkeypatch, caplog):
    from exitrl.backbones.loading import load_multi_exit_lm
    from exitrl.decoding import calm_decoding, free_decoding, greedy, self_speculative
    from exitrl.traces.tokens import build_token_split

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("EXITRL_PROGRESS_SECONDS", "0")
    model, _ = load_multi_exit_lm(str(tiny_llama), None)
    chunks = [{"input_ids": [5 + (i * 7 + j) % 40 for j in range(12)]} for i in range(6)]
    with caplog.at_level(logging.INFO, logger="exitrl.core.progress"):
        build_token_split(model, chunks, batch_size=2)
    assert progress_lines(caplog)[-1].startswith("token trace: 3/3 batch in ")

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    for method, options in ((greedy, {}), (calm_decoding, {"threshold": 0.5}), (free_decoding, {"shallow_layer": 1}),
                            (self_speculative, {"exit_layer": 1, "draft_tokens": 2})):
        told = []
        generation = method(model, ids, max_new_tokens=6, on_tokens=told.append, **options)
        assert sum(told) == generation.tokens.shape[1] == 6, (method.__name__, told)  # no end of sequence here


def test_a_train_run_writes_progress_lines_into_its_output_file(tiny_bert, glue_dir, tmp_path):
    def train(name: str, **env) -> str:
        log = tmp_path / f"{name}.log"
        variables = {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "HF_HUB_OFFLINE": "1",
                     "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                     "EXITRL_CACHE_DIR": str(tmp_path / "cache"), **env}
        with log.open("w") as out:  # stdout and stderr into a file, as a scheduler or `> log 2>&1` would
            subprocess.run([sys.executable, "-m", "exitrl.train", "agent=reinforce", "agent.epochs=3",
                            "agent.batch_size=8", f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte",
                            f"data.dir={glue_dir}", "data.limit.train=64", "data.limit.dev=16",
                            "backbone.finetune.epochs=1", f"hydra.run.dir={tmp_path / name}"],
                           env=variables, stdout=out, stderr=subprocess.STDOUT, timeout=600, check=True)
        return log.read_text()

    text = train("lines", EXITRL_PROGRESS_SECONDS="0")
    assert "\r" not in text  # no bar redrawn in a file
    lines = re.findall(r"reinforce: (\d+)/24 update in", text)  # 64 rows, 8 a batch, 3 epochs
    assert len(lines) >= 3 and lines[-1] == "24", text[-2000:]
    assert "dev=" in text.split("reinforce: 24/24 update in")[-1].splitlines()[0]
    quiet = train("quiet", EXITRL_PROGRESS_SECONDS="0", TQDM_DISABLE="1")
    assert not re.search(r"reinforce: \d+/\d+", quiet) and "update in" not in quiet
