"""`Run`: one run folder as a Python object: its record, its policy, and the trace and backbone it needs, whether
they sit in the folder (exported with ``python -m exitrl.export``) or in the cache under their content keys."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from exitrl.core.cache import cache_dir
from exitrl.experiments.record import FILE_NAME, RunRecord
from exitrl.policy import ExitPolicy, load_policy
from exitrl.traces.trace import Trace

TRACE_FILE = "trace.pt"  # an exported trace, inside the run folder
BACKBONE_DIR = "backbone"  # the co-trained or exported backbone, inside the run folder
@dataclass
class Run:
    dir: Path

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        run_dir = Path(run_dir)
        if not (run_dir / FILE_NAME).is_file():
            raise ValueError(f"{run_dir} is not an exitrl run folder (no {FILE_NAME}).")
        return cls(run_dir)

    @cached_property
    def record(self) -> RunRecord:
        return RunRecord.read(self.dir / FILE_NAME)

    @property
    def metrics(self) -> dict:
        """metrics.json as a dict (`exitrl.experiments.record` documents the fields)."""
        return self.record.to_dict()

    @property
    def results(self) -> dict:
        return self.record.results

    @cached_property
    def policy(self) -> ExitPolicy:
        return load_policy(self.dir / "policy.pt")

    def trace_path(self, cache: str | Path | None = None) -> Path:
        """The run's trace: the exported copy in the folder, else the cache entry under its content key."""
        if (self.dir / TRACE_FILE).is_file():
            return self.dir / TRACE_FILE
        if "trace" in self.record.backbone:  # a sweep of a saved trace file
            return Path(self.record.backbone["trace"]).expanduser()
        key = self.record.trace_key
        found = sorted((cache_dir(cache) / "traces").glob(f"*-{key}.pt")) if key else []
        if not found:
            raise ValueError(f"The trace of {self.dir} (key {key}) is neither in the folder nor in the cache "
                             f"{cache_dir(cache)}: rerun the run's config (config.yaml) to rebuild it, or export the "
                             f"run where it was made: python -m exitrl.export {self.dir}.")
        return found[0]

    def trace(self, cache: str | Path | None = None) -> Trace:
        return Trace.load(self.trace_path(cache))

    def backbone_path(self) -> Path:
        """The backbone the run used: in the folder (co-trained or exported), else the cache entry it recorded."""
        if (self.dir / BACKBONE_DIR / "exitrl_backbone.json").is_file():
            return self.dir / BACKBONE_DIR
        path = self.record.backbone.get("path")
        if not path or not (Path(path) / "exitrl_backbone.json").is_file():
            raise ValueError(f"The backbone of {self.dir} is not in the folder, and its cache entry {path} is gone: "
                             "rerun the run's config (config.yaml) to rebuild it (same data and settings give the "
                             "same key), or export the run where it was made: python -m exitrl.export RUN_DIR.")
        return Path(path)

    def save(self, destination: str | Path) -> Run:
        """Copy the run folder to ``destination`` (export it first to make the copy self-contained)."""
        shutil.copytree(self.dir, destination)
        return Run(Path(destination))
