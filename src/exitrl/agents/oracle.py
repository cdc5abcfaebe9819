"""Oracles for analysis only (never deployable: they read the label or the last layer's answer):

* ``consistency``: exit at the first layer whose prediction equals the last layer's. It keeps the full model's
  predictions exactly, so its saving bounds every policy that must not change them.
* ``correctness``: exit at the first correct layer (near 100 % on binary tasks; report it, never use it as the bound).

An oracle is built for one split and looks its rows up by index (``LayerBatch.extras["rows"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exitrl.agents.declaration import ANALYSIS, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.evaluation.evaluate import ORACLE_KINDS as KINDS
from exitrl.evaluation.evaluate import oracle_exit_layers
from exitrl.policy import ExitPolicy, LayerBatch, Memory
from exitrl.traces.trace import SplitTrace


class OraclePolicy(ExitPolicy):
    name = "oracle"
    deployable = False

    def __init__(self, exit_layers: list[int] | torch.Tensor, kind: str = "consistency"):
        if kind not in KINDS:
            raise ValueError(f"Unknown oracle kind {kind!r}; valid: {', '.join(KINDS)}.")
        self.kind = kind
        self.exit_layers = torch.as_tensor(exit_layers, dtype=torch.long)

    @classmethod
    def for_split(cls, trace: SplitTrace, kind: str = "consistency") -> OraclePolicy:
        return cls(oracle_exit_layers(trace, kind).cpu(), kind)

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        rows = batch.extras.get("rows")
        if rows is None or batch.extras.get("split_size") != self.exit_layers.numel():
            raise ValueError("An oracle policy answers only for the split it was built from, walked by "
                             "exitrl.evaluation.evaluate.run_policy (which passes each row's index).")
        return self.exit_layers.to(rows.device)[rows] <= batch.layer

    def config(self) -> dict:
        return {"exit_layers": self.exit_layers.tolist(), "kind": self.kind}


@dataclass
class OracleConfig:
    kind: str = "consistency"  # consistency | correctness

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown oracle kind {self.kind!r}; valid: {', '.join(KINDS)}.")


def fit_oracle(cfg: OracleConfig, inputs: FitInputs) -> tuple[OraclePolicy, dict]:
    """The oracle for the dev split (the one it reads answers from, and the only one it may be evaluated on)."""
    if inputs.dev is None:
        raise ValueError("agent=oracle is built for the dev split, and this trace has none.")
    return OraclePolicy.for_split(inputs.dev, cfg.kind), {"analysis_only": True, "split": "dev"}


AGENT = register(AgentSpec(
    "oracle", OracleConfig, ANALYSIS, Knob("agent.kind", ("consistency", "correctness")), fit_oracle,
    "analysis only, never deployable: exit at the first layer agreeing with the last, or the first correct one"))
