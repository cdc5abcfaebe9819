"""`python -m exitrl.train env=lm_text backbone=tiny_llama agent=...`: every agent and rule trains and is evaluated
on token episodes of a tiny random Llama through the CLI; the LM and its token trace are cached by content."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cli import run_cli

SMALL = ["env=lm_text", "backbone=tiny_llama", "env.lm_text.length=16",
         "env.lm_text.max_chunks={train: 24, dev: 12, policy: 16}", "backbone.finetune.epochs=1",
         "data.policy_split=0.3", "seed=1"]
LEARNED = {
    "reinforce": ["agent.epochs=2", "agent.batch_size=16"],
    "ppo": ["agent.total_timesteps=1024", "agent.n_envs=2", "agent.n_steps=128", "agent.batch_size=64",
            "agent.eval_every=512"],
    "ppo_torchrl": ["agent.total_frames=2048", "agent.num_envs=64", "agent.frames_per_batch=1024",
                    "agent.minibatch_size=512"],
    "bandit_ucb": ["agent.rounds=2000"],  # Thompson sampling shares its trainer (tests/test_bandits.py)
    "linucb": ["agent.rounds=2000"],
    "exit_scorer": ["agent.steps=30"],
    "oracle": [],  # analysis only: reads dev answers
}
RULES = "[confidence,static,patience,calm,free,confidence_per_layer,lte]"


def test_every_agent_and_rule_runs_on_token_episodes_through_the_cli(glue_dir, tmp_path):
    first = None
    for agent, options in LEARNED.items():
        if agent == "ppo_torchrl":
            pytest.importorskip("torchrl")
        baselines = [f"baselines={RULES}"] if first is None else []
        out = run_cli(tmp_path, f"agent={agent}", *options, *SMALL, f"data.dir={glue_dir}", "reward=consistency",
                      *baselines, run_name=agent)
        assert out.returncode == 0, out.stderr[-3000:]
        metrics = json.loads((tmp_path / agent / "metrics.json").read_text())
        assert metrics["task"] == "lm_text" and metrics["num_layers"] == 4
        results = metrics["results"]
        assert agent in results and 1.0 <= results[agent]["avg_exit_layer"] <= 4.0
        assert "disagreement" in results[agent] and metrics["policy_trained_on"] == "policy"
        if first is None:
            first = metrics
            assert set(RULES.strip("[]").split(",")) <= set(results)
            assert metrics["backbone"]["continued"]["steps"] == 3  # 24 chunks, batches of 8, one epoch
        else:  # the continued LM and its token trace come from the cache
            assert metrics["trace_key"] == first["trace_key"] and "continued" not in metrics["backbone"]
    assert metrics["dev_per_layer"] == first["dev_per_layer"]
    # the trained REINFORCE policy decodes new text per token, with the run's own (continued) backbone
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the good film"}\n{"prompt": "she said it was"}\n')
    done = subprocess.run([sys.executable, "-m", "exitrl.generate", str(tmp_path / "reinforce"), "--method", "policy",
                           "--input", str(prompts), "--max-new-tokens", "6", "--output", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(1 <= len(r["tokens"]) <= 6 for r in rows)
    assert 1 <= json.loads(done.stderr.strip().splitlines()[-1])["mean_exit_layer"] <= 4


def test_lm_runs_refuse_mismatched_env_and_backbone_before_any_work(glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=confidence", "backbone=tiny_llama", "env=rte", f"data.dir={glue_dir}")
    assert out.returncode == 2 and "use env=lm_text" in out.stderr and "Traceback" not in out.stderr
    out = run_cli(tmp_path, "agent=confidence", "env=lm_text", f"data.dir={glue_dir}")
    assert out.returncode == 2 and "backbone=smollm2 or backbone=tiny_llama" in out.stderr
    out = run_cli(tmp_path, "agent=confidence", *SMALL, "env.lm_text.sources=[web]", f"data.dir={glue_dir}")
    assert out.returncode == 2 and "env.lm_text.sources" in out.stderr and "glue, python, files" in out.stderr
    out = run_cli(tmp_path, "agent=reinforce", *SMALL, "backbone.mode=cotrain", f"data.dir={glue_dir}")
    assert out.returncode == 2 and "continue_training" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))
