"""``EarlyExitClassifier.save_pretrained`` / ``from_pretrained``: one self-contained folder that reloads with the same
exits and labels for every deployable policy, without the run folder, the cache or the hub (``exitrl export RUN_DIR
--pretrained OUT_DIR``, then ``exitrl predict OUT_DIR``); a folder that is not one, a missing or damaged file and a
newer format are refused naming the file."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from test_cli import run_cli
from test_predict import predict
from test_runtime import BUDGETS, live  # noqa: F401 - the tiny fine-tuned encoder, its trace and task
from test_sweep_compare import run_module

from exitrl.agents.registry import agents
from exitrl.backbones import load_multi_exit
from exitrl.experiments.pipeline import AgentRun
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.pretrained import FORMAT_VERSION, MANIFEST, PretrainedError

VARIANTS = [*BUDGETS.items(), ("confidence", {"threshold": 0.9, "temperature": True}),
            ("calm", {"measure": "meta", "delta": 0.3}), ("confidence_per_layer", {"cost_weight": 0.1}),
            ("exit_scorer", {"cost_weight": 0.1, "steps": 50}), ("stopping", {"cost_weight": 0.1, "steps": 50})]


def test_the_variants_cover_every_deployable_agent():
    deployable = {name for name, spec in agents().items() if spec.kind != "analysis"}
    assert deployable <= {agent for agent, _ in VARIANTS}


@pytest.mark.parametrize("agent, options", VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_every_deployable_policy_reloads_with_the_same_answers(request, agent, options, tmp_path):
    model, tokenizer, trace, data = request.getfixturevalue("live")
    policy = AgentRun.create(agent, dict(options), reward="vanilla").fit(trace, torch.device("cpu")).policy
    texts = list(data.splits["dev"]["text_a"])
    classifier = EarlyExitClassifier(copy.deepcopy(model), tokenizer, policy, list(data.label_names), 32)
    folder = classifier.save_pretrained(tmp_path / "classifier")
    expected = EarlyExitClassifier(copy.deepcopy(model), tokenizer, copy.deepcopy(policy), list(data.label_names),
                                   32).exits(texts, batch_size=8)  # a fresh copy: FREE adapts online
    loaded = EarlyExitClassifier.from_pretrained(folder, device="cpu")
    found = loaded.exits(texts, batch_size=8)
    assert torch.equal(found.layers, expected.layers) and torch.equal(found.predictions, expected.predictions)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["policy"]["name"] == policy.name and manifest["num_layers"] == 3
    assert manifest["label_names"] == list(data.label_names) and manifest["max_length"] == 32
    assert loaded.label_names == list(data.label_names) and loaded.max_length == 32


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory):
    """A tiny classifier (random heads, a confidence rule) saved once; tests copy the folder before breaking it."""
    from exitrl.agents.confidence import ConfidencePolicy

    torch.manual_seed(0)
    model, tokenizer = load_multi_exit(str(tiny_bert), 2, "mean")
    classifier = EarlyExitClassifier(model, tokenizer, ConfidencePolicy(0.52), ["neg", "pos"], 32)
    folder = classifier.save_pretrained(tmp_path_factory.mktemp("saved") / "classifier")
    return classifier, folder


TEXTS = ["a good film", "the awful story was bad", "it is", "she said it was great and good", "no"] * 4


def test_the_folder_holds_every_file_with_its_checksum(saved):
    classifier, folder = saved
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files and {"policy.pt", "backbone/heads.pt"} <= files
    assert any(name.startswith("backbone/encoder/tokenizer") for name in files)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["dtype"] == "float32"
    assert manifest["policy"] == {"name": "confidence", "class": "exitrl.agents.confidence:ConfidencePolicy",
                                  "config": {"threshold": 0.52, "measure": "maxprob"}}
    assert all(len(digest) == 64 for digest in manifest["files"].values())


def test_dtype_converts_the_saved_weights_only(saved, tmp_path):
    classifier, _ = saved
    folder = classifier.save_pretrained(tmp_path / "half", dtype="bfloat16")
    assert json.loads((folder / MANIFEST).read_text())["dtype"] == "bfloat16"
    assert next(classifier.model.parameters()).dtype == torch.float32  # the live classifier keeps its weights
    loaded = EarlyExitClassifier.from_pretrained(folder, device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.float32  # fp32 on the CPU, whatever the folder holds
    assert loaded.exits(TEXTS).layers.shape == (len(TEXTS),)
    with pytest.raises(PretrainedError, match="Unknown dtype 'half'"):
        classifier.save_pretrained(tmp_path / "other", dtype="half")


def test_saving_again_replaces_a_classifier_but_not_other_files(saved, tmp_path):
    classifier, folder = saved
    again = classifier.save_pretrained(tmp_path / "again")
    classifier.save_pretrained(again)  # a classifier saved there before is replaced
    assert json.loads((again / MANIFEST).read_text())["files"] == json.loads((folder / MANIFEST).read_text())["files"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PretrainedError, match="exists and is not a saved classifier"):
        classifier.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def broken_copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_a_folder_that_is_not_a_classifier_is_named(saved, tmp_path):
    with pytest.raises(PretrainedError, match=r"empty is not a saved classifier \(no exitrl_classifier.json\)"):
        (tmp_path / "empty").mkdir()
        EarlyExitClassifier.from_pretrained(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(PretrainedError, match="It is a run folder: load it with EarlyExitClassifier.from_run"):
        EarlyExitClassifier.from_pretrained(run)
    with pytest.raises(PretrainedError, match="absent does not exist"):
        EarlyExitClassifier.from_pretrained(tmp_path / "absent")


def test_a_missing_or_damaged_file_is_named(saved, tmp_path):
    _, folder = saved
    copy_ = broken_copy(folder, tmp_path)
    (copy_ / "backbone" / "heads.pt").unlink()
    with pytest.raises(PretrainedError, match=r"heads.pt is missing \(exitrl_classifier.json lists it\)"):
        EarlyExitClassifier.from_pretrained(copy_, device="cpu")
    shutil.rmtree(copy_)

    copy_ = broken_copy(folder, tmp_path)
    policy = copy_ / "policy.pt"
    data = bytearray(policy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    policy.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="policy.pt does not match its sha256 in exitrl_classifier.json"):
        EarlyExitClassifier.from_pretrained(copy_, device="cpu")
    shutil.rmtree(copy_)

    copy_ = broken_copy(folder, tmp_path)
    (copy_ / MANIFEST).write_text("{not json")
    with pytest.raises(PretrainedError, match="exitrl_classifier.json is damaged"):
        EarlyExitClassifier.from_pretrained(copy_, device="cpu")


def test_a_newer_format_asks_for_an_upgrade(saved, tmp_path):
    _, folder = saved
    copy_ = broken_copy(folder, tmp_path)
    manifest = json.loads((copy_ / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy_ / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PretrainedError, match=f"has format_version {FORMAT_VERSION + 1}.*upgrade exitrl"):
        EarlyExitClassifier.from_pretrained(copy_, device="cpu")


def test_verify_false_skips_the_checksums(saved, tmp_path):
    classifier, folder = saved
    copy_ = broken_copy(folder, tmp_path)
    config = copy_ / "backbone" / "exitrl_backbone.json"
    config.write_text(config.read_text() + "\n")  # changed, still valid
    with pytest.raises(PretrainedError, match="does not match its sha256"):
        EarlyExitClassifier.from_pretrained(copy_, device="cpu")
    loaded = EarlyExitClassifier.from_pretrained(copy_, device="cpu", verify=False)
    assert torch.equal(loaded.exits(TEXTS).layers, classifier.exits(TEXTS).layers)


RELOAD = """
import json, sys
from exitrl.runtime.classifier import EarlyExitClassifier
classifier = EarlyExitClassifier.from_pretrained(sys.argv[1])
pairs = json.loads(sys.argv[2])
print(json.dumps([{"label": a["label"], "exit_layer": a["exit_layer"]} for a in classifier.predict(pairs)]))
"""


def test_an_exported_classifier_loads_without_the_run_the_cache_or_the_hub(tiny_bert, glue_dir, tmp_path, capsys):
    out = run_cli(tmp_path, "agent=confidence", "agent.threshold=0.55", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=48",
                  "data.limit.dev=24", "backbone.finetune.epochs=1", "eval.speed_sample=0")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    rows = [line.split("\t") for line in (glue_dir / "RTE" / "dev.tsv").read_text().splitlines()[1:31]]
    pairs = [[row[1], row[2]] for row in rows]
    expected = [{"label": a["label"], "exit_layer": a["exit_layer"]}
                for a in EarlyExitClassifier.from_run(run, "cpu").predict([tuple(p) for p in pairs])]
    assert len({a["exit_layer"] for a in expected}) > 1  # rows leave at different layers
    exported = run_module("exitrl.export", str(run), "--pretrained", str(tmp_path / "classifier"), "--dtype",
                          "float32", cache=tmp_path / "cache")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "as a classifier folder" in exported.stdout
    assert not (run / "backbone").exists()  # the run folder is left as it was
    manifest = json.loads((tmp_path / "classifier" / MANIFEST).read_text())
    assert manifest["task"] == {"name": "rte", "metric": "accuracy", "text_columns": ["sentence1", "sentence2"],
                                "label_column": "label"}
    half = run_module("exitrl.export", str(run), "--pretrained", str(tmp_path / "half"), cache=tmp_path / "cache")
    assert half.returncode == 0 and json.loads((tmp_path / "half" / MANIFEST).read_text())["dtype"] == "float16"

    shutil.rmtree(tmp_path / "cache")
    shutil.rmtree(run)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "classifier", moved)  # another place, as on another machine
    reloaded = subprocess.run([sys.executable, "-c", RELOAD, str(moved), json.dumps(pairs)], capture_output=True,
                              text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                           "EXITRL_CACHE_DIR": str(tmp_path / "no-cache")})
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    assert json.loads(reloaded.stdout.strip().splitlines()[-1]) == expected  # exit for exit, label for label

    (tmp_path / "dev.tsv").write_text("\n".join((glue_dir / "RTE" / "dev.tsv").read_text().splitlines()[:31]) + "\n")
    code, printed, err = predict(capsys, moved, "--input", tmp_path / "dev.tsv", "--output", tmp_path / "p.jsonl",
                                 "--speed-sample", 0)  # the task's columns come from the manifest
    assert code == 0, err
    answers = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [{"label": a["label"], "exit_layer": a["exit_layer"]} for a in answers] == expected
    assert "exitrl: accuracy" in printed and "(ids: index)" in printed


def test_export_pretrained_of_a_folder_that_is_not_a_run_fails_cleanly(tmp_path):
    failed = run_module("exitrl.export", str(tmp_path), "--pretrained", str(tmp_path / "out"), cache=tmp_path / "c")
    assert failed.returncode == 2 and "is not an exitrl run folder" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "out").exists()


def test_predict_takes_a_classifier_saved_without_a_task_given_its_text_columns(saved, tmp_path, capsys):
    _, folder = saved
    rows = [{"text": text, "y": "pos" if "good" in text else "neg"} for text in TEXTS[:5]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, _, err = predict(capsys, folder, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "p.jsonl")
    assert code == 2 and "Cannot tell the text columns of task 'unknown': name them with --text-columns" in err
    code, out, err = predict(capsys, folder, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "p.jsonl",
                             "--text-columns", "text", "--label-column", "y", "--speed-sample", 0)
    assert code == 0, err
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 5 and "against column 'y'" in out
