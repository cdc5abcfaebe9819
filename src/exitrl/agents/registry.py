"""Every agent by name: the declarations of the built-in agent modules (each module of this package that calls
`exitrl.agents.declaration.register`, found by listing the package, so adding an agent touches only its own file)
and of any plugin module named with ``plugins=[module, ...]``. The lists of learned agents and rules, option checks
and held-out checks are all read off the declarations."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import exitrl.agents
from exitrl.agents.declaration import ANALYSIS, KINDS, LEARNED, RULE, AgentSpec, registered

_loaded = False
_unavailable: dict[str, str] = {}  # built-in agent module -> the third-party package it could not import


def _load_builtin() -> None:
    """Import every built-in agent module. One whose third-party package is missing (torchrl on a machine without
    it) is skipped and remembered, so the other agents still work and asking for it says what to install."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(exitrl.agents.__path__):  # modules that declare nothing are harmless
            try:
                importlib.import_module(f"exitrl.agents.{module.name}")
            except ModuleNotFoundError as err:
                if not err.name or err.name.split(".")[0] == "exitrl":
                    raise
                _unavailable[module.name] = err.name.split(".")[0]
        _loaded = True


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import user modules that declare agents (``plugins=[mypkg.my_agent]``); a module that cannot be imported
    is a ValueError that names it."""
    for name in modules or ():
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"plugins: cannot import {name!r} ({err}); is it on PYTHONPATH?") from err


def agents() -> dict[str, AgentSpec]:
    """Every declared agent: learned ones, then rules, then analysis-only ones, each by name."""
    _load_builtin()
    return dict(sorted(registered().items(), key=lambda item: (KINDS.index(item[1].kind), item[0])))


def agent_names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(name for name, spec in agents().items() if kind is None or spec.kind == kind)


def learned_agents() -> tuple[str, ...]:
    return agent_names(LEARNED)


def rules() -> tuple[str, ...]:
    """Deployable fixed or fitted rules: what ``baselines=[...]`` may name."""
    return agent_names(RULE)


def analysis_agents() -> tuple[str, ...]:
    return agent_names(ANALYSIS)


def get_agent(name: str) -> AgentSpec:
    """The declaration of ``name``; an unknown name is a ValueError that lists the valid ones."""
    known = agents()
    if name not in known:
        if name in _unavailable:
            raise ValueError(f"Agent {name!r} needs the package {_unavailable[name]!r}, which is not installed: "
                             f"pip install {_unavailable[name]}.")
        raise ValueError(f"Unknown agent {name!r}; valid agents: {', '.join(known)}.")
    return known[name]


def check_agent(name: str, options: dict | None = None, seed: int | None = None) -> Any:
    """The validated options of agent ``name`` (a ValueError names any unknown agent, option or bad value)."""
    return get_agent(name).make_options(options, seed)


def needs_held_out(name: str, options: dict | None = None) -> bool:
    """Whether agent ``name`` with these options calibrates on examples the backbone never saw."""
    spec = get_agent(name)
    return spec.needs_held_out(spec.make_options(options))
