"""Task registry: how each supported task maps onto text columns, label names and a metric."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """Everything the loaders need to know about one classification task.

    ``label_names`` fixes the integer id of every label (the hub's GLUE ids), so the hub and a local
    folder give the same ids. ``local_columns`` names the TSV columns of the canonical GLUE files.
    """

    name: str
    hub_path: str | None
    hub_config: str | None
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str = "accuracy"
    local_folder: str | None = None
    local_columns: tuple[str, ...] = ()
    local_label_column: str = "label"
    local_splits: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation"})


GLUE_TASKS: dict[str, TaskSpec] = {
    "rte": TaskSpec(
        name="rte",
        hub_path="nyu-mll/glue",
        hub_config="rte",
        text_columns=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
        local_folder="RTE",
        local_columns=("sentence1", "sentence2"),
    ),
    "sst2": TaskSpec(
        name="sst2",
        hub_path="nyu-mll/glue",
        hub_config="sst2",
        text_columns=("sentence",),
        label_names=("negative", "positive"),
        local_folder="SST-2",
        local_columns=("sentence",),
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        hub_path="nyu-mll/glue",
        hub_config="mrpc",
        text_columns=("sentence1", "sentence2"),
        label_names=("not_equivalent", "equivalent"),
        metric="f1",
        local_folder="MRPC",
        local_columns=("#1 String", "#2 String"),
        local_label_column="Quality",
    ),
    "qnli": TaskSpec(
        name="qnli",
        hub_path="nyu-mll/glue",
        hub_config="qnli",
        text_columns=("question", "sentence"),
        label_names=("entailment", "not_entailment"),
        local_folder="QNLI",
        local_columns=("question", "sentence"),
    ),
}

TASK_NAMES: tuple[str, ...] = (*GLUE_TASKS, "custom")
