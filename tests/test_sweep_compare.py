"""``python -m exitrl.sweep`` and ``python -m exitrl.compare`` end to end on a tiny backbone and a slice of RTE: one
fine-tuning for the whole sweep, the comparison table equal to numbers recomputed from the per-run metrics, the PNG
and the TensorBoard files readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TESTS = Path(__file__).parent


def run_module(module: str, *args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "EXITRL_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_sweep_then_compare(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "sweep"
    cache = tmp_path / "cache"
    result = run_module(
        "exitrl.sweep", "agent=confidence,static,patience,calm,reinforce", "env=rte", f"backbone.name={tiny_bert}",
        "backbone.package=null", "backbone.pooling=cls", f"data.dir={glue_dir}", "data.limit.train=160",
        "data.limit.dev=48", "backbone.finetune.epochs=1", "reinforce.epochs=2", "sweep.grids.reinforce=[0.02,0.3]",
        "sweep.grids.confidence=[0.9,0.7,0.55]", "sweep.grids.calm=[0.1,0.3]", f"sweep.out={out}", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((cache / "backbones").iterdir())) == 1  # one fine-tuning for 5 families
    runs = sorted(out.rglob("metrics.json"))
    # reinforce: 2 alphas x 5 thresholds on pi from 2 fits (one policy, a curve); static 1..3, patience 1..2
    # (3 layers), calm, confidence
    assert len(runs) == 2 * 5 + 3 + 2 + 2 + 3
    per_family: dict[str, list[dict]] = {}
    for path in runs:
        record = json.loads(path.read_text())
        folder = path.parent.parent if record["knob"].get("curve") else path.parent
        assert folder.name == f"{record['knob']['key'].split('.')[-1]}={record['knob']['value']}"
        if record["knob"].get("curve"):
            assert path.parent.name == f"threshold={record['knob']['curve']['value']}"
        per_family.setdefault(record["agent"], []).append(record["results"][record["agent"]])
    full = json.loads(runs[0].read_text())["oracle"]["full_model"]

    comparison = json.loads((out / "comparison.json").read_text())["rte"]
    assert set(comparison["families"]) == set(per_family)
    for family, results in per_family.items():
        row = comparison["families"][family]
        saved_30 = [r["score"] for r in results if r["saved_layers"] >= 0.3 - 1e-9]
        assert row["best_score_saved_30"] == (max(saved_30) if saved_30 else None)
        within = [r["speedup"] for r in results if r["score"] >= full["score"] - 0.01 - 1e-12]
        assert row["speedup_within_1pt"] == max([1.0, *within])
        assert row["points"] == len(results)
    layer_one = json.loads(runs[0].read_text())["oracle"]["per_layer_score"][0]
    for family, results in per_family.items():  # the AUC, recomputed here from its definition
        grid = [(3 - 1) / 3 * i / 15 for i in range(16)]
        best = [max([r["score"] for r in [*results, full] if r["saved_layers"] >= s - 1e-9] or [layer_one])
                for s in grid]
        expected = sum(max(b, layer_one) for b in best) / 16
        assert abs(comparison["families"][family]["auc"] - expected) < 1e-9
    assert comparison["families"]["static"]["best_score_saved_50"] == max(
        r["score"] for r in per_family["static"] if r["saved_layers"] >= 0.5)
    table = (out / "comparison.md").read_text()
    assert "reinforce (learned)" in table and "| static |" in table and "AUC" in result.stdout

    # the honest protocol (calm held 20 % of train out: the validation split), recomputed from the records'
    # validation and dev summaries: at each saving level the point best on validation, read on dev
    protocol = comparison["protocol"]
    assert set(protocol["families"]) == set(per_family) and "honest protocol" in table
    records = [json.loads(path.read_text()) for path in runs]
    full_val = max(r["validation_results"][r["agent"]]["score"] for r in records if r["agent"] == "static"
                   and r["knob"]["value"] == 3)
    layer_one_val = [r for r in records if r["agent"] == "static" and r["knob"]["value"] == 1][0]
    layer_one_dev = layer_one_val["results"]["static"]["score"]
    for family in per_family:
        mine = [(r["validation_results"][family], r["results"][family]) for r in records if r["agent"] == family]
        pool = [*mine, ({"score": full_val, "saved_layers": 0.0}, full)]
        values = []
        for level in grid:
            eligible = [p for p in pool if p[0]["saved_layers"] >= level - 1e-9]
            if not eligible:  # nothing saves this much on validation: exiting everything at layer 1
                values.append(layer_one_dev)
                continue
            pick = max(eligible, key=lambda p: p[0]["score"])  # first on ties, as the protocol does
            values.append(max(pick[1]["score"], layer_one_dev))
        assert abs(protocol["families"][family]["validated_auc"]["mean"] - sum(values) / 16) < 1e-6, family
    assert protocol["best_learned"] == "reinforce" and protocol["best_rule"] in per_family
    low, high = protocol["difference"]["ci95"]
    assert low <= protocol["difference"]["estimate"] <= high

    image = matplotlib.image.imread(out / "comparison_rte.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    events = EventAccumulator(str(out / "compare_tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "compare/rte/tradeoff" in events.Tags()["images"]
    run = EventAccumulator(str(out / "calm" / "delta=0.1" / "tensorboard"))
    run.Reload()
    assert {"eval/score", "eval/speedup", "eval/saved_layers"} <= set(run.Tags()["scalars"])
    assert "exit/layer" in run.Tags()["histograms"]
    hparams = run.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and b"delta" in hparams["_hparams_/session_start_info"]
    assert run.PluginTagToContent("custom_scalars")

    again = run_module("exitrl.compare", str(out), cache=cache)
    assert again.returncode == 0 and json.loads((out / "comparison.json").read_text())["rte"] == comparison


def test_sweep_and_compare_errors_are_clear(tmp_path):
    out = run_module("exitrl.sweep", "agent=confidence,bogus", "env=rte", cache=tmp_path)
    assert out.returncode == 2 and "bogus" in out.stderr and "reinforce" in out.stderr
    out = run_module("exitrl.sweep", "agent=confidence", "confidence.nope=1", "env=rte", cache=tmp_path)
    assert out.returncode == 2 and "nope" in out.stderr
    out = run_module("exitrl.sweep", "agent=reinforce,confidence", "env=rte", "reward=custom",
                     "reward.fn=example_rewards:only_layer_two", cache=tmp_path)  # no alpha to sweep
    assert out.returncode == 2 and "takes no alpha" in out.stderr and not (tmp_path / "backbones").exists()
    out = run_module("exitrl.sweep", "agent=confidence", "env=rte", "learn_on=everything", cache=tmp_path)
    assert out.returncode == 2 and "auto, train, held_out" in out.stderr
    out = run_module("exitrl.compare", str(tmp_path), cache=tmp_path)
    assert out.returncode == 2 and "No metrics.json" in out.stderr


def test_compare_never_mixes_runs_of_different_traces(tmp_path):
    from exitrl.compare import read_runs

    point = {"score": 0.8, "saved_layers": 0.5, "speedup": 2.0, "accuracy": 0.8, "avg_exit_layer": 2.0}
    for key in ("aaaaaaaa1111", "bbbbbbbb2222"):
        run = tmp_path / key
        run.mkdir()
        record = {"task": "rte", "agent": "confidence", "trace_key": key, "num_layers": 4, "metric": "accuracy",
                  "results": {"confidence": point}, "oracle": {}}
        (run / "metrics.json").write_text(json.dumps(record))
    assert set(read_runs(tmp_path)) == {"rte@aaaaaaaa", "rte@bbbbbbbb"}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    try:
        read_runs(tmp_path)
    except ValueError as err:
        assert "broken" in str(err)
    else:
        raise AssertionError("a malformed metrics.json must be refused with its path")


def test_compare_separates_rewards_and_keeps_train_baselines_apart(tmp_path, capsys):
    from exitrl.compare import compare, read_runs
    from exitrl.experiments.record import RunRecord

    def point(score, saved):
        return {"score": score, "saved_layers": saved, "speedup": 1 / (1 - saved), "accuracy": score,
                "avg_exit_layer": 4 * (1 - saved), "deployable": True}

    oracle = {"full_model": point(0.8, 0.0), "per_layer_score": [0.6, 0.7, 0.75, 0.8],
              "consistency_oracle": point(0.8, 0.6), "oracle_frontier": []}
    runs = [("hardness", None, 0.04, 0.78), ("hardness", None, 0.08, 0.74), (None, "mypkg.rewards:fn", 0.04, 0.70)]
    for i, (name, fn, alpha, score) in enumerate(runs):
        record = RunRecord(agent="reinforce", task="rte", metric="accuracy", num_layers=4, oracle=oracle,
                           results={"reinforce": point(score, 0.3 + i / 10), "confidence": point(0.79, 0.2)},
                           kinds={"reinforce": "learned", "confidence": "rule"}, trace_key="k",
                           reward={"name": name, "fn": fn, "alpha": alpha, "depth": "layer"},
                           policy_trained_on="train")
        (tmp_path / f"run{i}").mkdir()
        record.write(tmp_path / f"run{i}")
    families = read_runs(tmp_path)["rte"]["families"]
    assert set(families) == {"reinforce[reward=hardness,depth=layer]", "reinforce[reward=mypkg.rewards:fn,depth=layer]"}
    assert sorted(p["setting"] for p in families["reinforce[reward=hardness,depth=layer]"]) == ["alpha=0.04",
                                                                                                "alpha=0.08"]
    with_baselines = read_runs(tmp_path, with_baselines=True)["rte"]["families"]
    # the same baseline beside three runs of one trace: one point, not three
    assert len(with_baselines["confidence"]) == 1 and with_baselines["confidence"][0]["setting"] == "baseline"
    report = compare(tmp_path)
    assert report["rte"]["learned"] == sorted(families)
    png = tmp_path / "comparison_rte.png"
    assert png.is_file() and str(png) in capsys.readouterr().out


def test_adaptive_alpha_grid_spans_the_saved_layers(tmp_path):
    """A learned family whose default α grid saves too little (on the held-out split) gets larger α values until
    its points reach the saved-layer range, or the rounds run out."""
    from conftest import synthetic_trace

    from exitrl.traces.trace import HELD_OUT, Trace

    splits = {name: synthetic_trace(n=256, num_layers=4, hidden=8, seed=i)[0]
              for i, name in enumerate(("train", "dev", HELD_OUT))}
    trace_path = tmp_path / "trace.pt"
    Trace(splits, {"task": "rte", "metric": "accuracy", "key": "synthetic"}).save(trace_path)
    out = tmp_path / "sweep"
    result = run_module("exitrl.sweep", "agent=reinforce", "env=rte", f"sweep.trace={trace_path}", f"sweep.out={out}",
                        "reinforce.epochs=1", "reinforce.features=state", "sweep.curve=false", "reward=vanilla",
                        cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in out.rglob("metrics.json")]
    alphas = sorted(r["knob"]["value"] for r in records)
    saved = {r["knob"]["value"]: r["validation_results"]["reinforce"]["saved_layers"] for r in records}
    default = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    extra = [a for a in alphas if a not in default]
    top = 3 / 4
    assert all(a in alphas for a in default)
    up, down = [a for a in extra if a > 0.2], [a for a in extra if a < 0.002]
    assert len(up) + len(down) == len(extra) and len(up) <= 4 and len(down) <= 4
    if max(saved[a] for a in default) < 0.7 * top:  # the default grid fell short: it must have been extended
        assert up and (max(saved.values()) >= 0.7 * top or len(up) == 4)
        assert all(saved[a] < 0.7 * top for a in up[:-1])  # it stopped as soon as the range was reached
    else:
        assert not up
    if min(saved[a] for a in default) > 0.15 * top:
        assert down and (min(saved.values()) <= 0.15 * top or len(down) == 4)
    else:
        assert not down


def test_compare_averages_backbone_seeds_of_one_group(tmp_path):
    """Backbones differing only in their fine-tuning seed (one ``seed_group``) are seeds of one protocol row, each
    judged against its own full model; another group stays apart; other dev rows are refused."""
    import torch

    from exitrl.compare import compare, protocol_summary, read_runs
    from exitrl.evaluation.protocol import Point, SplitExits, validated_auc
    from exitrl.experiments.record import RunRecord, write_exits
    from exitrl.traces.trace import HELD_OUT

    num_layers, n = 4, 60
    labels = {"dev": torch.arange(n) % 2, HELD_OUT: (torch.arange(n) // 3) % 2}

    def point(score, saved):
        return {"score": score, "saved_layers": saved, "speedup": 1 / (1 - saved), "accuracy": score,
                "avg_exit_layer": num_layers * (1 - saved), "deployable": True}

    oracle = {"full_model": point(0.8, 0.0), "per_layer_score": [0.6, 0.7, 0.75, 0.8],
              "consistency_oracle": point(0.8, 0.6), "oracle_frontier": []}
    expected = {}
    for backbone, group in ((0, "g1"), (1, "g1"), (2, "g2")):
        generator = torch.Generator().manual_seed(backbone)
        reference = {key: {s: torch.where(torch.rand(n, generator=generator) < p, labels[s], 1 - labels[s])
                           for s in labels} for key, p in (("full", 0.85), ("layer_one", 0.6))}
        points = []
        for agent, kind in (("confidence", "rule"), ("reinforce", "learned")):
            layers = {s: torch.randint(1, num_layers + 1, (n,), generator=generator) for s in labels}
            predictions = {s: torch.where(torch.rand(n, generator=generator) < 0.75, labels[s], 1 - labels[s])
                           for s in labels}
            run = tmp_path / f"b{backbone}" / agent
            run.mkdir(parents=True)
            write_exits(run, labels, {agent: {s: {"layers": layers[s], "predictions": predictions[s]}
                                              for s in labels}}, reference)
            RunRecord(agent=agent, task="rte", metric="accuracy", num_layers=num_layers, oracle=oracle,
                      results={agent: point(0.75, 0.4)}, kinds={agent: kind}, trace_key=f"trace{backbone}",
                      backbone={"seed_group": group}, seed=backbone).write(run)
            made = {s: SplitExits(layers[s], predictions[s], labels[s]) for s in labels}
            points.append((agent, Point("", made[HELD_OUT], made["dev"])))

        def fixed(key, layer, reference=reference):
            made = {s: SplitExits(torch.full((n,), layer), reference[key][s], labels[s]) for s in labels}
            return Point(key, made[HELD_OUT], made["dev"])

        for agent, p in points:
            expected.setdefault((group, agent), []).append(
                float(validated_auc([p], fixed("full", num_layers), fixed("layer_one", 1), "accuracy", num_layers)))

    tasks = read_runs(tmp_path)
    assert len(tasks) == 2 and all(name.startswith("rte@") for name in tasks)
    one = next(task for task in tasks.values() if len(task["traces"]) == 2)
    summary = protocol_summary(one, resamples=50)
    assert summary["backbones"] == 2
    for agent in ("confidence", "reinforce"):
        row = summary["families"][agent]
        assert row["seeds"] == 2
        assert abs(row["validated_auc"]["mean"] - sum(expected[("g1", agent)]) / 2) < 1e-9
    report = compare(tmp_path)
    assert sum(r["protocol"].get("backbones") == 2 for r in report.values()) == 1
    assert "seeds of 2 backbones" in (tmp_path / "comparison.md").read_text()

    other = tmp_path / "b1" / "reinforce"
    exits = torch.load(other / "exits.pt", weights_only=True)
    exits["labels"]["dev"] = 1 - exits["labels"]["dev"]
    torch.save(exits, other / "exits.pt")
    assert "other dev rows" in protocol_summary(one, resamples=50)["unavailable"]


def test_a_rerun_sweep_skips_finished_points_and_redoes_a_half_written_one(tmp_path):
    from conftest import synthetic_trace

    from exitrl.traces.trace import HELD_OUT, Trace

    splits = {name: synthetic_trace(n=128, num_layers=4, hidden=8, seed=i)[0]
              for i, name in enumerate(("train", "dev", HELD_OUT))}
    trace_path = tmp_path / "trace.pt"
    Trace(splits, {"task": "rte", "metric": "accuracy", "key": "synthetic"}).save(trace_path)
    out = tmp_path / "sweep"
    args = ("exitrl.sweep", "agent=confidence,static", "env=rte", f"sweep.trace={trace_path}", f"sweep.out={out}")
    first = run_module(*args, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    written = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    assert len(written) == 10 + 4  # 10 thresholds, static at layers 1..4
    half = out / "confidence" / "threshold=0.9"
    (half / "metrics.json").unlink()  # killed before its record was written
    again = run_module(*args, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished by an earlier run of this sweep, skipped") == 13
    assert (half / "metrics.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in written.items() if p.parent != half)
    changed = run_module(*args, "seed=1", cache=tmp_path / "cache")  # another config: nothing is skipped
    assert changed.returncode == 0 and "skipped" not in changed.stderr
