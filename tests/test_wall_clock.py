"""``exitrl train`` measures the trained policy's wall-clock speedup against the full model through the runtime, on at
most ``eval.speed_sample`` dev rows, and reports it beside the layer speedup (metrics.json's ``wall_clock``, the
summary's line); ``eval.speed_sample=0``, an analysis-only policy and a causal LM skip it with a one-line reason."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf
from test_cli import run_cli
from test_validation import planned

from exitrl.agents.static import StaticPolicy
from exitrl.experiments.pipeline import AgentRun
from exitrl.train import wall_clock


def test_train_reports_the_wall_clock_speedup_or_why_not(tiny_bert, glue_dir, tmp_path):
    common = [f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte", f"data.dir={glue_dir}",
              "data.limit.train=48", "data.limit.dev=40", "backbone.finetune.epochs=1"]
    out = run_cli(tmp_path, "agent=reinforce", "agent.epochs=1", "eval.speed_seconds=null", *common,
                  run_name="measured")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "measured" / "metrics.json").read_text())
    measured = record["wall_clock"]
    for key in ("wall_clock_speedup", "layer_speedup", "policy_seconds", "full_seconds"):
        assert isinstance(measured[key], float) and math.isfinite(measured[key]) and measured[key] > 0, key
    assert measured["examples"] == 40 and measured["batch_size"] == 32 and measured["device"] == "cpu"
    assert measured["layer_speedup"] == pytest.approx(record["results"]["reinforce"]["speedup"], rel=1e-5)
    line = (f"wall-clock speedup of reinforce: {measured['wall_clock_speedup']:.2f}x against the full model on cpu "
            f"(40 dev rows, batch 32); layer speedup {measured['layer_speedup']:.2f}x on those rows, "
            f"{record['results']['reinforce']['speedup']:.2f}x on all of dev")
    assert line in out.stdout and line in (tmp_path / "measured" / "train.log").read_text()

    out = run_cli(tmp_path, "agent=confidence", "eval.speed_sample=0", *common, run_name="off")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["wall_clock"] == {
        "skipped": "eval.speed_sample=0"}
    assert "wall-clock speedup: not measured (eval.speed_sample=0)" in out.stdout

    out = run_cli(tmp_path, "agent=oracle", *common, run_name="oracle")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wall-clock speedup: not measured (oracle is analysis only: the runtime cannot run it)" in out.stdout


def test_a_causal_lm_is_skipped_with_its_reason():
    cfg = OmegaConf.create({"eval": {"speed_sample": 256, "speed_seconds": 3.0}, "backbone": {"kind": "lm"}})
    found = wall_clock(cfg, None, AgentRun.create("static", {"layer": 2}), StaticPolicy(2))
    assert found == {"skipped": "the backbone is a causal LM: exitrl generate measures decoding"}


@pytest.mark.parametrize("override, message", [
    ("eval.speed_sample=-1", "eval.speed_sample=-1 is out of range: it must be >= 0"),
    ("eval.speed_sample=many", "eval.speed_sample='many': expected a whole number"),
    ("eval.speed_seconds=0", "eval.speed_seconds=0 is out of range: it must be > 0"),
    ("+eval.speed_samples=5", "Unknown config key 'eval.speed_samples'"),
])
def test_the_eval_keys_are_checked_before_any_work(override, message):
    with pytest.raises(ValueError) as err:
        planned(override)
    assert message in str(err.value)
