"""Each default lives in one place: agent options in their dataclasses (the ``agent`` config group is generated from
them), reward defaults in the reward functions' signatures, co-training and fine-tuning options in their
dataclasses. These tests fail when a YAML default and the code disagree, or when an agent is declared anywhere but
in its own module."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from exitrl.agents.declaration import ANALYSIS, LEARNED, RULE
from exitrl.agents.registry import agents, analysis_agents, check_agent, learned_agents, rules
from exitrl.backbones import FinetuneConfig
from exitrl.backbones.recipes import RECIPE_OPTIONS
from exitrl.cli import CONFIGS, plugins_in, register_configs
from exitrl.experiments.cotraining import CotrainConfig
from exitrl.rewards import BUILTIN_REWARDS


def compose_with(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=list(overrides))


def test_every_agent_is_declared_once_with_a_generated_config():
    assert not (CONFIGS / "agent").exists()  # no YAML that could drift from the dataclasses
    assert set(learned_agents()) == {"reinforce", "ppo", "ppo_torchrl", "bandit_ucb", "bandit_thompson", "linucb",
                                     "exit_scorer", "stopping"}
    assert set(rules()) == {"confidence", "confidence_per_layer", "static", "patience", "calm", "free", "lte"}
    assert analysis_agents() == ("oracle",)
    for name, spec in agents().items():
        assert spec.kind in (LEARNED, RULE, ANALYSIS) and spec.fit.__module__.startswith("exitrl.agents.")
        composed = OmegaConf.to_container(compose_with(f"agent={name}").agent, resolve=True)
        assert composed == {"name": name, **spec.defaults()}, name
        check_agent(name, spec.defaults())  # the defaults are valid options


def test_reward_yaml_defaults_are_the_functions_defaults():
    for name, function in BUILTIN_REWARDS.items():
        yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / "reward" / f"{name}.yaml"))
        defaults = {k: p.default for k, p in inspect.signature(function).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        assert yaml.pop("name") == name and yaml.pop("fn") is None
        assert yaml == defaults, name


def test_cotrain_and_finetune_yaml_defaults_are_the_dataclasses():
    cotrain = OmegaConf.to_container(compose_with().cotrain)
    assert cotrain == {f.name: f.default for f in fields(CotrainConfig) if f.name != "seed"}
    finetune_defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    for path in (CONFIGS / "backbone").glob("*.yaml"):
        finetune = OmegaConf.to_container(OmegaConf.load(path).finetune)
        assert set(finetune) <= set(finetune_defaults), path.name
        for option in RECIPE_OPTIONS:  # per-backbone presets may differ; recipe options may not
            assert finetune[option] == finetune_defaults[option], (path.name, option)


def test_plugins_are_read_from_the_command_line():
    assert plugins_in(["agent=x", "plugins=[a,b.c]"]) == ["a", "b.c"]
    assert plugins_in(["plugins=a"]) == ["a"] and plugins_in(["agent=x"]) == []
    from exitrl.agents.registry import load_plugins

    with pytest.raises(ValueError, match="no_such_module"):
        load_plugins(["no_such_module"])


def test_an_agent_whose_package_is_missing_is_skipped_and_named():
    """Without torchrl the other agents still load, and asking for ppo_torchrl says what to install."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torchrl'] = None\n"
            "from exitrl.agents.registry import agent_names, get_agent\n"
            "names = agent_names(); assert 'ppo_torchrl' not in names and 'reinforce' in names, names\n"
            "try:\n    get_agent('ppo_torchrl')\nexcept ValueError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "needs the package 'torchrl'" in out.stdout and "pip install torchrl" in out.stdout
