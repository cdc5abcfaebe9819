"""Config sections become dataclass keyword arguments here, so a mistyped key fails with the valid ones named."""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass


def checked_options(options, config_class, where: str) -> dict:
    """``options`` (a dict or an OmegaConf node) as keyword arguments for ``config_class`` (a dataclass, or any
    class by its constructor's parameters); ``name`` is ignored and ``seed`` is left to the caller. An unknown key
    raises a ValueError that lists the valid ones."""
    if not isinstance(options, dict):
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(options, resolve=True)
    names = [f.name for f in fields(config_class) if f.init] if is_dataclass(config_class) else list(
        inspect.signature(config_class).parameters)
    valid = set(names) - {"seed"}
    unknown = sorted(set(options) - valid - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(valid)}.")
    return {k: v for k, v in options.items() if k in valid}
