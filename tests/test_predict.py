"""``python -m exitrl.predict`` on a run of a tiny backbone on a slice of RTE: an id on every output line, accuracy
and the exit histogram when the input has labels, ``--limit``, and an input checked row by row before the model
loads (a pair task's run refuses single texts); the measured wall-clock speedup beside the layer speedup."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_cli import run_cli

from exitrl.predict import main, predict_file, report


@pytest.fixture(scope="module")
def rte_run(tiny_bert, glue_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    out = run_cli(folder, "agent=confidence", "agent.threshold=0.55", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=64",
                  "data.limit.dev=40", "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "run"


def predict(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ids_accuracy_histogram_and_limit(rte_run, glue_dir, tmp_path, capsys):
    dev = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(dev[:41]) + "\n", encoding="utf-8")
    code, out, err = predict(capsys, rte_run, "--input", tmp_path / "dev.tsv", "--output", tmp_path / "p.jsonl",
                             "--limit", 30, "--batch-size", 8)
    assert code == 0, err
    answers = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    rows = [line.split("\t") for line in dev[1:31]]  # index, sentence1, sentence2, label
    assert [a["id"] for a in answers] == [row[0] for row in rows]  # the file's index column
    assert [a["gold"] for a in answers] == [row[3] for row in rows]
    correct = sum(a["label"] == row[3] for a, row in zip(answers, rows))
    assert f"accuracy {100 * correct / 30:.2f} % against column 'label'" in out
    counts = [sum(a["exit_layer"] == layer for a in answers) for layer in (1, 2, 3)]
    assert sum(counts) == 30
    assert "exit layers: " + ", ".join(f"{layer}: {n} ({100 * n / 30:.1f} %)" for layer, n in
                                       enumerate(counts, 1)) in out
    assert "(ids: index)" in out

    pairs = [{"premise": row[1], "hypothesis": row[2]} for row in rows[:5]]  # no id, no label: row numbers
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    code, out, err = predict(capsys, rte_run, "--input", tmp_path / "pairs.jsonl", "--output", tmp_path / "q.jsonl",
                             "--text-columns", "premise", "hypothesis")
    assert code == 0, err
    again = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [a["id"] for a in again] == [1, 2, 3, 4, 5] and "gold" not in again[0]
    assert [a["label"] for a in again] == [a["label"] for a in answers[:5]]  # the same rows, the same answers
    assert "exitrl: accuracy" not in out and "(ids: row numbers)" in out


def test_the_input_is_checked_before_the_model_loads(rte_run, tmp_path, capsys):
    """The run's backbone is gone from this copy: an input error must come first, a good input then meets the
    backbone's error."""
    broken = tmp_path / "broken_run"
    shutil.copytree(rte_run, broken)
    record = json.loads((broken / "metrics.json").read_text())
    record["backbone"]["path"] = str(tmp_path / "gone")
    (broken / "metrics.json").write_text(json.dumps(record))
    output = tmp_path / "p.jsonl"

    single = tmp_path / "single.tsv"
    single.write_text("id\tsentence\tlabel\n1\tA fine film.\tentailment\n", encoding="utf-8")
    code, _, err = predict(capsys, broken, "--input", single, "--output", output)
    assert code == 2 and "holds single texts (columns: id, sentence, label)" in err
    assert "classifies text pairs ('sentence1' and 'sentence2')" in err

    rows = [{"sentence1": "a", "sentence2": "b"}, {"sentence1": "c", "sentence2": "d"}, {"sentence1": "e"}]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, _, err = predict(capsys, broken, "--input", tmp_path / "short.jsonl", "--output", output)
    assert code == 2 and "short.jsonl row 3 (line 3) has no column 'sentence2' (columns: sentence1)" in err

    (tmp_path / "bad.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n{oops\n', encoding="utf-8")
    code, _, err = predict(capsys, broken, "--input", tmp_path / "bad.jsonl", "--output", output)
    assert code == 2 and "bad.jsonl line 2: not JSON" in err

    code, _, err = predict(capsys, broken, "--input", tmp_path / "absent.tsv", "--output", output)
    assert code == 2 and "absent.tsv does not exist" in err
    code, _, err = predict(capsys, broken, "--input", tmp_path / "short.jsonl", "--output", output,
                           "--text-columns", "sentence1")
    assert code == 2 and "pairs (sentence1, sentence2); --text-columns sentence1 names 1 column(s): name 2" in err
    code, _, err = predict(capsys, broken, "--input", tmp_path / "short.jsonl", "--output", output, "--limit", 0)
    assert code == 2 and "--limit must be >= 1" in err
    code, _, err = predict(capsys, broken, "--input", tmp_path / "short.jsonl", "--output", output, "--limit", 2,
                           "--label-column", "gold")
    assert code == 2 and "short.jsonl row 1 (line 1) has no column 'gold'" in err

    code, _, err = predict(capsys, broken, "--input", tmp_path / "short.jsonl", "--output", output, "--limit", 2)
    assert code == 2 and "backbone" in err and not output.exists()  # a good input reaches the model


def test_help_says_where_ids_come_from(capsys):
    code, out, _ = predict(capsys, "--help")
    assert code == 0 and "--limit N" in out and "id, idx, index, guid" in out and "row number" in out


def test_the_summary_has_the_wall_clock_speedup_beside_the_layer_speedup(rte_run, glue_dir, tmp_path, capsys):
    dev = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(dev[:41]) + "\n", encoding="utf-8")
    summary = predict_file(rte_run, tmp_path / "dev.tsv", tmp_path / "p.jsonl", batch_size=8, speed_sample=24)
    assert summary["layer_speedup"] == pytest.approx(3 / summary["avg_exit_layer"])
    wall = summary["wall_clock_speedup"]
    assert isinstance(wall, float) and math.isfinite(wall) and wall > 0
    speed = summary["speed"]
    assert speed["wall_clock_speedup"] == wall and speed["examples"] == 24 and speed["batch_size"] == 8
    assert speed["device"] == "cpu" and speed["policy_seconds"] > 0 and speed["full_seconds"] > 0
    assert 1 <= speed["layer_speedup"] <= 3
    text = report(summary)
    assert (f"exitrl: layer speedup {summary['layer_speedup']:.2f}x (L / mean exit layer), wall-clock speedup "
            f"{wall:.2f}x against the full model on cpu (24 rows, batch 8;") in text

    off = predict_file(rte_run, tmp_path / "dev.tsv", tmp_path / "p.jsonl", batch_size=8, speed_sample=0)
    assert off["wall_clock_speedup"] is None and off["speed"] is None and off["layer_speedup"] > 0
    assert "wall-clock speedup not measured (--speed-sample 0)" in report(off)

    code, out, err = predict(capsys, rte_run, "--input", tmp_path / "dev.tsv", "--output", tmp_path / "q.jsonl",
                             "--limit", 10, "--speed-sample", 6)
    assert code == 0, err
    assert "wall-clock speedup" in out and "against the full model on cpu (6 rows, batch 32;" in out
    code, _, err = predict(capsys, rte_run, "--input", tmp_path / "dev.tsv", "--output", tmp_path / "q.jsonl",
                           "--speed-sample", -1)
    assert code == 2 and "--speed-sample must be >= 0 (0: no timing), got -1" in err
