"""The ``exitrl`` command through real subprocesses: ``--help``, ``--version``, each subcommand's own help, an
unknown subcommand; and a key typo answered with exitrl's one line and the closest valid key (issue 28)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_cli import TESTS

import exitrl
from exitrl.command import COMMANDS

ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}


def exitrl_command(*arguments: str, script: bool = False, cwd=None) -> subprocess.CompletedProcess:
    """``exitrl ...`` as the console script (``script``) or as ``python -m exitrl``."""
    start = [shutil.which("exitrl")] if script else [sys.executable, "-m", "exitrl"]
    return subprocess.run([*start, *arguments], env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_console_script_gives_version_and_help():
    assert shutil.which("exitrl"), "the exitrl console script is not installed: pip install -e ."
    version = exitrl_command("--version", script=True)
    assert version.returncode == 0 and version.stdout.strip() == f"exitrl {exitrl.__version__}"
    shown = exitrl_command("--help", script=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: exitrl <command>")
    for name, summary in COMMANDS.items():  # every subcommand, one line each
        assert f"  {name}" in shown.stdout and summary in shown.stdout
    bare = exitrl_command()
    assert bare.returncode == 2 and "commands:" in bare.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_gives_its_own_help(name):
    through_command = exitrl_command(name, "--help")
    assert through_command.returncode == 0, through_command.stderr[-2000:]
    assert "usage:" in through_command.stdout and "Traceback" not in through_command.stderr
    if name in ("predict", "compare", "generate", "export", "serve"):
        assert "--threads N" in through_command.stdout
    if name in ("train", "predict"):  # a Hydra app and an argparse one: the same CLI either way
        direct = subprocess.run([sys.executable, "-m", f"exitrl.{name}", "--help"], env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert direct.returncode == 0 and direct.stdout == through_command.stdout


def test_hydra_sees_its_own_flags_through_the_command():
    shown = exitrl_command("train", "--hydra-help")
    assert shown.returncode == 0 and "Hydra" in shown.stdout, shown.stderr[-2000:]


def test_an_unknown_subcommand_names_the_closest():
    out = exitrl_command("trian", "agent=reinforce")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "exitrl: error: unknown command 'trian'; did you mean 'train'? commands: train, sweep, compare, predict, "
        "generate, export, serve (exitrl --help)."]


@pytest.mark.parametrize("arguments, expected", [  # through real processes; every message: test_key_typos_in_process
    (["train", "reward.alpah=0.1"], "Unknown config key 'reward.alpah' (reward.alpah=0.1): did you mean "
                                    "'reward.alpha'?"),
    (["sweep", "agent=confidence", "reward.alpah=0.1"], "did you mean 'reward.alpha'? `exitrl sweep --help`"),
])
def test_a_key_hydra_rejects_gets_one_line_with_the_closest_key(tmp_path, arguments, expected):
    out = exitrl_command(*arguments, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("exitrl: error: "), out.stderr[-2000:]
    assert expected in lines[0] and "+" not in lines[0].split(":", 2)[2].split("(")[0]
    assert "To append to your config use" not in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_group_option_keeps_hydras_list(tmp_path):
    out = exitrl_command("train", "reward=nope", cwd=tmp_path)
    assert out.returncode != 0 and "Could not find 'reward/nope'" in out.stderr and "hardness" in out.stderr


def test_key_typos_in_process():
    from exitrl.cli import check_override_keys, prepare_cli

    prepare_cli([])
    check_override_keys(["reward.alpha=0.1", "agent=ppo", "agent.n_steps=64", "data.limit.train=8", "+foo=1",
                         "hydra.run.dir=x", "hydra/launcher=joblib", "env=sst2", "baselines=[static]"])
    check_override_keys(["reward=custom", "reward.fn=a:b", "+reward.kwargs.bonus=2"])  # the chosen option's keys
    with pytest.raises(ValueError, match=r"reward.kwargs takes keys of your choosing: add one with "
                                         r"\+reward.kwargs.bonus=2\."):
        check_override_keys(["reward=custom", "reward.kwargs.bonus=2"])
    with pytest.raises(ValueError, match="'reward.alpha' \\(reward.alpha=0.1\\)"):  # custom rewards take kwargs
        check_override_keys(["reward=custom", "reward.alpha=0.1"])
    for overrides, message in [
        (["reward.alpah=0.1"], "'reward.alpah' (reward.alpah=0.1): did you mean 'reward.alpha'?"),
        (["lr=0.1"], "did you mean 'agent.lr' or 'backbone.finetune.lr' or 'cotrain.lr'?"),
        (["env=sst2", "data.limit.trian=3"], "did you mean 'data.limit.train'?"),
        (["hydra.run.dirr=x"], "did you mean 'hydra.run.dir'?"),
        (["cotrain.zzz=1"], "valid keys under 'cotrain': ['batch_size', "),
        (["bogus=1"], "Unknown config key 'bogus' (bogus=1): valid top-level keys: ['agent', "),
    ]:
        with pytest.raises(ValueError) as err:
            check_override_keys(overrides)
        assert message in str(err.value)
    check_override_keys(["reward=nope", "x=1"])  # an unknown group option: Hydra's error names the valid ones
    from exitrl.sweep import split_arguments
    from exitrl.train import check_agent_overrides

    with pytest.raises(ValueError, match=r"agent.epochz: agent reinforce has no option 'epochz'; valid: \['batch_"):
        check_agent_overrides(["agent.epochz=3"])

    with pytest.raises(ValueError, match=r"reinforce.epochz: agent reinforce has no option 'epochz'; valid: "
                                         r"\[.*\]\. Did you mean 'epochs'\?$"):
        split_arguments(["agent=reinforce", "reinforce.epochz=3"])
    with pytest.raises(ValueError, match=r"ppo.epochs: agent ppo has no option 'epochs'; .* Did you mean 'n_epochs'"):
        split_arguments(["agent=ppo", "ppo.epochs=3"])
    with pytest.raises(ValueError, match="did you mean 'reward.alpha'"):
        exitrl.train("confidence", "rte", overrides=["reward.alpah=0.1"])  # the Python API: the same check


def test_a_module_in_the_current_folder_imports_as_under_python_m(tmp_path):
    """A user's reward or plugin file beside them (``reward.fn=my_rewards:fn``, ``plugins=[my_agent]``) imports
    through the console script as it does through ``python -m exitrl.train``, which puts the current folder first."""
    (tmp_path / "cwd_toy_agent.py").write_text((TESTS / "toy_agent.py").read_text())
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # an empty PYTHONPATH entry would add the folder too
    shown = subprocess.run([shutil.which("exitrl"), "train", "plugins=[cwd_toy_agent]", "--help"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "toy rule for the plugin test" in shown.stdout
