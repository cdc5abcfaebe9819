"""The Python API gives the CLI's numbers, reaches the Gymnasium env in one call, and every CLI answers --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env
from test_cli import run_cli

import exitrl
from exitrl.evaluation.evaluate import evaluate_policy


def tiny_options(tiny_bert, glue_dir) -> dict:
    return {"backbone": {"name": str(tiny_bert), "package": None, "pooling": "cls", "finetune": {"epochs": 1}},
            "data": {"dir": str(glue_dir), "limit": {"train": 64, "dev": 32}, "policy_split": 0.25}}


def test_the_api_gives_the_cli_numbers(tiny_bert, glue_dir, tmp_path, monkeypatch):
    cli = run_cli(tmp_path, "agent=reinforce", "agent.epochs=2", "agent.batch_size=8", "reward.alpha=0.02",
                  f"backbone.name={tiny_bert}", "backbone.package=null", "backbone.pooling=cls", "env=rte",
                  f"data.dir={glue_dir}", "data.limit.train=64", "data.limit.dev=32", "data.policy_split=0.25",
                  "backbone.finetune.epochs=1", run_name="cli")
    assert cli.returncode == 0, cli.stderr[-3000:]
    monkeypatch.setenv("EXITRL_CACHE_DIR", str(tmp_path / "cache"))
    run = exitrl.train(agent="reinforce", env="rte", run_dir=tmp_path / "api",
                       agent_options={"epochs": 2, "batch_size": 8},
                       reward={"alpha": 0.02}, **tiny_options(tiny_bert, glue_dir))
    from_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert run.metrics["results"] == from_cli["results"] and run.metrics["trace_key"] == from_cli["trace_key"]
    assert run.metrics["backbone"]["cached"] is True  # the API reused the backbone the CLI fine-tuned
    assert (tmp_path / "api" / "config.yaml").read_text() == (tmp_path / "cli" / "config.yaml").read_text()
    assert "reinforce" in (tmp_path / "api" / "train.log").read_text()
    assert (tmp_path / "cli" / "train.log").read_text().rstrip().endswith(f"run folder: {tmp_path / 'cli'}")

    trace = exitrl.load_trace(run.dir)
    assert evaluate_policy(run.policy, trace["dev"]) == run.results["reinforce"]
    copy = run.save(tmp_path / "copy")
    assert copy.metrics["results"] == run.metrics["results"]
    with pytest.raises(ValueError, match="not an exitrl run folder"):
        exitrl.Run.load(tmp_path)

    env = exitrl.make_env("rte", split="held_out", reward={"alpha": 0.1}, **tiny_options(tiny_bert, glue_dir))
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and env.unwrapped.reward.kwargs["alpha"] == 0.1
    with pytest.raises(ValueError, match="exitrl.make_env"):
        gym.make(exitrl.ENV_ID)
    with pytest.raises(ValueError, match="valid: train, dev, held_out"):
        exitrl.make_env("rte", split="test")

    folder = exitrl.sweep(["static"], "rte", hydra={"run": {"dir": str(tmp_path / "sweep")}},
                          **tiny_options(tiny_bert, glue_dir))
    assert folder == tmp_path / "sweep" and len(list(folder.rglob("metrics.json"))) == 3  # layers 1..3
    assert set(exitrl.compare(folder)["rte"]["families"]) == {"static"}


@pytest.mark.parametrize("command", [["exitrl.train"], ["exitrl.train", "agent=confidence"], ["exitrl.sweep"],
                                     ["exitrl.sweep", "agent=reinforce,static"], ["exitrl.compare"],
                                     ["exitrl.export"]])
def test_every_cli_answers_help(command):
    out = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")
    if command[0] in ("exitrl.train", "exitrl.sweep"):
        for text in ("agent:", "env:", "backbone:", "reward:", "agent.threshold=0.9", "learn_on:", "data:"):
            assert text in out.stdout.replace("confidence.threshold=0.9", "agent.threshold=0.9"), text
    if command[0] == "exitrl.sweep":
        assert "reinforce.epochs=30" in out.stdout and "sweep.grids" in out.stdout and "held_out:" in out.stdout
    if command[0] == "exitrl.train":
        assert "sweep:" not in out.stdout and "hydra:" not in out.stdout
