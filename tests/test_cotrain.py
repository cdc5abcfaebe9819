"""ConsistentEE co-training: CE only at the policy's exit layer trains exactly the layers on the way there, and
``backbone.mode=cotrain`` runs and logs every round from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import run_cli
from torch.utils.tensorboard import SummaryWriter

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.backbones import MultiExitModel, load_multi_exit
from exitrl.backbones.losses import exit_layer_ce
from exitrl.data import load_task
from exitrl.experiments.cotraining import CotrainConfig, cotrain_backbone, cotrain_rounds


def _small_task(tmp_path):
    (tmp_path / "train.tsv").write_text("text\ty\n" + "".join(
        f"{'great good film' if i % 2 else 'awful bad movie'} {i % 5}\t{'pos' if i % 2 else 'neg'}\n"
        for i in range(48)))
    return load_task("custom", custom={"files": {"train": tmp_path / "train.tsv", "dev": tmp_path / "train.tsv"},
                                       "text_columns": ["text"], "label_column": "y"})


def test_exit_layer_ce_reads_only_the_exit_layer():
    logits = torch.randn(4, 3, 2)
    labels = torch.tensor([0, 1, 1, 0])
    exits = torch.tensor([0, 2, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits[torch.arange(4), exits], labels)
    torch.testing.assert_close(exit_layer_ce(logits, labels, exits), expected)


def test_exiting_at_layer_one_trains_nothing_above_it(tiny_bert, tmp_path):
    """A policy that exits every example at layer 1: layer 1, its head and the embeddings change; deeper
    layers and heads get no gradient and stay bit-identical."""
    data = _small_task(tmp_path)
    model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = cotrain_backbone(model, tok, data.splits["train"], ConfidencePolicy(0.0),
                            CotrainConfig(epochs=1, lr=1e-3, head_lr=1e-3, batch_size=16), torch.device("cpu"))
    assert seen["exit_histogram"] == [48, 0, 0] and seen["step"] == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("heads.0.") for k in changed) and any(".layer.0." in k for k in changed)
    assert any("embeddings" in k for k in changed)
    assert not any(k.startswith(("heads.1.", "heads.2.")) or ".layer.1." in k or ".layer.2." in k for k in changed)


def test_cli_cotrain_logs_every_round_and_saves_the_backbone(tiny_bert, glue_dir, tmp_path):
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
              "data.limit.train=64", "data.limit.dev=32", "backbone.finetune.epochs=1"]
    out = run_cli(tmp_path, "agent=reinforce", "agent.epochs=2", "agent.batch_size=8", "backbone.mode=cotrain",
                  "cotrain.rounds=2", "cotrain.lr=1e-3", "cotrain.head_lr=1e-3", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    rounds = metrics["cotrain"]["rounds"]
    assert metrics["backbone_mode"] == "cotrain" and [r["round"] for r in rounds] == [0, 1, 2]
    assert all(len(r["train_per_layer"]) == 3 and "policy_dev" in r for r in rounds)
    assert sum(rounds[1]["cotrain_exit_histogram"]) == 64  # one epoch over the 64 training examples
    assert rounds[0]["train_per_layer"] != rounds[2]["train_per_layer"]  # the backbone did change
    assert metrics["dev_per_layer"] == rounds[2]["dev_per_layer"]  # results are for the co-trained backbone
    model, _, _ = MultiExitModel.load(run / "backbone")
    assert model.num_layers == 3
    events = EventAccumulator(str(next((run / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    assert {"cotrain/loss", "cotrain/train_accuracy_layer1", "cotrain/policy_dev_speedup"} <= set(
        events.Tags()["scalars"])
    assert (run / "tensorboard" / "cotrain_round2").is_dir()
    bad = run_cli(tmp_path, "backbone.mode=joint", *common, run_name="bad")
    assert bad.returncode == 2 and "frozen, cotrain" in bad.stderr and "Traceback" not in bad.stderr


def test_remedies_keep_the_weighted_ce_and_freeze_lower_layers(tiny_bert, tmp_path):
    """keep_weighted_ce: every head and layer learns even when every row exits at layer 1; freeze_layers: the
    embeddings and the first k layers stay bit-identical while the rest moves; bad values are refused."""
    data = _small_task(tmp_path)
    model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cotrain_backbone(model, tok, data.splits["train"], ConfidencePolicy(0.0),
                     CotrainConfig(epochs=1, lr=1e-3, head_lr=1e-3, batch_size=16, keep_weighted_ce=1.0,
                                   freeze_layers=1), torch.device("cpu"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("heads.2.") for k in changed) and any(".layer.2." in k for k in changed)
    assert any(k.startswith("heads.0.") for k in changed)  # the heads always train
    assert not any("embeddings" in k or ".layer.0." in k for k in changed)
    for bad in ({"keep_weighted_ce": -1.0}, {"freeze_layers": -1}):
        with pytest.raises(ValueError, match="cotrain"):
            CotrainConfig(**bad)
    with pytest.raises(ValueError, match="freeze_layers"):
        cotrain_backbone(model, tok, data.splits["train"], ConfidencePolicy(0.0), CotrainConfig(freeze_layers=3),
                         torch.device("cpu"))


def test_rounds_resume_at_a_round_boundary_to_the_same_result(tiny_bert, tmp_path):
    """Killed right after round 1's checkpoint, then run again with the round-0 backbone a new process would load:
    rounds 2 and 3 give the backbone, policy and records of an uninterrupted run."""
    from test_resume import Interrupted, KilledAfter

    from exitrl.core.checkpoint import Checkpoints, load_checked
    from exitrl.core.hashing import hash_state_dict
    from exitrl.experiments.pipeline import AgentRun
    from exitrl.traces.build import load_or_build_trace

    data = _small_task(tmp_path)
    agent = AgentRun.create("reinforce", {"epochs": 2, "batch_size": 8}, "hardness", "train", seed=0)
    cfg = CotrainConfig(rounds=3, lr=1e-3, head_lr=1e-3, batch_size=16)

    def train_agent(trace, writer, checkpoints):
        fitted = agent.fit(trace, torch.device("cpu"), writer, None, "accuracy", checkpoints)
        return fitted.policy, fitted.info

    def rounds(folder, checkpoints):
        torch.manual_seed(0)
        model, tok = load_multi_exit(str(tiny_bert), 2, "cls")
        trace = load_or_build_trace(model, tok, data, tmp_path / "cache", torch.device("cpu"), 32)
        policy = train_agent(trace, None, None)[0]
        torch.manual_seed(99)  # whatever state the process is in
        trace, policy, _, records = cotrain_rounds(
            model, tok, data, trace, policy, train_agent, cfg, tmp_path / "cache", torch.device("cpu"), 32, folder,
            SummaryWriter(str(folder / "tb")), "accuracy", checkpoints)
        return {"model": hash_state_dict(model), "policy": hash_state_dict(policy.module), "trace": trace.meta["key"],
                "records": [{k: v for k, v in r.items() if k != "seconds"} for r in records]}

    expected = rounds(tmp_path / "reference", None)
    run = tmp_path / "run"

    def killed(name):
        if name == "rounds":
            return KilledAfter(run / "rounds.pt", 1, work="w")
        return Checkpoints(run / f"{name}.pt", 1e9, work=name)

    with pytest.raises(Interrupted):
        rounds(run, killed)
    assert load_checked(run / "rounds.pt")["round"] == 1  # the kill came right after round 1's checkpoint
    resumed = rounds(run, lambda name: Checkpoints(run / f"{name}.pt", 1e9, work="w" if name == "rounds" else name))
    assert resumed == expected
