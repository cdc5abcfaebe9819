"""`python -m exitrl.train` end to end on a tiny random backbone and a slice of RTE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from exitrl.policy import load_policy

TESTS = Path(__file__).parent


def run_cli(tmp_path, *overrides, run_name="run"):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "exitrl.train", *overrides, f"hydra.run.dir={tmp_path / run_name}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_train_reinforce_then_confidence_reuses_backbone(tiny_bert, glue_dir, tmp_path):
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "backbone.pooling=cls", "env=rte",
              f"data.dir={glue_dir}", "data.limit.train=64", "data.limit.dev=32", "backbone.finetune.epochs=1",
              "backbone.finetune.batch_size=32"]
    out = run_cli(tmp_path, "agent=reinforce", "agent.epochs=2", "agent.batch_size=8", "reward.alpha=0.02",
                  "data.policy_split=0.25", *common, run_name="reinforce")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "reinforce"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["results"]) == {"reinforce", "confidence"}
    assert metrics["reward"]["alpha"] == 0.02 and metrics["backbone"]["cached"] is False
    assert metrics["results"]["reinforce"]["num_examples"] == 32 and metrics["policy_trained_on"] == "policy"
    assert len(metrics["dev_per_layer"]) == 3 and "consistency_oracle" in metrics["oracle"]
    assert "reinforce" in out.stdout and "consistency oracle" in out.stdout
    assert "alpha: 0.02" in (run / "config.yaml").read_text()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward", "train/policy_loss", "train/entropy", "eval/accuracy", "eval/avg_exit_layer",
            "eval/speedup"} <= tags
    assert "exit/layer" in events.Tags()["histograms"]
    assert load_policy(run / "policy.pt").name == "reinforce"

    out = run_cli(tmp_path, "agent=confidence", *common, run_name="confidence")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "confidence" / "metrics.json").read_text())
    assert metrics["backbone"]["cached"] is False  # policy_split differs, so the training data (and key) differ
    out = run_cli(tmp_path, "agent=confidence", "data.policy_split=0.25", *common, run_name="confidence2")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "confidence2" / "metrics.json").read_text())
    assert metrics["backbone"]["cached"] is True and set(metrics["results"]) == {"confidence"}


def test_cli_errors_are_clear(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=ppo_nope")
    assert out.returncode == 2 and "Unknown agent 'ppo_nope'" in out.stderr and "reinforce" in out.stderr
    out = run_cli(tmp_path, "env=cola")
    assert out.returncode != 0 and "rte" in out.stderr
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
              "data.limit.train=32", "data.limit.dev=16", "backbone.finetune.epochs=1"]
    out = run_cli(tmp_path, "reward=custom", "reward.fn=example_rewards:broken_nan", *common)
    assert out.returncode == 2 and "non-finite" in out.stderr
    # the fine-tuned backbone and the trace computed before the reward failed are kept
    assert list((tmp_path / "cache" / "backbones").iterdir()) and list((tmp_path / "cache" / "traces").glob("*.pt"))
    out = run_cli(tmp_path, "backbone.name=/no/such/model", "backbone.package=null", "env=rte",
                  f"data.dir={glue_dir}")
    assert out.returncode == 2 and "backbone.name=" in out.stderr


def test_custom_reward_through_the_cli(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
                  "data.limit.train=160", "data.limit.dev=32", "backbone.finetune.epochs=1", "reward=custom",
                  "reward.fn=example_rewards:only_layer_two", "agent.epochs=15", "agent.batch_size=8",
                  "agent.lr=0.003", "agent.features=confidence")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["reward"]["fn"] == "example_rewards:only_layer_two"
    assert metrics["results"]["reinforce"]["exit_histogram"][1] >= 28  # nearly all 32 exit at layer 2


def test_calm_certified_on_the_held_out_split_beside_every_rule(tiny_bert, glue_dir, tmp_path):
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
              "data.limit.train=120", "data.limit.dev=40", "backbone.finetune.epochs=1"]
    out = run_cli(tmp_path, "agent=calm", *common)  # no held-out split: refused before any fine-tuning
    assert out.returncode == 2 and "data.policy_split=0.2" in out.stderr and not (tmp_path / "cache").exists()
    out = run_cli(tmp_path, "agent=calm", "agent.delta=0.2", "data.policy_split=0.5",
                  "baselines=[confidence,patience,static,free,lte]", *common, run_name="calm")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "calm" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"calm", "confidence", "patience", "static", "free", "lte"}
    info = metrics["agent_info"]
    assert info["delta"] == 0.2 and info["calibration_examples"] == 60 and "certified" in info
    assert "calm: delta 0.2" in out.stdout and "dev risk" in out.stdout
    for result in metrics["results"].values():
        assert {"disagreement", "loss_increase", "deployable"} <= set(result)
    assert load_policy(tmp_path / "calm" / "policy.pt").name == "calm"
