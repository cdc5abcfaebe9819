"""The same seed, machine and versions give byte-identical numbers on the CPU; the run records what they depend on."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run_cli
from test_resume import common, numbers

from exitrl.core.device import pick_device, set_reproducibility


@pytest.mark.xdist_group("reference_numbers")
def test_two_runs_of_one_job_give_identical_numbers(tiny_bert, glue_dir, tmp_path, reference_numbers):
    overrides = common(tiny_bert, glue_dir)  # with threads=1: the count is part of what the numbers depend on
    second = run_cli(tmp_path / "b", *overrides)  # each run fine-tunes and traces from scratch (its own cache)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = reference_numbers(overrides), numbers(tmp_path / "b" / "run")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    environment = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())["environment"]
    assert environment["threads"] == 1 and environment["torch"] == torch.__version__
    assert environment["deterministic"] is False


def test_reproducibility_settings_are_checked_and_applied():
    before = torch.get_num_threads()
    try:
        assert set_reproducibility(True, 1)["threads"] == 1 and torch.are_deterministic_algorithms_enabled()
    finally:
        set_reproducibility(False, before)
    assert not torch.are_deterministic_algorithms_enabled()
    for bad in (0, "two", 1.5):
        with pytest.raises(ValueError, match="threads"):
            set_reproducibility(False, bad)
    for bad in ("gpu", "cuda:x", "cpu:0", 3):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            pick_device(bad)
