"""What every CLI shares: the config tree shipped in the wheel (``configs/``), the ``agent`` group generated from the
agents' declarations (their options dataclasses are the only defaults, so there is no YAML per agent),
``plugins=[module, ...]`` (imported before anything is composed, so that their agents exist as config options),
and the clean exit on a user error.
"""

from __future__ import annotations

import logging
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from exitrl.agents.registry import agents, get_agent, load_plugins
from exitrl.backbones import BackboneError
from exitrl.data import DataError
from exitrl.rewards import RewardError

CONFIGS = Path(__file__).parent / "configs"


def plugins_in(argv: list[str]) -> list[str]:
    """The modules named by a ``plugins=`` argument (``plugins=a`` or ``plugins=[a,b]``)."""
    modules = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "plugins":
            modules += [m.strip().strip("'\"") for m in value.strip().strip("[]").split(",") if m.strip()]
    return modules


def register_configs() -> None:
    """One ``agent/<name>`` config per declared agent: its name and its options' defaults."""
    store = ConfigStore.instance()
    for name, spec in agents().items():
        store.store(group="agent", name=name, node={"name": name, **spec.defaults()}, provider="exitrl")


def prepare_cli(argv: list[str]) -> None:
    """Import the plugins named on the command line, then register every agent's config."""
    load_plugins(plugins_in(argv))
    register_configs()


def default_agent() -> str:
    """The agent ``config.yaml``'s defaults list picks when the command line names none."""
    import yaml

    defaults = yaml.safe_load((CONFIGS / "config.yaml").read_text())["defaults"]
    return next(entry["agent"] for entry in defaults if isinstance(entry, dict) and "agent" in entry)


def check_agent_option(agent: str, option: str, typed: str) -> None:
    """``typed`` (the key as the user wrote it) sets ``option``, which agent ``agent`` must have."""
    valid = get_agent(agent).defaults()
    if option.split(".")[0] not in valid:
        raise ValueError(f"{typed}: agent {agent} has no option {option.split('.')[0]!r}; valid: {sorted(valid)}.")


USER_ERRORS = (DataError, BackboneError, RewardError, ValueError)  # the user can fix these: no traceback


def fail(err: Exception, logger: str = "exitrl") -> None:
    """Report a user error in one line on stderr and exit with status 2."""
    if logging.getLogger(logger).hasHandlers():  # a configured log (Hydra's train.log) keeps the error too
        logging.getLogger(logger).error("%s", err)
    print(f"exitrl: error: {err}", file=sys.stderr)
    sys.exit(2)


# -- the Python API's configs: the same tree, defaults and overrides as the command line ---------------------------
def hydra_value(value) -> str:
    """A Python value written as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[\w./:+@~-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides_from(options: dict, prefix: str = "") -> list[str]:
    """``{"reward": {"alpha": 0.02}, "data.limit.train": 64}`` -> ``["reward.alpha=0.02", "data.limit.train=64"]``."""
    out = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += overrides_from(value, f"{name}.")
        else:
            out.append(f"{name}={hydra_value(value)}")
    return out


def compose_config(overrides: list[str]) -> DictConfig:
    """The config a CLI run with these overrides would get (plugins loaded, ``hydra.run.dir`` resolved into
    ``run_dir``); a bad override is a ValueError."""
    prepare_cli(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise ValueError(str(err)) from err
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]  # as the CLI's run function sees it
    cfg["run_dir"] = run_dir
    return cfg


def callable_module(name: str, function: Callable) -> None:
    """Make module ``name`` callable as ``function``: ``exitrl.train(...)`` is the Python API whether Python hands
    out the package's attribute or the submodule, while ``python -m exitrl.train`` stays the CLI."""
    module = sys.modules[name]

    class CallableModule(types.ModuleType):
        __doc__ = module.__doc__

        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    module.__class__ = CallableModule


# -- --help -------------------------------------------------------------------------------------------------------
GROUPS = ("agent", "env", "backbone", "reward", "hydra")  # checked by their own schemas (options, rewards, tasks)
FREE_FORM = ("sweep.grids", "data.limit")  # keys chosen by the user (family names, split names)


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of a composed config outside the groups is one ``config.yaml`` declares: a ``+key=value`` typo
    (``+confidence.treshold=0.5``, ``+data.limits.train=5``) fails naming it instead of being silently ignored."""
    import yaml

    base = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    base.pop("defaults", None)

    def walk(node, declared: dict, path: str) -> None:
        for key in node:
            where = f"{path}{key}"
            if not path and key in GROUPS:
                continue
            if key not in declared:
                raise ValueError(f"Unknown config key {where!r}; valid here: {sorted(declared)}. (A '+' override "
                                 "adds a key exitrl never reads.)")
            if isinstance(declared[key], dict) and where not in FREE_FORM and OmegaConf.is_dict(node[key]):
                walk(node[key], declared[key], f"{where}.")

    walk(cfg, base, "")


def wants_help(argv: list[str]) -> bool:
    return any(arg in ("--help", "-h") for arg in argv)


def config_text(skip: tuple[str, ...] = ("hydra",)) -> str:
    """config.yaml with its comments, without the top-level blocks in ``skip``."""
    blocks, current = [], []
    for line in (CONFIGS / "config.yaml").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and current:
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    kept = [b for b in blocks if not any(b[0].startswith(f"{key}:") for key in skip)]
    return "\n".join("\n".join(b) for b in kept).rstrip()


def groups_text() -> str:
    lines = [f"  agent: {', '.join(agents())}  (plugins=[module] adds more)"]
    for group in ("env", "backbone", "reward"):
        lines.append(f"  {group}: {', '.join(sorted(p.stem for p in (CONFIGS / group).glob('*.yaml')))}")
    return "\n".join(lines)


def agents_text(form: str = "agent.{option}") -> str:
    """Every agent: kind, summary, knob and each option with its default, in the override form ``form``."""
    lines = []
    for name, spec in agents().items():
        lines.append(f"  {name} [{spec.kind}]: {spec.summary}")
        lines.append(f"      knob {spec.knob.key} (sweep grid: {spec.knob.describe()})")
        options = " ".join(f"{form.format(family=name, option=k)}={hydra_value(v)}"
                           for k, v in spec.defaults().items())
        lines.append(f"      {options}")
    return "\n".join(lines)
