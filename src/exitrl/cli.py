"""What every CLI shares: the config tree shipped in the wheel (``configs/``), the ``agent`` group generated from the
agents' declarations (their options dataclasses are the only defaults, so there is no YAML per agent),
``plugins=[module, ...]`` (imported before anything is composed, so that their agents exist as config options),
the clean exit on a user error (one line, status 2), on Ctrl-C (one line, status 130) and after a failed run (its
half-written folder removed), a key typo named with the closest valid key, and ``--threads``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from exitrl.agents.registry import agents, get_agent, load_plugins
from exitrl.backbones import BackboneError
from exitrl.core.threads import busy_warning, check_threads
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


def closest(name: str, candidates) -> str:
    """`` Did you mean 'x'?`` for the candidate nearest ``name`` (difflib), else ``''``."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {found[0]!r}?" if found else ""


def check_agent_option(agent: str, option: str, typed: str) -> None:
    """``typed`` (the key as the user wrote it) sets ``option``, which agent ``agent`` must have."""
    valid = get_agent(agent).defaults()
    name = option.split(".")[0]
    if name not in valid:
        raise ValueError(f"{typed}: agent {agent} has no option {name!r}; valid: {sorted(valid)}."
                         f"{closest(name, valid)}")


USER_ERRORS = (DataError, BackboneError, RewardError, ValueError)  # the user can fix these: no traceback


def log_to_files(logger: str, level: int, message: str) -> None:
    """``message`` into the log files configured for ``logger`` (Hydra's train.log) only: the terminal gets it once,
    from the caller."""
    node = logging.getLogger(logger)
    record = node.makeRecord(node.name, level, __file__, 0, message, None, None)
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        node = node.parent if node.propagate else None


def fail(err: Exception, logger: str = "exitrl") -> NoReturn:
    """Report a user error in one line on stderr and exit with status 2."""
    log_to_files(logger, logging.ERROR, str(err))  # a configured log (Hydra's train.log) keeps the error too
    print(f"exitrl: error: {err}", file=sys.stderr)
    sys.exit(2)


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def interrupted(hint: str = "", logger: str = "exitrl") -> NoReturn:
    """Ctrl-C: one line (``interrupted`` and what to do next) instead of a traceback, status 130."""
    line = f"interrupted{'; ' + hint if hint else ''}"
    log_to_files(logger, logging.WARNING, line)
    print(f"\nexitrl: {line}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


RUN_FILES = (".hydra", "train.log")  # what Hydra writes into a run folder before the run starts


def folder_entries(run_dir: Path) -> set[str]:
    """What a run folder holds before the run writes into it, Hydra's own files aside (see `discard_failed_run`)."""
    return {p.name for p in run_dir.iterdir() if p.name not in RUN_FILES} if run_dir.is_dir() else set()


def discard_failed_run(run_dir: Path, kept: set[str]) -> bool:
    """After a failed run, remove what it wrote into ``run_dir`` (everything but the entries ``kept``, which were
    there before) and the folder itself when nothing else is left, so no half-written run lingers for ``compare``
    and TensorBoard to find. A folder with a checkpoint stays whole (``resume=`` continues it). True if removed."""
    if not run_dir.is_dir() or any(run_dir.glob("checkpoint_*.pt")):
        return False
    for entry in run_dir.iterdir():
        if entry.name not in kept:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if any(run_dir.iterdir()):
        return False
    run_dir.rmdir()
    return True


def add_threads_option(parser: argparse.ArgumentParser, phase: str) -> None:
    """``--threads N|auto`` on an argparse CLI (`exitrl.core.threads`; ``auto`` runs this CLI's work as ``phase``)."""
    counts = {"backbone": "all cores", "policy": "1"}

    def threads(text: str):
        try:
            return check_threads(text, "--threads")
        except ValueError:
            raise argparse.ArgumentTypeError(f"--threads must be a whole number >= 1 or auto ({counts[phase]} "
                                             f"for this work); got {text!r}.") from None

    parser.add_argument("--threads", type=threads, default="auto", metavar="N",
                        help=f"torch CPU threads: a number, or auto ({counts[phase]} for this work; the default)")


def warn_if_busy(threads) -> None:
    """The once-per-process warning of `exitrl.core.threads.busy_warning`, logged too when a log is configured."""
    line = busy_warning(threads)
    if line:
        log_to_files("exitrl", logging.WARNING, line.removeprefix("exitrl: warning: "))


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
    check_override_keys(overrides)
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


# -- a key typo: exitrl's one line, not Hydra's advice to add '+' -------------------------------------------------
def key_paths(node, prefix: str = "") -> list[str]:
    """Every dotted key of a plain nested dict."""
    paths = []
    for key, value in node.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, dict):
            paths += key_paths(value, f"{prefix}{key}.")
    return paths


def check_override_keys(overrides: list[str], command: str = "exitrl train") -> None:
    """A ``key=value`` override of a key the config lacks (``reward.alpah=0.1``, ``bogus=1``) is a ValueError naming
    it and the closest valid key. The config is composed with the overrides' group choices; when that fails (an
    unknown group option) or an override does not parse, Hydra's own clear error is left to say so."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException:
        return
    groups = {"agent", *(p.name for p in CONFIGS.iterdir() if p.is_dir())}

    def is_group(override) -> bool:
        return override.key_or_group in groups or "/" in override.key_or_group

    choices = []
    for override in parsed:
        if is_group(override) and override.type == OverrideType.CHANGE:
            value = (next(iter(override.sweep_string_iterator())) if override.is_sweep_override()
                     else override.get_value_element_as_str())
            choices.append(f"{override.get_key_element()}={value}")
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            cfg = compose("config", overrides=choices, return_hydra_config=True)
    except Exception:  # an unknown group option: Hydra names the valid ones
        return
    plain = OmegaConf.to_container(cfg, resolve=False)
    for override in parsed:
        if override.type != OverrideType.CHANGE or override.package is not None or is_group(override):
            continue
        key, node, parent = override.key_or_group, plain, ""
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node, parent = node[int(part)], f"{parent}{part}."
            elif isinstance(node, dict) and part in node:
                node, parent = node[part], f"{parent}{part}."
            else:
                break
        else:
            continue
        candidates = [p for p in key_paths(plain) if (key.startswith("hydra") or not p.startswith("hydra"))
                      and not key.startswith(f"{p}.")]  # never the existing part of the key itself
        rest, siblings = key[len(parent):], [p[len(parent):] for p in candidates if p.startswith(parent)]
        found = ([parent + f for f in difflib.get_close_matches(rest, siblings, n=1, cutoff=0.6)]  # a typo here
                 or difflib.get_close_matches(key, [p for p in candidates if parent and not p.startswith(parent)],
                                              n=1, cutoff=0.6)  # or under another parent
                 or [p for p in candidates if p.endswith(f".{key}")][:3])  # or the full name of a short key
        here = sorted(k for k in node if k != "hydra") if isinstance(node, dict) else []  # the deepest known parent
        hint = (f"did you mean {' or '.join(repr(f) for f in found)}?" if found else
                f"valid {'keys under ' + repr(parent.rstrip('.')) if parent else 'top-level keys'}: {here}.")
        if parent and isinstance(node, dict) and not node:  # a place for keys of the user's choosing
            hint = f"{parent.rstrip('.')} takes keys of your choosing: add one with +{override.input_line}."
        raise ValueError(f"Unknown config key {key!r} ({override.input_line}): {hint} `{command} --help` lists "
                         "every key.")


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
