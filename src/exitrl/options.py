"""Config sections become dataclass keyword arguments here, so a mistyped key fails with the valid ones named."""

from __future__ import annotations

from dataclasses import fields


def checked_options(options, config_class, where: str) -> dict:
    """``options`` (a dict or an OmegaConf node) as keyword arguments for ``config_class``; ``name`` is ignored and
    ``seed`` is left to the caller. An unknown key raises a ValueError that lists the valid ones."""
    if not isinstance(options, dict):
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(options, resolve=True)
    valid = {f.name for f in fields(config_class)} - {"seed"}
    unknown = sorted(set(options) - valid - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(valid)}.")
    return {k: v for k, v in options.items() if k in valid}
