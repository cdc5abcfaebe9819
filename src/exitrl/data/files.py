"""Data files (TSV, CSV, JSONL) read into rows that remember the line they came from, and their columns checked row
by row, so that every error names the file, the row, its line and the column, and says which setting fixes it.

TSV is read without quote processing by default (GLUE's files hold raw quotes); CSV is quoted; a JSONL file holds
one JSON object per line (blank lines are skipped). A file starting with a UTF-8 byte-order mark reads as without.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data source is missing or malformed; the message says what to do."""


@dataclass
class Table:
    """The rows of one file, the line each row starts on, and the header (None for JSONL: keys per row)."""

    path: Path
    rows: list[dict]
    lines: list[int]
    header: list[str] | None

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        """``FILE row n (line m)`` for the 0-based row ``index``: rows count data rows, lines count the file's."""
        return f"{self.path} row {index + 1} (line {self.lines[index]})"

    def column(self, name: str) -> list:
        return [row[name] for row in self.rows]

    def has(self, name: str) -> bool:
        """Whether the column is there: in the header, or (JSONL) in the first row."""
        return name in (self.header if self.header is not None else (self.rows[0] if self.rows else {}))


def check_encoding(path: Path) -> None:
    """UTF-8 text, or a DataError naming the first line that is not (with the byte that breaks it)."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {number}: not UTF-8 text (byte {line[err.start:err.start + 1]!r} at "
                                f"column {err.start + 1}); save the file as UTF-8.") from err


def read_table(path: str | Path, quoted_tsv: bool = False) -> Table:
    """Read a ``.tsv``, ``.csv`` or ``.jsonl`` (``.json``) file; ``quoted_tsv`` reads CSV-style quoted TSV fields."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    check_encoding(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path)
    return _read_delimited(path, quoted_tsv)


def _read_jsonl(path: Path) -> Table:
    rows, lines = [], []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"Cannot parse {path} line {number}: not JSON ({err.msg} at column {err.colno}). A "
                                ".jsonl file holds one JSON object per line, e.g. {\"text\": \"...\", \"label\": "
                                "\"...\"}.") from err
            if not isinstance(row, dict):
                raise DataError(f"{path} row {len(rows) + 1} (line {number}): expected an object per line, e.g. "
                                f"{{\"text\": \"...\", \"label\": \"...\"}}, got {type(row).__name__}.")
            rows.append(row)
            lines.append(number)
    return Table(path, rows, lines, None)


def _read_delimited(path: Path, quoted_tsv: bool) -> Table:
    rows, lines = [], []
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
        elif quoted_tsv:
            reader = csv.DictReader(f, delimiter="\t")
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = list(reader.fieldnames or [])
            start = reader.line_num + 1
            for row in reader:
                rows.append(row)
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"Cannot parse {path} line {reader.line_num}: {err}. Expected TSV/CSV with a header row, "
                            "or one JSON object per line (.jsonl).") from err
    table = Table(path, rows, lines, header)
    bad = next((i for i, row in enumerate(rows) if None in row), None)
    if bad is not None:
        tabs = " (a .tsv file is split on tabs)" if path.suffix.lower() != ".csv" else ""
        raise DataError(f"{table.where(bad)} has more fields than the header ({len(header)}: {', '.join(header)}); "
                        f"check the delimiter{tabs}.")
    return table


def require_columns(table: Table, columns: Sequence[str], fixes: Mapping[str, str], allow_empty: bool = False
                    ) -> None:
    """Every row has a value in every column of ``columns``; ``fixes[column]`` says which setting names that column
    (e.g. ``set env.custom.label_column=...``). Empty values are refused unless ``allow_empty``."""
    if not table.rows:
        raise DataError(f"{table.path} has no data rows.")
    for column in columns:
        fix = fixes.get(column, "")
        if table.header is not None and column not in table.header:
            raise DataError(f"{table.path} has no column {column!r} (its header: {', '.join(table.header)}); "
                            f"{fix}.")
        for index, row in enumerate(table.rows):
            if column not in row:
                raise DataError(f"{table.where(index)} has no column {column!r} (columns: {', '.join(row)}); "
                                f"{fix}, or add the column to every row.")
            value = row[column]
            if value is None and table.header is not None:  # a short TSV/CSV row: DictReader fills in None
                given = sum(v is not None for v in row.values())
                raise DataError(f"{table.where(index)} has no value for column {column!r}: {given} field(s) where the "
                                f"header has {len(table.header)}; check the delimiter and that the row is complete.")
            if not allow_empty and value in (None, ""):
                raise DataError(f"{table.where(index)}: column {column!r} is empty"
                                f"{' (null)' if value is None else ''}; give it a value or drop the row.")
