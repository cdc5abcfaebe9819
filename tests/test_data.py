"""Both data paths (local GLUE folder, hub-style dataset repo through `datasets`), custom files, bad input."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest

from exitrl.data import GLUE_TASKS, DataError, load_task, read_table


def test_local_glue_tasks_load_with_canonical_ids(glue_dir):
    rte = load_task("rte", glue_dir)
    assert {k: len(v) for k, v in rte.splits.items()} == {"train": 2490, "dev": 277}
    assert rte.splits["dev"][0]["label"] == 1  # "not_entailment" -> id 1 as on the hub
    mrpc = load_task("mrpc", glue_dir)  # files start with a UTF-8 BOM
    assert (len(mrpc.splits["train"]), len(mrpc.splits["dev"])) == (3668, 408)
    assert sum(mrpc.splits["dev"]["label"]) == 279 and mrpc.metric == "f1"
    sst2 = load_task("sst2", glue_dir, limit={"train": 100, "dev": None})
    assert len(sst2.splits["train"]) == 100 and sst2.splits["dev"][0]["text_b"] is None


def test_env_variable_names_the_data_folder(glue_dir, monkeypatch):
    monkeypatch.setenv("EXITRL_DATA_DIR", str(glue_dir))
    assert len(load_task("rte", None, splits=("dev",)).splits["dev"]) == 277


def test_qnli_has_no_local_train_split(glue_dir):
    with pytest.raises(DataError, match="train"):
        load_task("qnli", glue_dir)
    with pytest.raises(DataError, match="data.train_from_dev=0.5"):
        load_task("qnli", glue_dir)
    assert len(load_task("qnli", glue_dir, splits=("dev",)).splits["dev"]) == 5463


def test_train_from_dev_carves_a_fixed_disjoint_train_out_of_qnli_dev(glue_dir):
    whole = load_task("qnli", glue_dir, splits=("dev",)).splits["dev"]
    data = load_task("qnli", glue_dir, train_from_dev=0.5, policy_split=0.2)
    assert {k: len(v) for k, v in data.splits.items()} == {"dev": 2731, "train": 2186, "policy": 546}
    rows = lambda ds: set(zip(ds["text_a"], ds["text_b"], ds["label"]))  # noqa: E731
    parts = [rows(data.splits[s]) for s in ("train", "policy", "dev")]
    assert sum(map(len, parts)) == len(rows(whole)) and set().union(*parts) == rows(whole)
    assert "0.5 of its dev file" in data.source
    again = load_task("qnli", glue_dir, train_from_dev=0.5)
    assert list(again.splits["dev"]["text_a"]) == list(data.splits["dev"]["text_a"])  # the same rows every time
    for bad in (1.0, -0.2):
        with pytest.raises(DataError, match="data.train_from_dev"):
            load_task("qnli", glue_dir, train_from_dev=bad)


def test_hub_path_reads_a_dataset_repository(tmp_path, monkeypatch):
    """The hub loader goes through `datasets.load_dataset`; a dataset repo laid out as the hub's GLUE one
    (parquet files, configs in README.md) exercises exactly that code without a network."""
    repo = tmp_path / "glue_repo"
    (repo / "rte").mkdir(parents=True)
    rows = {"sentence1": ["a b", "c d", "e f"], "sentence2": ["x", "y", "z"], "label": [0, 1, 0], "idx": [0, 1, 2]}
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows).to_parquet(str(repo / "rte" / f"{split}-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: rte\n  data_files:\n  - split: train\n    path: rte/train-*\n"
        "  - split: validation\n    path: rte/validation-*\n---\n"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("EXITRL_DATA_DIR", raising=False)
    spec = dataclasses.replace(GLUE_TASKS["rte"], hub_path=str(repo))
    monkeypatch.setitem(GLUE_TASKS, "rte", spec)
    data = load_task("rte", None)
    assert data.source.startswith("hub:") and data.splits["dev"]["label"] == [0, 1, 0]
    assert data.splits["train"]["text_b"] == ["x", "y", "z"]


def test_no_source_names_both_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("EXITRL_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_task("rte", tmp_path / "nowhere")
    message = str(err.value)
    assert "data.dir" in message and "EXITRL_DATA_DIR" in message and "hub" in message


def test_unreachable_hub_fails_at_once_with_both_ways(monkeypatch, tmp_path):
    """No local folder and no connection: one socket check says so, instead of the hub client's retries."""
    monkeypatch.delenv("EXITRL_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens on loopback
    with pytest.raises(DataError) as err:
        load_task("rte", tmp_path / "nowhere")
    message = str(err.value)
    assert "unreachable" in message and "127.0.0.1:9" in message and "data.dir" in message


def test_unknown_task_lists_valid_ones():
    with pytest.raises(DataError, match="rte, sst2, mrpc, qnli, custom"):
        load_task("cola")


def _custom(files, **extra):
    return {"files": files, "text_columns": ["text"], "label_column": "y", **extra}


def test_custom_tsv_csv_jsonl_with_string_and_integer_labels(tmp_path):
    (tmp_path / "train.tsv").write_text('text\ty\n"quoted start\tcat\nplain\tdog\nthird\tbird\n')
    (tmp_path / "dev.csv").write_text('text,y\n"a, b",dog\nc,cat\n')
    data = load_task("custom", custom=_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.csv"}))
    assert data.label_names == ("bird", "cat", "dog") and data.num_labels == 3
    assert data.splits["train"]["text_a"][0] == '"quoted start'
    assert data.splits["dev"]["label"] == [2, 1] and data.splits["dev"]["text_a"][0] == "a, b"
    lines = [json.dumps({"text": f"t{i}", "y": i % 4 + 10}) for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    (tmp_path / "dev.jsonl").write_text("\n".join(lines[:3]))
    data = load_task("custom", custom=_custom({"train": tmp_path / "train.jsonl", "dev": tmp_path / "dev.jsonl"}))
    assert data.label_names == ("10", "11", "12", "13") and data.splits["dev"]["label"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("train", "dev", "match"),
    [
        ("text\ty\nhello\tpos\nbye\tneg\n", "words\ty\nhi\tpos\n",
         r"dev.tsv has no column 'text' \(its header: words, y\); set env.custom.text_columns="),
        ("text\ty\nhello\tpos\nbye\tneg\n", "text\ty\n", "no data rows"),
        ("text\ty\nhello\tpos\nbye\tneg\n", "text\ty\nhi\tmaybe\n", r"row 1 \(line 2\): label 'maybe'.*not one of"),
        ("text\ty\nhello\tpos\textra\nbye\tneg\n", "text\ty\nhi\tpos\n", "more fields than the header"),
        ("text\ty\nhello\tpos\nbye\tpos\n", "text\ty\nhi\tpos\n", "at least two"),
        ("text\ty\n\tpos\nbye\tneg\n", "text\ty\nhi\tpos\n", "is empty"),
    ],
)
def test_malformed_custom_files_get_clear_errors(tmp_path, train, dev, match):
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "dev.tsv").write_text(dev)
    with pytest.raises(DataError, match=match):
        load_task("custom", custom=_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}))


def test_jsonl_rows_are_checked_one_by_one(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "y": 1}\n{"text": "b"}\n{"text": "c", "y": 0}\n')
    with pytest.raises(DataError, match=r"train.jsonl row 2 \(line 2\) has no column 'y' \(columns: text\)"):
        load_task("custom", custom=_custom({"train": tmp_path / "train.jsonl", "dev": tmp_path / "train.jsonl"}))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match="expected an object"):
        load_task("custom", custom=_custom({"train": tmp_path / "list.jsonl", "dev": tmp_path / "list.jsonl"}))


def test_custom_needs_files_and_a_parsable_format(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_task("custom", custom=_custom({"train": tmp_path / "t.tsv"}))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="Cannot parse"):
        load_task("custom", custom=_custom({"train": tmp_path / "bad.jsonl", "dev": tmp_path / "bad.jsonl"}))
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "absent.tsv")


def test_fingerprint_follows_content(glue_dir):
    a = load_task("rte", glue_dir, limit={"train": 50, "dev": 20})
    b = load_task("rte", glue_dir, limit={"train": 50, "dev": 20})
    c = load_task("rte", glue_dir, limit={"train": 51, "dev": 20})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_policy_split_is_a_fixed_disjoint_slice_of_train(glue_dir):
    whole = load_task("rte", glue_dir)
    data = load_task("rte", glue_dir, policy_split=0.2)
    again = load_task("rte", glue_dir, policy_split=0.2)
    assert len(data.splits["policy"]) == 498 and len(data.splits["train"]) == 2490 - 498
    assert data.splits["policy"]["text_a"] == again.splits["policy"]["text_a"]
    pairs = set(zip(data.splits["train"]["text_a"], data.splits["train"]["text_b"]))
    policy_pairs = list(zip(data.splits["policy"]["text_a"], data.splits["policy"]["text_b"]))
    assert not pairs & set(policy_pairs)
    assert sorted(pairs | set(policy_pairs)) == sorted(set(zip(whole.splits["train"]["text_a"],
                                                               whole.splits["train"]["text_b"])))
    assert data.fingerprint() != whole.fingerprint()
    with pytest.raises(DataError, match="policy_split"):
        load_task("rte", glue_dir, policy_split=1.5)


def test_encoding_errors_name_the_line_and_quoted_tsv_is_an_option(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"text\ty\nfine\tpos\ncaf\xe9\tneg\n")
    (tmp_path / "dev.tsv").write_text("text\ty\nhi\tpos\n")
    with pytest.raises(DataError, match=r"train.tsv, line 3: not UTF-8 text \(byte b'\\xe9' at column 4\)"):
        load_task("custom", custom=_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}))
    (tmp_path / "train.tsv").write_text('text\ty\n"a\tb"\tpos\nplain\tneg\n')
    quoted = load_task("custom", custom={**_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}),
                                         "quoted_tsv": True})
    assert quoted.splits["train"]["text_a"][0] == "a\tb"
    with pytest.raises(DataError, match="more fields than the header"):  # unquoted, the tab splits the field
        load_task("custom", custom=_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}))


def test_a_one_class_training_split_is_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("text\ty\na\tpos\nb\tpos\n")
    (tmp_path / "dev.tsv").write_text("text\ty\nc\tneg\n")
    custom = {**_custom({"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv"}), "label_names": ["neg", "pos"]}
    with pytest.raises(DataError, match="every row of .*train.tsv has the same label \\('pos'\\)"):
        load_task("custom", custom=custom)


def test_overlong_texts_are_cut_with_a_count(tiny_bert, caplog):
    from transformers import AutoTokenizer

    from exitrl.backbones.batching import tokenize_split
    from exitrl.data.loading import _make_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = _make_dataset({"text_a": ["short", "a much longer text " * 20, "also " * 30], "text_b": [None] * 3,
                           "label": [0, 1, 0]})
    examples = tokenize_split(tokenizer, split, max_length=16)
    assert max(len(e["input_ids"]) for e in examples) == 16
    assert "2 of 3 rows reach max_length=16 tokens; longer ones are cut there" in caplog.text
