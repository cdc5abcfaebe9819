"""The run record, ``metrics.json``: one schema for every run (``python -m exitrl.train``, each point of
``python -m exitrl.sweep``, the Python API and the benchmarks), written and read only here.

Schema (version 1); every score is a fraction in [0, 1], every "result" is
`exitrl.evaluation.evaluate.evaluate_policy`'s dict
(``score``, ``accuracy``, ``avg_exit_layer``, ``speedup``, ``saved_layers``, ``exit_histogram``, ``num_examples``,
``disagreement``, ``loss_increase``, ``deployable``, ``metric``):

* ``schema_version``: 1. Files without it were written before versioning and read as version 0.
* ``agent``: the agent trained or fitted; ``options``: its options as set (seed aside); ``family``: its name in
  comparisons (``agent[label]`` in labelled sweeps); ``kinds``: ``{policy name: learned | rule | analysis}`` for
  every entry of ``results``.
* ``task``, ``metric`` (accuracy | f1), ``num_layers``, ``label_names`` (by class id) and ``max_length`` (tokens),
  what the inference runtime needs to answer new text as the run was traced.
* ``results``: ``{policy name: result}`` on dev: the agent's, then any baselines'.
* ``oracle``: `exitrl.evaluation.evaluate.oracle_bounds` on dev (full model, per-layer scores, both oracles, oracle
  frontier); ``dev_per_layer``: its per-layer scores.
* ``knob``: ``{"key", "value"}`` for a sweep point, else null; with ``"curve": {"attribute", "value"}`` for a point
  of a fitted policy's curve (`exitrl.agents.declaration.Curve`).
* ``reward``: ``{"name", "fn", **kwargs}``; ``learn_on`` (the setting) and ``policy_trained_on`` (the split used).
* ``trace_key``: content hash of the trace; ``backbone``: the backbone's name, recipe, cache key and path (and
  ``seed_group``: the same hash for backbones differing only in their fine-tuning seed), or the trace file swept;
  ``backbone_mode`` (frozen | cotrain) and ``cotrain`` (per-round records, or null).
* ``seed``: the run's seed; ``validation_results``: ``{policy name: result}`` on the held-out split (the validation
  split of the honest comparison, `exitrl.evaluation.protocol`), empty when the trace has none.
* ``exits.pt`` beside ``metrics.json`` (`write_exits` / `read_exits`): per policy and split (dev, held-out) the
  per-example exit layers and predictions, the labels, and the full model's and layer 1's predictions, so that
  comparisons choose on validation and bootstrap dev without the trace.
* ``environment``: what the numbers depend on beyond the seed (`exitrl.core.device.set_reproducibility`: torch and
  transformers versions, CPU threads, deterministic kernels, the GPU).
* ``wall_clock`` (``exitrl train`` only; null elsewhere): the agent's measured wall-clock speedup against the full
  model through the runtime (`exitrl.runtime.speed`): ``wall_clock_speedup`` (full-model seconds / policy seconds),
  ``layer_speedup`` (on the timed rows), ``policy_seconds``, ``full_seconds``, ``examples`` (dev rows timed),
  ``batch_size`` and ``device``; or ``{"skipped": why}`` (``eval.speed_sample=0``, an analysis-only policy, a causal
  LM). It varies from run to run, unlike ``results``.
* ``agent_info`` and ``baseline_info``: what fitting reported (configs, learning curves, calibration);
  ``agent_seconds``, ``total_seconds``, ``data_source``, ``device``, ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
FILE_NAME = "metrics.json"
EXITS_FILE = "exits.pt"


@dataclass
class RunRecord:
    agent: str
    task: str
    metric: str
    num_layers: int
    results: dict
    oracle: dict
    family: str = ""
    label_names: list | None = None
    max_length: int | None = None
    options: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    knob: dict | None = None
    reward: dict = field(default_factory=dict)
    learn_on: str = "auto"
    policy_trained_on: str | None = None
    trace_key: str | None = None
    backbone: dict = field(default_factory=dict)
    backbone_mode: str = "frozen"
    cotrain: dict | None = None
    dev_per_layer: list | None = None
    agent_info: dict = field(default_factory=dict)
    baseline_info: dict = field(default_factory=dict)
    agent_seconds: float | None = None
    total_seconds: float | None = None
    data_source: str | None = None
    device: str | None = None
    run_dir: str | None = None
    seed: int | None = None
    validation_results: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    wall_clock: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.family = self.family or self.agent

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, run_dir: str | Path) -> Path:
        from exitrl.core.checkpoint import write_atomic

        return write_atomic(Path(run_dir) / FILE_NAME, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> RunRecord:
        """A record from parsed JSON; a missing field or a newer schema is a ValueError that names ``where``."""
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(f"{where} has schema_version {version!r}; this exitrl reads up to {SCHEMA_VERSION}: "
                             "upgrade exitrl.")
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{where} is not an exitrl {FILE_NAME} (missing {missing}); remove it or point at "
                             "another folder.")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not an exitrl {FILE_NAME} ({err}); remove it or point at another "
                             "folder.") from err
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ValueError(f"{path} is not an exitrl {FILE_NAME} (no results); remove it or point at another "
                             "folder.")
        return cls.from_dict(data, str(path))


def read_records(root: str | Path) -> list[tuple[Path, RunRecord]]:
    """Every run record under ``root``, in path order."""
    return [(path, RunRecord.read(path)) for path in sorted(Path(root).rglob(FILE_NAME))]


def write_exits(run_dir: str | Path, labels: dict, policies: dict, reference: dict) -> Path:
    """``exits.pt``: ``labels`` ``{split: [N]}``, ``policies`` ``{name: {split: {"layers", "predictions"}}}`` and
    ``reference`` ``{"full" | "layer_one": {split: predictions}}`` (all small int tensors)."""
    import io

    import torch

    from exitrl.core.checkpoint import write_atomic

    buffer = io.BytesIO()
    torch.save({"labels": labels, "policies": policies, "reference": reference}, buffer)
    return write_atomic(Path(run_dir) / EXITS_FILE, buffer.getvalue())


def read_exits(run_dir: str | Path) -> dict | None:
    """The run's ``exits.pt``, or None for runs written before it existed."""
    import torch

    path = Path(run_dir) / EXITS_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None
