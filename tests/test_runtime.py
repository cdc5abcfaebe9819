"""The inference runtime walks the live backbone through the same loop as trace evaluation: for every agent and
rule, its exits and predictions on a split equal `evaluate_policy`'s on that split's trace (CPU, fp32); and
``python -m exitrl.predict`` answers a file end to end."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from test_cli import run_cli
from test_sweep_compare import run_module

from exitrl.agents.static import StaticPolicy
from exitrl.backbones import FinetuneConfig, finetune, load_multi_exit
from exitrl.data import load_task
from exitrl.evaluation.evaluate import run_policy
from exitrl.experiments.pipeline import AgentRun
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.traces.build import build_trace

BUDGETS = {
    "reinforce": {"epochs": 3, "batch_size": 8},
    "ppo": {"total_timesteps": 2048, "n_envs": 4, "n_steps": 128, "batch_size": 256, "eval_every": 100_000},
    "ppo_torchrl": {"total_frames": 8192, "num_envs": 256, "frames_per_batch": 4096, "minibatch_size": 1024},
    "bandit_ucb": {"rounds": 1000}, "bandit_thompson": {"rounds": 1000}, "linucb": {"rounds": 2000},
    "confidence": {"threshold": 0.95}, "static": {"layer": 2}, "patience": {"patience": 1}, "calm": {},
    "free": {"shallow_layer": 1}, "lte": {"threshold": 0.4},
}
VARIANTS = [*BUDGETS.items(), ("confidence", {"threshold": 0.9, "temperature": True}),
            ("calm", {"measure": "saturation", "delta": 0.3}), ("calm", {"measure": "meta", "delta": 0.3}),
            ("reinforce", {"epochs": 3, "batch_size": 8, "features": "state"}),
            ("reinforce", {"epochs": 3, "batch_size": 8, "features": "history"}),
            ("linucb", {"rounds": 2000, "features": "full"}), ("confidence_per_layer", {"cost_weight": 0.1}),
            ("exit_scorer", {"cost_weight": 0.1, "steps": 50})]


@pytest.fixture(scope="module")
def live(tiny_bert, tmp_path_factory):
    """A tiny encoder fine-tuned one epoch on an easy task of varied lengths, its trace, and the task."""
    folder = tmp_path_factory.mktemp("runtime")
    rng = random.Random(0)
    fillers = "the a it is was and of to in on for with".split()
    lines = ["text\ty"]
    for i in range(160):
        words = ["great good film" if i % 2 else "awful bad movie", *rng.choices(fillers, k=rng.randint(0, 14))]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{'pos' if i % 2 else 'neg'}")
    (folder / "train.tsv").write_text("\n".join(lines[:121]) + "\n")
    (folder / "dev.tsv").write_text("\n".join([lines[0], *lines[121:]]) + "\n")
    data = load_task("custom", custom={"files": {"train": folder / "train.tsv", "dev": folder / "dev.tsv"},
                                       "text_columns": ["text"], "label_column": "y"}, policy_split=0.3)
    model, tokenizer = load_multi_exit(str(tiny_bert), 2, "mean")
    torch.manual_seed(0)
    finetune(model, tokenizer, data, FinetuneConfig(epochs=4, lr=3e-3, head_lr=3e-2, batch_size=16, max_length=32),
             torch.device("cpu"))
    trace = build_trace(model, tokenizer, data, 32, torch.device("cpu"), meta={"label_names": list(data.label_names)})
    return model, tokenizer, trace, data


@pytest.mark.parametrize("agent, options", VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_runtime_exits_equal_the_trace_for_every_agent(live, agent, options):
    model, tokenizer, trace, data = live
    policy = AgentRun.create(agent, dict(options), reward="vanilla").fit(trace, torch.device("cpu")).policy
    expected_layers, expected_predictions = run_policy(copy.deepcopy(policy), trace["dev"])  # FREE adapts online
    dev = data.splits["dev"]
    # the eager walk, the fast path's buckets (graphs only on CUDA), and its windows of several batches with each
    # alive count read a layer late
    for fast, window in ((False, None), (True, None), (True, 24)):
        classifier = EarlyExitClassifier(model, tokenizer, copy.deepcopy(policy), list(data.label_names), 32,
                                         fast=fast, window=window, late_reads=window is not None)
        assert not fast or classifier.walker(8).late_reads == (window is not None)
        for bucket in (False, True):  # the trace's own batching, and sorted by length
            found = classifier.exits(list(dev["text_a"]), None, batch_size=64 if not bucket else 8, bucket=bucket)
            assert torch.equal(found.layers, expected_layers), (agent, options, fast, window, bucket)
            assert torch.equal(found.predictions, expected_predictions), (agent, options, fast, window, bucket)
    if agent == "confidence" and not options.get("temperature"):
        assert len(set(expected_layers.tolist())) > 1  # rows leave at different layers: compaction is exercised


def test_analysis_policies_are_refused(live):
    model, tokenizer, trace, data = live
    oracle = AgentRun.create("oracle").fit(trace, torch.device("cpu")).policy
    with pytest.raises(ValueError, match="analysis only"):
        EarlyExitClassifier(model, tokenizer, oracle, list(data.label_names))
    with pytest.raises(ValueError, match="window must be >= 1 row"):
        EarlyExitClassifier(model, tokenizer, StaticPolicy(2), list(data.label_names), window=0)


def test_predict_a_file_from_a_run(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=confidence", "agent.threshold=0.55", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=64",
                  "data.limit.dev=40", "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    dev_lines = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:41]
    (tmp_path / "dev.tsv").write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
    predicted = run_module("exitrl.predict", str(run), "--input", str(tmp_path / "dev.tsv"), "--output",
                           str(tmp_path / "preds.jsonl"), "--batch-size", "16", cache=tmp_path / "cache")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "examples/s" in predicted.stdout and "saved layers" in predicted.stdout
    answers = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    record = json.loads((run / "metrics.json").read_text())
    histogram = [sum(a["exit_layer"] == layer for a in answers) for layer in (1, 2, 3)]
    assert len(answers) == 40 and histogram == record["results"]["confidence"]["exit_histogram"]
    assert set(answers[0]["probs"]) == {"entailment", "not_entailment"}

    classifier = EarlyExitClassifier.from_run(run, device="cpu")  # the three-line Python API
    answer = classifier.predict([("A man is sleeping.", "Nobody sleeps.")])[0]
    assert answer["label"] in ("entailment", "not_entailment") and 1 <= answer["exit_layer"] <= 3

    bad = run_module("exitrl.predict", str(run), "--input", str(tmp_path / "dev.tsv"), "--output",
                     str(tmp_path / "x.jsonl"), "--text-columns", "premise", cache=tmp_path / "cache")
    assert bad.returncode == 2 and "premise" in bad.stderr and "sentence1" in bad.stderr
