"""Every rule fitted and evaluated with the trace on the accelerator when there is one (the CPU runs the same code in
the other tests): no tensor may be left behind on the wrong device."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import synthetic_trace

from exitrl.evaluation.evaluate import evaluate_policy, oracle_bounds
from exitrl.experiments.pipeline import AgentRun
from exitrl.traces.trace import Trace

RULES = [("calm", {"measure": "margin"}), ("calm", {"measure": "saturation"}), ("calm", {"measure": "meta"}),
         ("calm", {"temperature": True}), ("free", {}), ("free", {"temperature": True}), ("lte", {}),
         ("confidence", {"temperature": True}), ("patience", {}), ("static", {"layer": 2}), ("oracle", {})]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_every_rule_on_a_trace_on_the_device(device):
    split, _ = synthetic_trace(n=600, num_layers=4)
    trace = Trace({"train": split, "policy": split, "dev": split})
    on_device = Trace({k: v.to(device) for k, v in trace.splits.items()})
    bounds = oracle_bounds(on_device["dev"])
    assert bounds["oracle_frontier"] and bounds["consistency_oracle"]["score"] == 1.0
    for name, options in RULES:
        policy = AgentRun.create(name, dict(options)).fit(on_device, torch.device(device)).policy
        on_cpu = evaluate_policy(copy.deepcopy(policy).to(torch.device("cpu")), trace["dev"])  # FREE adapts
        there = evaluate_policy(policy.to(torch.device(device)), on_device["dev"])
        assert there["exit_histogram"] == on_cpu["exit_histogram"], (name, options)
