"""exitrl: learn when a transformer may stop computing.

Early exiting posed as reinforcement learning: a frozen (or co-trained) multi-exit backbone is traced once,
the trace drives Gymnasium / torch vector envs, and learned agents and classic rules all yield one
:class:`~exitrl.policy.ExitPolicy` that is evaluated under one metric contract.

The Python API (the same pipeline and defaults as the CLIs)::

    import exitrl
    run = exitrl.train("reinforce", "rte", agent_options={"epochs": 10}, reward={"alpha": 0.02})  # -> exitrl.Run
    run.metrics["results"], run.policy
    env = exitrl.make_env("rte", split="train")          # gym env "exitrl/EarlyExit-v0" over the trace
    trace = exitrl.load_trace(run.dir)                   # or a task name, or a trace file
    exitrl.sweep(["reinforce", "confidence"], env="rte"); exitrl.compare("runs/sweep/rte")

Importing exitrl registers ``exitrl/EarlyExit-v0`` with Gymnasium.
"""

import importlib

from exitrl.core.registration import register_env

register_env()  # exitrl/EarlyExit-v0, without importing torch: `exitrl --help` and `import exitrl` stay quick

__version__ = "0.1.0"
_CALLABLE_MODULES = ("train", "sweep", "compare")  # modules that are also the API functions of their CLI
_ATTRIBUTES = {"make_env": "exitrl.api", "load_trace": "exitrl.api", "Run": "exitrl.experiments.runs",
               "load_policy": "exitrl.policy", "ExitPolicy": "exitrl.policy", "RewardSpec": "exitrl.rewards",
               "Trace": "exitrl.traces.trace", "ENV_ID": "exitrl.core.registration"}
__all__ = [*_CALLABLE_MODULES, *_ATTRIBUTES, "__version__"]


def __getattr__(name: str):
    """Load the API on first use (``python -m exitrl.train`` must not find its own module imported already)."""
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"exitrl.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'exitrl' has no attribute {name!r}")
