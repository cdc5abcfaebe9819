"""Bad input fails before any work, naming the key, the value and what is valid (issue 15's list, as a new user
typed it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_cli import TESTS

from exitrl.cli import USER_ERRORS, compose_config
from exitrl.sweep import split_arguments
from exitrl.train import plan


def planned(*overrides: str):
    cfg = compose_config(["env=rte", *overrides])
    cfg.pop("run_dir")
    return plan(cfg)


@pytest.mark.parametrize("override, message", [
    ("agent.epochs=ten", "agent.epochs='ten': expected a whole number"),
    ("agent.epochs=0", "agent.epochs=0 is out of range: it must be >= 1"),
    ("agent.lr=-0.001", "agent.lr=-0.001 is out of range: it must be > 0"),
    ("agent.eps_start=1.5", "agent.eps_start=1.5 is out of range: it must be in [0, 1]"),
    ("reward.alpha=abc", "reward.alpha='abc': expected a number"),
    ("reward.alpha=-1", "reward.alpha=-1 is out of range"),
    ("reward.alpha=inf", "reward.alpha=inf: expected a finite number"),
    ("reward.depth=deep", "reward.depth='deep'"),
    ("reward.fn=example_rewards:only_layer_two", "use reward=custom reward.fn="),
    ("device=gpu", "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    ("threads=0", "threads must be a whole number >= 1"),
    ("seed=abc", "seed='abc': expected a whole number"),
    ("data.policy_split=1", "data.policy_split=1 is out of range: it must be in [0, 1)"),
    ("data.limit.train=0", "data.limit.train=0 is out of range"),
    ("data.crossfit=1", "data.crossfit=1 must be 0 (off) or a number of folds >= 2"),
    ("backbone.finetune.batch_size=0", "backbone.finetune.batch_size=0 is out of range"),
    ("backbone.finetune.lr=fast", "backbone.finetune.lr='fast': expected a number"),
    ("cotrain.epochs=x", "cotrain.epochs='x': expected a whole number"),
    ("checkpoint.every_seconds=-1", "checkpoint.every_seconds=-1 is out of range: it must be >= 0"),
    ("confidence_threshold=2", "confidence_threshold=2 is out of range"),
    ("+confidence.treshold=0.5", "Unknown config key 'confidence'"),
    ("+data.limits.train=5", "Unknown config key 'data.limits'"),
    ("learn_on=everything", "Unknown learn_on 'everything'"),
])
def test_train_refuses_bad_values_naming_the_key(override, message):
    with pytest.raises(USER_ERRORS) as err:
        planned(override)
    assert message in str(err.value)


@pytest.mark.parametrize("agent, override, message", [
    ("confidence", "agent.threshold=high", "agent.threshold='high': expected a number"),
    ("confidence", "agent.threshold=1.2", "a maxprob threshold must lie in [0, 1], got 1.2"),
    ("ppo", "agent.net_arch=[64,0]", "agent.net_arch=0 is out of range: it must be >= 1"),
    ("bandit_ucb", "agent.thresholds=[0.5,x]", "agent.thresholds='x': expected a number"),
    ("calm", "agent.temperature=maybe", "agent.temperature='maybe': expected true or false"),
])
def test_agent_options_are_typed_and_ranged(agent, override, message):
    with pytest.raises(ValueError) as err:
        planned(f"agent={agent}", override, "data.policy_split=0.2")
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["agent=confidence,static", "+confidence.treshold=0.5"], "agent confidence has no option 'treshold'"),
    (["agent=confidence", "reinforce.epochs=3"], "reinforce is not one of the swept families"),
    (["agent=static", "sweep.grids.static=a"], "must be a non-empty list"),
])
def test_sweep_arguments_are_checked(argv, message):
    with pytest.raises(ValueError) as err:
        split_arguments(argv)
    assert message in str(err.value)


def test_the_cli_fails_before_any_work(tmp_path):
    """Through the real command line: status 2, one line naming the key, and nothing fine-tuned or cached."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EXITRL_CACHE_DIR": str(tmp_path / "cache")}
    for module, args, message in [  # a bad value the grid holds, a layer the backbone lacks (values: planned())
        ("exitrl.sweep", ["agent=confidence,static", "sweep.grids.static=[a,b]"], "agent.layer='a'"),
        ("exitrl.train", ["agent=static", "agent.layer=7"], "agent.layer=7 is not a layer of this backbone"),
    ]:
        out = subprocess.run([sys.executable, "-m", module, "env=rte", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "cache").exists()


def test_a_layer_the_backbone_lacks_is_named_with_the_valid_ones():
    from exitrl.experiments.pipeline import check_depth

    check_depth("static", {"layer": 3}, 3)
    with pytest.raises(ValueError, match=r"agent=static: layer=99 is not a layer of this backbone; valid: 1\.\.3"):
        check_depth("static", {"layer": 99}, 3, where="")  # a sweep grid's point
    with pytest.raises(ValueError, match="agent.shallow_layer=0 is not a layer"):
        check_depth("free", {"shallow_layer": 0}, 3)


def test_measure_dependent_thresholds_and_numeric_grids_are_accepted():
    planned("agent=confidence", "agent.measure=entropy", "agent.threshold=1.05")  # nats: above 1 is valid
    planned("agent=calm", "agent.measure=saturation", "agent.threshold=-0.5", "data.policy_split=0.2")
    planned("backbone.finetune.warmup_ratio=null", "backbone.finetune.layerskip_e_scale=0")
    with pytest.raises(ValueError, match="agent.prior_std=0 is out of range"):
        planned("agent=bandit_ucb", "agent.prior_std=0")
    assert split_arguments(["agent=reinforce", "sweep.grids.reinforce=[1e-3,3e-3]"]).grids["reinforce"] == [0.001,
                                                                                                         0.003]


def test_an_option_of_another_agent_is_named_before_hydra_runs():
    from exitrl.train import check_agent_overrides

    check_agent_overrides(["agent=ppo", "agent.total_timesteps=4096"])
    with pytest.raises(ValueError, match="agent.epochs: agent ppo has no option 'epochs'; valid: .*'total_timesteps'"):
        check_agent_overrides(["agent=ppo", "agent.epochs=3"])
    with pytest.raises(ValueError, match="agent reinforce has no option 'treshold'"):
        check_agent_overrides(["+agent.treshold=0.5"])
