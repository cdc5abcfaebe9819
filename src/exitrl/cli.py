"""What every CLI shares: the config tree shipped in the wheel (``configs/``), the ``agent`` group generated from the
agents' declarations (their options dataclasses are the only defaults, so there is no YAML per agent),
``plugins=[module, ...]`` (imported before anything is composed, so that their agents exist as config options),
and the clean exit on a user error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

from exitrl.agents.registry import agents, load_plugins
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


USER_ERRORS = (DataError, BackboneError, RewardError, ValueError)  # the user can fix these: no traceback


def fail(err: Exception, logger: str = "exitrl") -> None:
    """Report a user error in one line on stderr and exit with status 2."""
    logging.getLogger(logger).error("%s", err)
    print(f"exitrl: error: {err}", file=sys.stderr)
    sys.exit(2)
