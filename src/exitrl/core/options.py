"""Config sections become dataclass keyword arguments here, checked before any work starts: a mistyped key fails
with the valid ones named, a value of the wrong type or out of range with the key, the value and what is valid.

Types come from the dataclass's annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``list[X]``);
ranges from the option's name (`RANGES`), declared once for every agent, recipe and co-training option alike.
(``threshold`` has none here: its range depends on the measure, entropy in nats or a cosine, and the agents check
it themselves.)
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import fields, is_dataclass

# Valid ranges by option name: (low, high, low inclusive, high inclusive); an element-wise range for list options.
AT_LEAST_ONE = (1, math.inf, True, False)
NON_NEGATIVE = (0, math.inf, True, False)
POSITIVE = (0, math.inf, False, False)
UNIT = (0, 1, True, True)
UNIT_OPEN_TOP = (0, 1, True, False)
RANGES: dict[str, tuple] = {
    **{name: AT_LEAST_ONE for name in (
        "batch_size", "epochs", "eval_every", "folds", "frames_per_batch", "hidden", "layerskip_rotation", "log_every",
        "max_length", "max_pairs", "meta_batch_size", "meta_epochs", "meta_hidden", "minibatch_size", "n_envs",
        "n_epochs", "n_steps", "num_envs", "patience", "refit_every", "rounds", "samples", "steps", "total_frames",
        "total_timesteps", "layer", "shallow_layer", "net_arch", "num_cells", "rotation", "workers")},
    **{name: NON_NEGATIVE for name in (
        "head_epochs", "freeze_layers", "cost_weight", "weight_decay", "ent_coef", "entropy_coef", "keep_weighted_ce",
        "bonus", "ucb_c", "distill_weight", "alpha", "layerskip_e_scale", "every_seconds", "speed_sample")},
    **{name: POSITIVE for name in ("lr", "head_lr", "meta_lr", "clip_norm", "eps_decay", "ridge", "prior_std",
                                   "speed_seconds")},
    **{name: UNIT for name in ("eps_start", "eps_end", "gae_lambda", "clip_range", "clip_epsilon", "layerskip_p_max",
                               "thresholds", "blends", "confidence_threshold")},
    **{name: UNIT_OPEN_TOP for name in ("warmup_ratio", "policy_split")},
}


def describe(bounds: tuple) -> str:
    low, high, low_in, high_in = bounds
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_range(key: str, value, where: str = "") -> None:
    """``value`` (a number) within the range `RANGES` declares for the option named ``key`` (its last part)."""
    bounds = RANGES.get(key.rsplit(".", 1)[-1])
    if bounds is None or value is None or isinstance(value, (bool, str)):
        return
    low, high, low_in, high_in = bounds
    inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    if not inside:
        raise ValueError(f"{where}{key}={value!r} is out of range: it must be {describe(bounds)}.")


def type_name(hint) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def check_value(key: str, value, hint, where: str = "") -> object:
    """``value`` checked against the annotation ``hint`` and the range of ``key``; returns it (ints stay ints, an
    int where a float is expected becomes a float). A ValueError names ``where``, the key, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_value(key, value, options[0], where)
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}{key}={value!r}: expected a list, e.g. {key}=[1,2].")
        element = args[0] if args else None
        checked = [check_value(key, v, element, where) if element is not None else v for v in value]
        return type(value)(checked) if isinstance(value, tuple) else checked
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}{key}={value!r}: expected true or false.")
        return value
    if hint in (int, float):
        wrong = isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float))
        if wrong:
            raise ValueError(f"{where}{key}={value!r}: expected {type_name(hint)}.")
        if not math.isfinite(value):
            raise ValueError(f"{where}{key}={value!r}: expected a finite number.")
        check_range(key, value, where)
        return float(value) if hint is float else value
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}{key}={value!r}: expected a string.")
    return value


def checked_options(options, config_class, where: str, keys: str = "") -> dict:
    """``options`` (a dict or an OmegaConf node) as keyword arguments for ``config_class`` (a dataclass, or any
    class by its constructor's parameters); ``name`` is ignored and ``seed`` is left to the caller. An unknown key
    raises a ValueError that lists the valid ones; a value of the wrong type or out of range one that names it
    (as ``keys`` + its name: ``agent.epochs``)."""
    if not isinstance(options, dict):
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(options, resolve=True)
    names = [f.name for f in fields(config_class) if f.init] if is_dataclass(config_class) else list(
        inspect.signature(config_class).parameters)
    valid = set(names) - {"seed"}
    unknown = sorted(set(options) - valid - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(valid)}.")
    hints = typing.get_type_hints(config_class) if is_dataclass(config_class) else {}
    prefix = f"{where}: " if where else ""
    return {k: check_value(keys + k, v, hints[k], prefix) if k in hints else v
            for k, v in options.items() if k in valid}
