"""A custom data file with a missing or empty column, or a malformed line, is refused with the file, the row, its
line, the column and the setting that fixes it; never with a label of None."""

from __future__ import annotations

import json

import pytest

from exitrl.data import DataError, load_task, read_table


def load(tmp_path, name: str, text: str, **custom):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_task("custom", custom={"files": {"train": path, "dev": path}, "text_columns": ["text"], **custom})


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_a_row_without_the_label_column_is_named_with_its_columns_and_the_setting(tmp_path):
    rows = jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "answer": "y"})
    with pytest.raises(DataError) as err:
        load(tmp_path, "train.jsonl", rows)
    message = str(err.value)
    assert "train.jsonl row 3 (line 3) has no column 'label' (columns: text, answer)" in message
    assert "set env.custom.label_column=" in message and "None" not in message


def test_no_row_with_the_label_column_is_named_before_labels_are_counted(tmp_path):
    """Before: 'found 0 distinct label(s)'; the labels are only counted once every row has the column."""
    with pytest.raises(DataError, match=r"train.jsonl row 1 \(line 1\) has no column 'label' \(columns: text, "
                                        r"answer\)"):
        load(tmp_path, "train.jsonl", jsonl({"text": "a", "answer": "x"}, {"text": "b", "answer": "y"}))
    with pytest.raises(DataError, match=r"train.csv has no column 'label' \(its header: text, answer\); set "
                                        r"env.custom.label_column="):
        load(tmp_path, "train.csv", "text,answer\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"train.tsv has no column 'sentence' \(its header: text, label\); set "
                                        r"env.custom.text_columns="):
        load(tmp_path, "train.tsv", "text\tlabel\na\tx\nb\ty\n", text_columns=["sentence"])


def test_short_rows_null_and_empty_values_name_row_and_line(tmp_path):
    with pytest.raises(DataError, match=r"train.tsv row 3 \(line 4\) has no value for column 'label': 1 field\(s\) "
                                        r"where the header has 2"):
        load(tmp_path, "train.tsv", "text\tlabel\na\tx\nb\ty\nc\n")
    with pytest.raises(DataError, match=r"train.jsonl row 2 \(line 3\): column 'label' is empty \(null\)"):
        load(tmp_path, "train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match=r"train.csv row 2 \(line 3\): column 'text' is empty"):
        load(tmp_path, "train.csv", "text,label\na,x\n,y\n")


def test_quoted_csv_rows_keep_their_first_line(tmp_path):
    """A quoted CSV field over two lines: the next row's line is counted from the file, not from the rows."""
    (tmp_path / "t.csv").write_text('text,label\n"two\nlines",x\nb,\n', encoding="utf-8")
    table = read_table(tmp_path / "t.csv")
    assert table.lines == [2, 4] and table.rows[0]["text"] == "two\nlines"
    with pytest.raises(DataError, match=r"t.csv row 2 \(line 4\): column 'label' is empty"):
        load(tmp_path, "t.csv", (tmp_path / "t.csv").read_text())


def test_a_malformed_json_line_is_named(tmp_path):
    with pytest.raises(DataError, match=r"Cannot parse .*train.jsonl line 3: not JSON \(Expecting value at "
                                        r"column 10\)"):
        load(tmp_path, "train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": b}\n')
    with pytest.raises(DataError, match=r"train.jsonl row 2 \(line 2\): expected an object per line.*got list"):
        load(tmp_path, "train.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n')
