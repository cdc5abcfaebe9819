"""``sweep.workers=2`` spreads a sweep's points over two processes through Hydra multirun and the joblib launcher:
every point is recorded once, by both workers between them, with the numbers a one-process sweep records; a rerun,
with any number of workers, skips every finished point."""

from __future__ import annotations

import json

import pytest
from test_sweep_compare import run_module


def test_two_workers_record_every_point_as_one_process_does_and_reruns_skip_them(tiny_bert, glue_dir, tmp_path,
                                                                                   capsys):
    cache = tmp_path / "cache"
    common = ["agent=confidence,patience,static", "env=rte", f"backbone.name={tiny_bert}", "backbone.package=null",
              f"data.dir={glue_dir}", "data.limit.train=96", "data.limit.dev=32", "backbone.finetune.epochs=1",
              "sweep.grids.confidence=[0.9,0.7]"]
    spread = run_module("exitrl.sweep", *common, f"sweep.out={tmp_path / 'two'}", "sweep.workers=2", cache=cache)
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert "7 points on 2 workers" in spread.stderr
    alone = run_module("exitrl.sweep", *common, f"sweep.out={tmp_path / 'one'}", cache=cache)
    assert alone.returncode == 0, alone.stderr[-3000:]
    two = {p.relative_to(tmp_path / "two"): json.loads(p.read_text()) for p in (tmp_path / "two").rglob("metrics.json")}
    one = {p.relative_to(tmp_path / "one"): json.loads(p.read_text()) for p in (tmp_path / "one").rglob("metrics.json")}
    assert len(two) == 2 + 2 + 3 and set(two) == set(one)  # confidence 2, patience 1..2, static 1..3 (3 layers)
    assert {r["environment"]["sweep_worker"] for r in two.values()} == {0, 1}  # both workers took points
    for name, record in two.items():
        assert record["results"] == one[name]["results"], name
    assert not (tmp_path / "two" / ".plan").exists()  # the plan (a copy of the trace) is removed once done
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("metrics.json")}
    for workers in ("2", "1"):
        again = run_module("exitrl.sweep", *common, f"sweep.out={tmp_path / 'two'}", f"sweep.workers={workers}",
                           cache=cache)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "points on" not in again.stderr  # nothing left to do: no workers started
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("metrics.json")} == stamps
    from exitrl.sweep import main

    for setting, named in (("sweep.workers=0", "sweep.workers=0 is out of range"),
                           ("sweep.devices=[cpu,gpu7]", "sweep.devices=['cpu', 'gpu7']")):
        with pytest.raises(SystemExit) as exited:  # in this process: the CLI's own error path, no start-up cost
            main([*common, f"sweep.out={tmp_path / 'bad'}", "sweep.workers=2", setting])
        assert exited.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work
