"""A served run as the request checks, the metrics and the command line see it, without its model: its own module so
that each of them can name it without importing another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServedRun:
    """One run as the server names and checks it: its folder's name, whether it classifies text pairs (None when
    its task does not say), its task, policy and depth."""

    name: str
    dir: str
    pairs: bool | None
    task: str
    policy: str
    num_layers: int

    @property
    def inputs(self) -> str:
        return {True: "text pairs", False: "single texts", None: "texts"}[self.pairs]

