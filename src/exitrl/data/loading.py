"""Load a task's splits as `datasets.Dataset`s with one schema: ``text_a``, ``text_b``, ``label`` (int).

GLUE tasks come from a local GLUE-layout folder when one is named (``data.dir=`` or ``EXITRL_DATA_DIR``), else
from the Hugging Face hub. A custom task reads TSV/CSV/JSONL files. Nothing ever falls back to made-up data:
when no source works the error says both ways to provide one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from exitrl.core.hashing import hash_json
from exitrl.core.splits import HELD_OUT
from exitrl.data.files import DataError, Table, read_table, require_columns
from exitrl.data.tasks import GLUE_TASKS, TASK_NAMES, TaskSpec

if TYPE_CHECKING:
    import datasets

DATA_DIR_ENV = "EXITRL_DATA_DIR"


@dataclass
class TaskData:
    """The loaded splits of one task plus what downstream code needs to know about them."""

    name: str
    label_names: tuple[str, ...]
    metric: str
    splits: dict[str, datasets.Dataset]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def fingerprint(self, splits: tuple[str, ...] | None = None) -> str:
        """Content hash of the rows of ``splits`` (all by default); part of the backbone and trace cache keys."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.name, list(self.label_names)]).encode())
        for split in sorted(self.splits if splits is None else splits):
            ds = self.splits[split]
            digest.update(split.encode())
            for column in ("text_a", "text_b", "label"):
                digest.update(json.dumps(list(ds[column]), ensure_ascii=False).encode())
        return digest.hexdigest()[:16]


def load_task(
    task: str,
    data_dir: str | os.PathLike | None = None,
    splits: tuple[str, ...] = ("train", "dev"),
    limit: dict[str, int | None] | None = None,
    custom: dict | None = None,
    policy_split: float = 0.0,
    train_from_dev: float = 0.0,
) -> TaskData:
    """Load ``splits`` of ``task``; ``limit`` keeps the first n rows of a split (for quick runs and tests).

    ``train_from_dev`` > 0 is for a task whose source has no labelled train file (QNLI in the data folder): dev is
    read and that share of it (a fixed seeded permutation, the same on every machine) becomes ``train``, the rest
    stays ``dev``. A result on such a split is not comparable with one on the official dev set; say so.

    ``policy_split`` > 0 moves that fraction of ``train`` (a fixed random subset) into a ``policy`` split: the
    backbone never trains on it, so exit policies learn from states that behave like unseen data.
    """
    task = task.lower()
    if train_from_dev:
        check_share("data.train_from_dev", train_from_dev)
        splits = tuple(dict.fromkeys(s for s in (*splits, "dev") if s != "train"))
    if task == "custom":
        data = _load_custom(custom or {}, splits)
    elif task in GLUE_TASKS:
        data = _load_glue(GLUE_TASKS[task], data_dir, splits)
    else:
        raise DataError(f"Unknown task {task!r}. Valid tasks: {', '.join(TASK_NAMES)}.")
    if train_from_dev:
        data.splits["train"], data.splits["dev"] = split_rows(data.splits["dev"], float(train_from_dev),
                                                              "data.train_from_dev")
        data.source += f" (train = {train_from_dev:g} of its dev file, seed {SPLIT_SEED}; dev = the rest)"
    for split, n in (limit or {}).items():
        if n is not None and split in data.splits:
            data.splits[split] = select_rows(data.splits[split], list(range(min(int(n), len(data.splits[split])))))
    if policy_split:
        _carve_policy_split(data, float(policy_split))
    for split, ds in data.splits.items():
        if len(ds) == 0:
            raise DataError(f"Split {split!r} of task {data.name!r} ({data.source}) has no rows.")
    return data


SPLIT_SEED = 0  # the permutation every carved split uses: the same rows on every machine and run


def check_share(key: str, fraction: float) -> None:
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"{key}={fraction} must lie in (0, 1): the share of the split's rows it moves.")


def split_rows(ds: datasets.Dataset, fraction: float, key: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(``fraction`` of the rows, the rest), by a fixed seeded permutation, each kept in file order."""
    check_share(key, fraction)
    count = int(round(fraction * len(ds)))
    if count < 1 or count >= len(ds):
        raise DataError(f"{key}={fraction} of {len(ds)} rows leaves an empty split.")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ds))
    return select_rows(ds, sorted(order[:count].tolist())), select_rows(ds, sorted(order[count:].tolist()))


def _carve_policy_split(data: TaskData, fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.policy_split={fraction} must lie in (0, 1): the share of train held out for policies.")
    if "train" not in data.splits:
        raise DataError("data.policy_split needs a train split to carve the policy split from.")
    data.splits[HELD_OUT], data.splits["train"] = split_rows(data.splits["train"], fraction, "data.policy_split")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def _hub_disabled() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used (offline by setting, or no connection to its host within ``timeout`` s), else
    None. One quick check, so that an offline machine fails in seconds instead of after the client's retries."""
    if _hub_disabled():
        return "the hub is disabled by HF_HUB_OFFLINE / HF_DATASETS_OFFLINE"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"the hub ({host}:{port}) is unreachable: {err}"
    return None


def _load_glue(spec: TaskSpec, data_dir: str | os.PathLike | None, splits: tuple[str, ...]) -> TaskData:
    local_root = _resolve_data_dir(data_dir)
    if local_root is not None and (local_root / spec.local_folder).is_dir():
        return _load_glue_local(spec, local_root / spec.local_folder, splits)
    try:
        unreachable = None if Path(spec.hub_path).is_dir() else hub_unreachable()  # a local dataset repo needs no hub
        if unreachable:
            raise ConnectionError(unreachable)
        return _load_glue_hub(spec, splits)
    except Exception as hub_error:  # noqa: BLE001 - any hub failure becomes one actionable message
        where = (
            f"no folder {local_root / spec.local_folder}"
            if local_root is not None
            else f"no local folder was named (data.dir= or {DATA_DIR_ENV})"
        )
        raise DataError(
            f"Cannot load task {spec.name!r}: {where}, and the hub failed ({type(hub_error).__name__}: "
            f"{str(hub_error)[:200]}). Either pass data.dir=/path/to/glue (or set {DATA_DIR_ENV}) pointing at "
            f"a GLUE-layout folder containing {spec.local_folder}/train.tsv and {spec.local_folder}/dev.tsv, "
            f"or make the Hugging Face hub reachable for {spec.hub_path}/{spec.hub_config}."
        ) from hub_error


def _load_glue_hub(spec: TaskSpec, splits: tuple[str, ...]) -> TaskData:
    import datasets  # imported on use: env and trace code need no `datasets`

    raw = datasets.load_dataset(spec.hub_path, spec.hub_config)
    out = {}
    for split in splits:
        ds = raw[spec.hub_splits[split]]
        cols = spec.text_columns
        out[split] = _make_dataset(
            {
                "text_a": list(ds[cols[0]]),
                "text_b": list(ds[cols[1]]) if len(cols) > 1 else [None] * len(ds),
                "label": [int(x) for x in ds["label"]],
            }
        )
    return TaskData(spec.name, spec.label_names, spec.metric, out, f"hub:{spec.hub_path}/{spec.hub_config}")


def _load_glue_local(spec: TaskSpec, folder: Path, splits: tuple[str, ...]) -> TaskData:
    out = {}
    for split in splits:
        path = folder / spec.local_splits[split]
        if not path.is_file():
            raise DataError(f"Task {spec.name!r}: {path} does not exist (the local GLUE folder {folder} has no "
                            f"{split} split). Provide it, or use a task that has one"
                            + (" (or carve train out of the labelled dev file: data.train_from_dev=0.5)."
                               if split == "train" else "."))
        fix = f"this is not {spec.name}'s GLUE file layout: use the files of the GLUE release, or task=custom"
        columns = [*spec.local_columns, spec.local_label_column]
        out[split] = _standardise(read_table(path), spec.local_columns, spec.local_label_column,
                                  list(spec.label_names), dict.fromkeys(columns, fix), ids_allowed=True)
    return TaskData(spec.name, spec.label_names, spec.metric, out, f"local:{folder}")


def _load_custom(cfg: dict, splits: tuple[str, ...]) -> TaskData:
    files = cfg.get("files") or {}
    text_columns = tuple(cfg.get("text_columns") or ())
    label_column = cfg.get("label_column") or "label"
    if not text_columns or len(text_columns) > 2:
        raise DataError("task=custom needs env.custom.text_columns: one or two column names, e.g. [sentence].")
    missing = [s for s in splits if not files.get(s)]
    if missing:
        raise DataError(f"task=custom needs a file for each split {list(splits)}; missing: {missing}. "
                        "Set env.custom.files.train=... and env.custom.files.dev=... (TSV, CSV or JSONL).")
    fixes = {**dict.fromkeys(text_columns, "set env.custom.text_columns=[...] to the column(s) that hold the text"),
             label_column: "set env.custom.label_column=... to the column that holds the labels"}
    tables = {s: read_table(files[s], bool(cfg.get("quoted_tsv", False))) for s in splits}
    for table in tables.values():  # every column of every row, before labels are read off any of them
        require_columns(table, [*text_columns, label_column], fixes)
    label_names = cfg.get("label_names")
    if label_names is None:
        first = tables["train" if "train" in tables else splits[0]]
        values = {str(v).strip() for v in first.column(label_column)}
        label_names = sorted(values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit()
                                                    else 0, v))
    label_names = [str(x) for x in label_names]
    if len(label_names) < 2:
        raise DataError(f"task=custom: found {len(label_names)} distinct label(s) in column {label_column!r}; "
                        "a classification task needs at least two.")
    out = {s: _standardise(tables[s], text_columns, label_column, label_names, fixes) for s in splits}
    if "train" in out and len(set(out["train"]["label"])) < 2:
        raise DataError(f"task=custom: every row of {files['train']} has the same label "
                        f"({label_names[out['train']['label'][0]]!r}); a classifier needs at least two classes to "
                        "learn from.")
    return TaskData(cfg.get("name") or "custom", tuple(label_names), cfg.get("metric") or "accuracy", out,
                    "custom:" + ",".join(str(files[s]) for s in splits))


def read_texts(path: str | Path, text_columns: list[str] | tuple[str, ...]) -> tuple[list[str], list[str] | None]:
    """The text columns (one, or a pair) of a TSV/CSV/JSONL file, for prediction: no label needed. Errors name the
    file, the row, its line and the columns it has."""
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"Give one or two text columns, got {list(text_columns)}.")
    table = read_table(path)
    require_columns(table, text_columns, {c: "name the text columns with --text-columns" for c in text_columns})
    text_a = [str(v) for v in table.column(text_columns[0])]
    return text_a, [str(v) for v in table.column(text_columns[1])] if len(text_columns) > 1 else None


def label_ids(table: Table, label_column: str, label_names: list[str], ids_allowed: bool = False) -> list[int]:
    """Each row's label as its index in ``label_names``; ``ids_allowed`` also accepts labels written as ids (SST-2's
    0/1). An unknown label names its row, line and the valid ones."""
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for number, value in enumerate(table.column(label_column)):
        key = str(value).strip()
        if key not in index and ids_allowed and key.isdigit() and int(key) < len(label_names):
            key = label_names[int(key)]
        if key not in index:
            raise DataError(f"{table.where(number)}: label {value!r} in column {label_column!r} is not one of "
                            f"{label_names}.")
        labels.append(index[key])
    return labels


def _standardise(table: Table, text_columns, label_column: str, label_names: list[str], fixes: dict[str, str],
                 ids_allowed: bool = False):
    """Validate columns (row by row) and labels; ``fixes`` says per column which setting names it."""
    require_columns(table, [*text_columns, label_column], fixes)
    labels = label_ids(table, label_column, label_names, ids_allowed)
    text_b = [str(v) for v in table.column(text_columns[1])] if len(text_columns) > 1 else [None] * len(table)
    return _make_dataset({"text_a": [str(v) for v in table.column(text_columns[0])], "text_b": text_b,
                          "label": labels})


def _make_dataset(columns: dict[str, list]) -> datasets.Dataset:
    """A `datasets.Dataset` fingerprinted by our content hash. Without one, `datasets` hashes the whole table
    with dill, which is slow on large splits and fails on some Python/pyarrow pairs (seen on Python 3.12)."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable.from_pydict(columns), fingerprint=hash_json(columns))


def select_rows(ds: datasets.Dataset, indices: list[int]) -> datasets.Dataset:
    """Rows ``indices`` of ``ds``, fingerprinted by our content hash (no dill hashing)."""
    return ds.select(indices, new_fingerprint=hash_json([ds._fingerprint, indices]))
