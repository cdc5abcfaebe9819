"""A run folder made self-contained with ``python -m exitrl.export`` reloads in a fresh process with the cache
deleted: the policy, the trace and the backbone; SB3 runs also leave their own .zip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from test_cli import run_cli
from test_sweep_compare import run_module

RELOAD = """
import json, sys, torch
import exitrl
from exitrl.backbones import MultiExitModel
from exitrl.evaluation.evaluate import evaluate_policy
run = exitrl.Run.load(sys.argv[1])
trace = exitrl.load_trace(run.dir)
same = evaluate_policy(run.policy, trace["dev"]) == run.results["confidence"]
model, tokenizer, meta = MultiExitModel.load(run.backbone_path())
batch = tokenizer(["a good film", "an awful story"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).logits
print(json.dumps({"same": same, "layers": model.num_layers, "dtype": meta["dtype"], "shape": list(logits.shape),
                  "backbone": str(run.backbone_path())}))
"""


def test_an_exported_run_reloads_without_the_cache(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=confidence", f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte",
                  f"data.dir={glue_dir}", "data.limit.train=48", "data.limit.dev=24", "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    exported = run_module("exitrl.export", str(run), cache=tmp_path / "cache")
    assert exported.returncode == 0, exported.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["backbone"]["exported"] == {"backbone": "backbone", "dtype": "float16", "trace": "trace.pt"}
    shutil.rmtree(tmp_path / "cache")
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)  # another place, as on another machine
    reloaded = subprocess.run([sys.executable, "-c", RELOAD, str(moved)], capture_output=True, text=True, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                   "EXITRL_CACHE_DIR": str(tmp_path / "no-cache")})
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    facts = json.loads(reloaded.stdout.strip().splitlines()[-1])
    assert facts == {"same": True, "layers": 3, "dtype": "float16", "shape": [2, 3, 2],
                     "backbone": str(moved / "backbone")}


def test_without_export_a_missing_cache_is_a_clear_error(tiny_bert, glue_dir, tmp_path):
    out = run_cli(tmp_path, "agent=static", f"backbone.name={tiny_bert}", "backbone.package=null", "env=rte",
                  f"data.dir={glue_dir}", "data.limit.train=48", "data.limit.dev=24", "backbone.finetune.epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.rmtree(tmp_path / "cache")
    failed = run_module("exitrl.export", str(tmp_path / "run"), cache=tmp_path / "cache")
    assert failed.returncode == 2 and "rerun the run's config" in failed.stderr and "Traceback" not in failed.stderr
