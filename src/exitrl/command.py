"""The ``exitrl`` command: ``exitrl train|sweep|compare|predict|generate|export|serve ...`` runs the CLI of
``python -m exitrl.<name>`` with the same arguments (``exitrl train agent=reinforce env=rte`` is
``python -m exitrl.train agent=reinforce env=rte``). A subcommand's module is imported only when it runs, so
``exitrl --help`` and ``exitrl --version`` stay fast.
"""

from __future__ import annotations

import difflib
import os
import runpy
import sys

COMMANDS = {  # name: what it does, in one line
    "train": "fine-tune (or reuse) a backbone, trace it, train an exit policy, evaluate it beside the baselines",
    "sweep": "run policy families over their trade-off knob on one backbone and one trace, then compare them",
    "compare": "compare the runs under a folder: AUC, best accuracy at a speedup, trade-off plots",
    "predict": "classify a file with a run's backbone and exit policy (real early exits)",
    "generate": "decode prompts with a causal LM and an early-exit method (calm, free, selfspec, policy)",
    "export": "copy a run's backbone and trace into its folder, so it reloads without the cache",
    "serve": "answer HTTP requests with runs' early exits (LitServe: dynamic batching, /health, /metrics)",
}


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items())
    return f"""usage: exitrl <command> [arguments ...]
       exitrl <command> --help        (that command's own help)
       exitrl --version

Learn when a transformer may stop computing: early exiting as reinforcement learning.

commands:
{lines}

Each command is also `python -m exitrl.<command>`. Ctrl-C ends a command with one line and status 130; bad input
with one line and status 2. A run on a busy CPU: threads=1 (train, sweep) or --threads 1."""


def version() -> str:
    from exitrl import __version__

    return f"exitrl {__version__}"


def run_command(name: str, arguments: list[str]) -> None:
    """Run subcommand ``name`` exactly as ``python -m exitrl.<name> arguments`` would: the module runs as
    ``__main__`` with ``sys.argv`` set as Python sets it (Hydra reads the overrides, ``--help``, ``-m`` there, and
    finds its configs beside the module's file), and the current folder first on ``sys.path``, so that a reward or
    plugin module in it (``reward.fn=my_rewards:fn``) imports as it does under ``python -m``. Its exit status leaves
    through ``SystemExit``."""
    sys.argv = [sys.argv[0], *arguments]
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    runpy.run_module(f"exitrl.{name}", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(help_text())
        sys.exit(0 if arguments else 2)
    if arguments[0] in ("-V", "--version"):
        print(version())
        sys.exit(0)
    name, rest = arguments[0], arguments[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        print(f"exitrl: error: unknown command {name!r}; {hint}commands: {', '.join(COMMANDS)} (exitrl --help).",
              file=sys.stderr)
        sys.exit(2)
    try:
        run_command(name, rest)
    except KeyboardInterrupt:  # before the command's own handler runs (while importing it, say)
        print("\nexitrl: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
