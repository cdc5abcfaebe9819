"""``compare`` over single train runs: a family of one setting is a point, so its AUC is not shown (one line says
why), and a baseline evaluated beside every run is one point of its family, not one per run."""

from __future__ import annotations

import torch

from exitrl.compare import ONE_SETTING, compare, read_runs
from exitrl.experiments.record import RunRecord, write_exits
from exitrl.traces.trace import HELD_OUT

NUM_LAYERS, N = 4, 60


def point(score: float, saved: float) -> dict:
    return {"score": score, "saved_layers": saved, "speedup": 1 / (1 - saved), "accuracy": score,
            "avg_exit_layer": NUM_LAYERS * (1 - saved), "deployable": True}


def exits(seed: int, labels: dict) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {s: {"layers": torch.randint(1, NUM_LAYERS + 1, (N,), generator=generator),
                "predictions": torch.where(torch.rand(N, generator=generator) < 0.75, labels[s], 1 - labels[s])}
            for s in labels}


def write_runs(folder) -> None:
    """Two train runs (reinforce, linucb) with the confidence baseline beside each, and a static rule at two
    layers (a curve), on one trace with a held-out split."""
    labels = {"dev": torch.arange(N) % 2, HELD_OUT: (torch.arange(N) // 3) % 2}
    reference = {"full": {s: labels[s] for s in labels}, "layer_one": {s: 1 - labels[s] for s in labels}}
    oracle = {"full_model": point(0.8, 0.0), "per_layer_score": [0.6, 0.7, 0.75, 0.8],
              "consistency_oracle": point(0.8, 0.6), "oracle_frontier": []}
    baseline = exits(99, labels)
    runs = [("reinforce", "learned", {}, point(0.74, 0.45), 1), ("linucb", "learned", {}, point(0.71, 0.5), 2),
            ("static", "rule", {"layer": 2}, point(0.7, 0.5), 3),
            ("static", "rule", {"layer": 3}, point(0.77, 0.25), 4)]
    for number, (agent, kind, options, result, seed) in enumerate(runs):
        run = folder / f"run{number}"
        run.mkdir()
        policies = {agent: exits(seed, labels)}
        results, kinds = {agent: result}, {agent: kind}
        if kind == "learned":
            policies["confidence"], results["confidence"], kinds["confidence"] = baseline, point(0.72, 0.4), "rule"
        write_exits(run, labels, policies, reference)
        RunRecord(agent=agent, task="rte", metric="accuracy", num_layers=NUM_LAYERS, oracle=oracle, results=results,
                  kinds=kinds, trace_key="trace", options=options, seed=0,
                  reward={"name": "hardness", "alpha": 0.02} if kind == "learned" else {},
                  policy_trained_on=HELD_OUT if kind == "learned" else None).write(run)


def test_single_runs_show_no_auc_and_a_baseline_once(tmp_path, capsys):
    write_runs(tmp_path)
    families = read_runs(tmp_path, with_baselines=True)["rte"]["families"]
    assert len(families["confidence"]) == 1  # evaluated beside two runs: one point
    assert len(read_runs(tmp_path)["rte"]["families"]["static"]) == 2

    report = compare(tmp_path, with_baselines=True)["rte"]
    assert report["families"]["reinforce"]["settings"] == 1 and report["families"]["static"]["settings"] == 2
    assert report["families"]["confidence"]["points"] == 1
    protocol = report["protocol"]
    assert protocol["families"]["confidence"]["points"] == 1 and protocol["families"]["linucb"]["settings"] == 1
    assert "best_learned" not in protocol  # no learned curve: nothing to rank by AUC

    text = (tmp_path / "comparison.md").read_text()
    assert text.count(ONE_SETTING) == 2 and ONE_SETTING in capsys.readouterr().out
    dev_table = text.split("### rte:")[-1]
    rows = [line for line in dev_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith(f"| static | {100 * report['families']['static']['auc']:.2f} |")  # curves first
    for family in ("reinforce (learned)", "linucb (learned)", "confidence"):
        assert any(row.startswith(f"| {family} | – |") for row in rows), family
    assert sum(row.startswith("| confidence |") for row in rows) == 1
    protocol_rows = [line for line in text.split("### rte:")[1].splitlines() if line.startswith("| reinforce")]
    assert protocol_rows and protocol_rows[0].startswith("| reinforce (learned) | – | – |")
