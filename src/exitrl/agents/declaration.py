"""What an agent declares about itself, once, in its own module: its name, its options (a dataclass whose field
defaults are the only defaults: the ``agent`` config group and ``--help`` are generated from it), its kind, its
trade-off knob with a default grid, whether it needs the held-out split, and one ``fit(options, inputs)``.

Everything else (the registry, option checks, the learned / rule lists, sweep grids, held-out checks) is derived
from these declarations. A module declares an agent by calling `register` at import time::

    AGENT = register(AgentSpec("static", StaticConfig, RULE, Knob("agent.layer"), fit_static, "exit at layer k"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exitrl.core.options import checked_options

if TYPE_CHECKING:
    from exitrl.agents.inputs import FitInputs
    from exitrl.policy import ExitPolicy

LEARNED, RULE, ANALYSIS = "learned", "rule", "analysis"
KINDS = (LEARNED, RULE, ANALYSIS)  # analysis: reads answers it could not have at inference (oracles)
ALPHA_GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # decades apart: the right scale differs by task


@dataclass(frozen=True)
class Knob:
    """The one setting that moves a family along its accuracy / speedup curve, and the values a sweep tries.
    ``grid`` None means the model's layers: 1..L for ``layer``, 1..L−1 for anything else (patience, FREE's
    shallow layer)."""

    key: str  # "reward.alpha" or "agent.<option>"
    grid: tuple | None = None

    @property
    def option(self) -> str:
        return self.key.split(".", 1)[1]

    def describe(self) -> str:
        """The default grid in words (the layer ranges depend on the model)."""
        if self.grid is not None:
            return ", ".join(map(str, self.grid))
        return "1..L" if self.option == "layer" else "1..L-1"

    def values(self, num_layers: int, override: list | None = None) -> list:
        if override:
            return list(override)
        if self.grid is not None:
            return list(self.grid)
        top = num_layers if self.option == "layer" else num_layers - 1
        return list(range(1, top + 1))


@dataclass(frozen=True)
class Curve:
    """An attribute of the *fitted* policy that moves it along a trade-off curve without refitting (REINFORCE's
    threshold on π, ConsistentEE's 0.5): a sweep fits once per knob value and records one point per value here, so
    one trained policy yields a whole curve."""

    attribute: str
    values: tuple


def never(options: Any) -> bool:
    return False


@dataclass(frozen=True)
class AgentSpec:
    """One agent, declared once. ``fit(options, inputs) -> (ExitPolicy, info)``; ``needs_held_out(options)`` says
    whether these options calibrate on examples the backbone never saw."""

    name: str
    options: type
    kind: str
    knob: Knob
    fit: Callable[[Any, FitInputs], tuple[ExitPolicy, dict]]
    summary: str
    needs_held_out: Callable[[Any], bool] = never
    curve: Curve | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"agent {self.name!r}: unknown kind {self.kind!r}; valid: {', '.join(KINDS)}.")
        if not dataclasses.is_dataclass(self.options):
            raise TypeError(f"agent {self.name!r}: options must be a dataclass, got {self.options!r}.")

    def defaults(self) -> dict:
        """Every option's default (``seed`` excluded: runs set it), as the config group shows them."""
        out = {}
        for f in dataclasses.fields(self.options):
            if f.name == "seed" or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def make_options(self, values: dict | None = None, seed: int | None = None) -> Any:
        """The options dataclass from ``values`` (unknown keys and bad values raise a ValueError naming them)."""
        kwargs = checked_options(dict(values or {}), self.options, f"agent={self.name}", "agent.")
        if seed is not None and "seed" in {f.name for f in dataclasses.fields(self.options)}:
            kwargs["seed"] = seed
        try:
            return self.options(**kwargs)
        except TypeError as err:
            raise ValueError(f"agent={self.name}: {err}") from err


_REGISTERED: dict[str, AgentSpec] = {}


def _origin(spec: AgentSpec) -> str:
    return f"{spec.fit.__module__}.{spec.fit.__qualname__}"


def register(spec: AgentSpec) -> AgentSpec:
    """Make ``spec`` known under its name (by any module: built-in agents and plugins alike); returns it."""
    known = _REGISTERED.get(spec.name)
    if known is not None and _origin(known) != _origin(spec):
        raise ValueError(f"Two agents are declared as {spec.name!r}: {known.fit.__module__} and "
                         f"{spec.fit.__module__}; rename one.")
    _REGISTERED[spec.name] = spec
    return spec


def registered() -> dict[str, AgentSpec]:
    """The declarations made so far (`exitrl.agents.registry` imports the built-in ones first)."""
    return _REGISTERED
