"""An agent declared in one file outside the package (tests/toy_agent.py) runs through ``exitrl.train`` and
``exitrl.sweep`` with ``plugins=[toy_agent]``, without touching any exitrl module."""

from __future__ import annotations

import json

from test_cli import run_cli
from test_sweep_compare import run_module

from exitrl.policy import load_policy


def test_a_plugin_agent_trains_and_sweeps(tiny_bert, glue_dir, tmp_path):
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "backbone.pooling=cls", "env=rte",
              f"data.dir={glue_dir}", "data.limit.train=48", "data.limit.dev=24", "backbone.finetune.epochs=1",
              "plugins=[toy_agent]"]
    out = run_cli(tmp_path, "agent=toy", "agent.layer=3", "baselines=[confidence,static]", *common, run_name="toy")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert metrics["schema_version"] == 1 and metrics["kinds"] == {"toy": "rule", "confidence": "rule",
                                                                   "static": "rule"}
    assert metrics["results"]["toy"]["exit_histogram"] == [0, 0, 24]
    assert metrics["agent_info"] == {"fitted_on": "train", "rows": 48, "seed": 0}
    assert load_policy(tmp_path / "toy" / "policy.pt").config() == {"layer": 3}
    assert "layer: 3" in (tmp_path / "toy" / "config.yaml").read_text()

    bad = run_cli(tmp_path, "agent=toy", "agent.layer=0", *common, run_name="bad")
    assert bad.returncode == 2 and "agent.layer=0 is out of range: it must be >= 1" in bad.stderr

    sweep = tmp_path / "sweep"
    result = run_module("exitrl.sweep", "agent=toy,static", *common, f"hydra.run.dir={sweep}",  # as exitrl.train
                        cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    points = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "toy").rglob("metrics.json")}
    assert set(points) == {"layer=1", "layer=2"}
    assert points["layer=1"]["results"]["toy"]["exit_histogram"] == [24, 0, 0]
    assert points["layer=2"]["knob"] == {"key": "agent.layer", "value": 2}
    comparison = json.loads((sweep / "comparison.json").read_text())["rte"]
    assert set(comparison["families"]) == {"toy", "static"} and comparison["learned"] == []
    assert len(list((tmp_path / "cache" / "backbones").iterdir())) == 1  # the sweep reused the train run's backbone
