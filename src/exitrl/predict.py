"""``python -m exitrl.predict RUN_DIR --input FILE.{tsv,csv,jsonl} --output preds.jsonl``: classify a file with the
run's backbone and exit policy (`exitrl.runtime.classifier.EarlyExitClassifier`), one JSON line per input row
(``id``, ``label``, ``probs``, ``exit_layer``, and ``gold`` when the file has labels), then a summary: examples/s,
mean exit layer, saved layers, the layer speedup (L / mean exit layer) beside the measured wall-clock speedup against
the full model (`exitrl.runtime.speed`, on at most ``--speed-sample`` rows) and, when the file has the run's label
column, accuracy and the exit-layer histogram. RUN_DIR may also be a classifier folder (``exitrl export RUN_DIR
--pretrained OUT_DIR``, ``EarlyExitClassifier.save_pretrained``).

Text columns default to the run's task (a GLUE task's file columns, or a custom task's ``text_columns``);
``--text-columns a b`` names others. A run on a pair task (RTE, MRPC, QNLI) needs both texts of each pair. The file
is read and checked row by row (by the same readers as training data, with the same errors) before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from exitrl.cli import USER_ERRORS, add_threads_option, fail, interrupted, warn_if_busy
from exitrl.core.metrics import summarize_exits
from exitrl.core.threads import threads_for
from exitrl.data import GLUE_TASKS, DataError, Table, label_ids, read_table, require_columns
from exitrl.experiments.runs import Run
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.pretrained import is_pretrained, read_manifest
from exitrl.runtime.speed import measure_wall_clock

ID_COLUMNS = ("id", "idx", "index", "guid")  # an input's id column, when --id-column names none: the first present


@dataclass
class RunTask:
    """What a run's task says about an input file: its text and label columns, label names and metric."""

    name: str
    text_columns: list[str] | None
    label_column: str
    label_names: list[str] | None
    metric: str


def run_task(run_dir: Path) -> RunTask:
    """The run's task: a custom task's columns from its config, a GLUE task's from its file layout; a classifier
    folder's from its manifest."""
    if is_pretrained(run_dir):
        return pretrained_task(run_dir)
    record = Run.load(run_dir).record
    config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    custom = OmegaConf.select(config, "env.custom") if config is not None else None
    columns, label_column = None, "label"
    if custom is not None and OmegaConf.select(custom, "text_columns"):
        columns, label_column = list(custom.text_columns), str(OmegaConf.select(custom, "label_column") or "label")
    elif record.task in GLUE_TASKS:
        spec = GLUE_TASKS[record.task]
        columns, label_column = list(spec.local_columns), spec.local_label_column
    names = [str(n) for n in record.label_names] if record.label_names is not None else None
    return RunTask(record.task, columns, label_column, names, record.metric)


def pretrained_task(folder: Path) -> RunTask:
    """A classifier folder's task, as its manifest recorded it (a classifier saved from Python without a task: the
    text columns must be named with --text-columns)."""
    manifest = read_manifest(folder)
    task = manifest.get("task") or {}
    columns = task.get("text_columns")
    return RunTask(str(task.get("name") or "unknown"), list(columns) if columns else None,
                   str(task.get("label_column") or "label"), [str(n) for n in manifest["label_names"]],
                   str(task.get("metric") or "accuracy"))


@dataclass
class Inputs:
    """The rows to predict: texts (or pairs), an id per row, and the labels when the file has them."""

    texts: list
    ids: list
    id_column: str | None
    labels: list | None
    label_column: str | None


def check_pairs(table: Table, columns: list[str], task: RunTask) -> None:
    """A pair task's run refuses a file of single texts, saying so."""
    absent = [c for c in columns if not table.has(c)]
    if len(columns) < 2 or not absent:
        return
    present = list(table.header if table.header is not None else table.rows[0])
    texts = [c for c in present if c not in (*ID_COLUMNS, task.label_column)]
    if len(texts) < 2:
        raise DataError(f"{table.path} holds single texts (columns: {', '.join(present)}), but the run's task "
                        f"{task.name} classifies text pairs ({columns[0]!r} and {columns[1]!r}): give a file with "
                        "both texts of each pair, or use a run trained on single texts.")
    raise DataError(f"{table.path} has no column {absent[0]!r} (columns: {', '.join(present)}); the run's task "
                    f"{task.name} classifies text pairs ({columns[0]!r} and {columns[1]!r}): name the file's two text "
                    "columns with --text-columns FIRST SECOND.")


def read_inputs(path: str | Path, task: RunTask, text_columns: list[str] | None = None, id_column: str | None = None,
                label_column: str | None = None, limit: int | None = None) -> Inputs:
    """Read and check the input file for ``task`` (every row, up to ``limit``) without any model."""
    columns = list(text_columns or task.text_columns or [])
    if not columns:
        raise DataError(f"Cannot tell the text columns of task {task.name!r}: name them with --text-columns.")
    if not 1 <= len(columns) <= 2:
        raise DataError(f"--text-columns takes one column, or two for text pairs; got {columns}.")
    if task.text_columns and len(columns) != len(task.text_columns):
        kind = "text pairs" if len(task.text_columns) == 2 else "single texts"
        raise DataError(f"The run's task {task.name} classifies {kind} ({', '.join(task.text_columns)}); "
                        f"--text-columns {' '.join(columns)} names {len(columns)} column(s): name "
                        f"{len(task.text_columns)}.")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}.")
    table = read_table(path)
    if limit is not None:
        table = Table(table.path, table.rows[:limit], table.lines[:limit], table.header)
    if not table.rows:
        raise DataError(f"{table.path} has no data rows.")
    check_pairs(table, columns, task)
    require_columns(table, columns, dict.fromkeys(columns, "name the text columns with --text-columns"))
    texts = [str(v) for v in table.column(columns[0])]
    if len(columns) == 2:
        texts = list(zip(texts, [str(v) for v in table.column(columns[1])]))
    id_column = id_column or next((c for c in ID_COLUMNS if table.has(c)), None)
    if id_column is not None:
        require_columns(table, [id_column], {id_column: "give every row an id, or name the id column with "
                                                        "--id-column"})
    ids = table.column(id_column) if id_column is not None else list(range(1, len(table) + 1))
    labels = None
    label_column = label_column or (task.label_column if table.has(task.label_column) else None)
    if label_column is not None:
        require_columns(table, [label_column], {label_column: "name the label column with --label-column"})
        labels = (label_ids(table, label_column, task.label_names, ids_allowed=True) if task.label_names
                  else table.column(label_column))
    return Inputs(texts, ids, id_column, labels, label_column)


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 32,
                 text_columns: list[str] | None = None, device: str = "auto", id_column: str | None = None,
                 label_column: str | None = None, limit: int | None = None, speed_sample: int = 512) -> dict:
    """Predict every row of ``input_path`` (the first ``limit``) into ``output_path``; returns the summary. The
    file is checked before the model loads. ``speed_sample``: rows (at most) on which the policy is timed against
    the full model after the predictions (0: not measured). ``run_dir``: a run folder or a classifier folder."""
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
    if speed_sample < 0:
        raise ValueError(f"--speed-sample must be >= 0 (0: no timing), got {speed_sample}.")
    task = run_task(run_dir)
    inputs = read_inputs(input_path, task, text_columns, id_column, label_column, limit)
    if not Path(output_path).parent.is_dir():
        raise ValueError(f"--output {output_path}: the folder {Path(output_path).parent} does not exist.")
    classifier = (EarlyExitClassifier.from_pretrained(run_dir, device) if is_pretrained(run_dir)
                  else EarlyExitClassifier.from_run(run_dir, device))
    labels = inputs.labels
    if labels is not None and task.label_names is None:  # a record without label names: the trace's
        table = Table(Path(input_path), [{"label": v} for v in labels], list(range(1, len(labels) + 1)), None)
        labels = label_ids(table, "label", classifier.label_names, ids_allowed=True)
    started = time.time()
    answers = classifier.predict(inputs.texts, batch_size=batch_size, progress=True)
    seconds = time.time() - started
    with open(output_path, "w", encoding="utf-8") as out:
        for number, (row_id, answer) in enumerate(zip(inputs.ids, answers)):
            gold = {"gold": classifier.label_names[labels[number]]} if labels is not None else {}
            out.write(json.dumps({"id": row_id, **answer, **gold}, ensure_ascii=False) + "\n")
    num_layers = classifier.model.num_layers
    layers = torch.tensor([a["exit_layer"] for a in answers])
    mean_exit = float(layers.float().mean())
    summary = {"examples": len(answers), "seconds": round(seconds, 3),
               "examples_per_second": len(answers) / max(seconds, 1e-9), "avg_exit_layer": mean_exit,
               "saved_layers": 1 - mean_exit / num_layers, "layer_speedup": num_layers / mean_exit,
               "wall_clock_speedup": None, "speed": None, "device": str(classifier.device),
               "output": str(output_path), "id_column": inputs.id_column,
               "exit_histogram": torch.bincount(layers - 1, minlength=num_layers).tolist()}
    if speed_sample:
        measured = measure_wall_clock(classifier, inputs.texts, batch_size, speed_sample)
        if measured is not None:
            summary.update(wall_clock_speedup=measured.wall_clock_speedup, speed=measured.to_dict())
    if labels is not None:
        index = {name: i for i, name in enumerate(classifier.label_names)}
        predictions = torch.tensor([index[a["label"]] for a in answers])
        scores = summarize_exits(layers, predictions, torch.tensor(labels), num_layers, task.metric)
        summary.update(label_column=inputs.label_column, accuracy=scores["accuracy"], metric=task.metric,
                       score=scores["score"])
    return summary


def report(summary: dict) -> str:
    """The summary in words: speed and exits, then, with labels, accuracy and the exit-layer histogram."""
    lines = [f"exitrl: {summary['examples']} examples in {summary['seconds']:.2f} s "
             f"({summary['examples_per_second']:.1f} examples/s on {summary['device']}), mean exit layer "
             f"{summary['avg_exit_layer']:.2f}, saved layers {100 * summary['saved_layers']:.1f} %; wrote "
             f"{summary['output']} (ids: {summary['id_column'] or 'row numbers'})", speed_line(summary)]
    if "accuracy" in summary:
        score = f", {summary['metric']} {100 * summary['score']:.2f} %" if summary["metric"] != "accuracy" else ""
        lines.append(f"exitrl: accuracy {100 * summary['accuracy']:.2f} %{score} against column "
                     f"{summary['label_column']!r}")
    total = max(summary["examples"], 1)
    lines.append("exitrl: exit layers: " + ", ".join(f"{layer}: {count} ({100 * count / total:.1f} %)"
                                                     for layer, count in enumerate(summary["exit_histogram"], 1)))
    return "\n".join(lines)


def speed_line(summary: dict) -> str:
    """The layer speedup beside the measured wall-clock speedup, and where it was measured."""
    line = f"exitrl: layer speedup {summary['layer_speedup']:.2f}x (L / mean exit layer)"
    speed = summary.get("speed")
    if speed is None:
        return f"{line}; wall-clock speedup not measured (--speed-sample 0)"
    return (f"{line}, wall-clock speedup {speed['wall_clock_speedup']:.2f}x against the full model on "
            f"{speed['device']} ({speed['examples']} rows, batch {speed['batch_size']}; "
            f"{speed['layer_speedup']:.2f}x in layers on those rows)")


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(prog="python -m exitrl.predict", description=__doc__.split("\n\n")[0])
    parse.add_argument("run_dir", metavar="RUN_DIR",
                       help="a folder written by exitrl.train, or a classifier folder (exitrl export RUN_DIR "
                            "--pretrained OUT_DIR)")
    parse.add_argument("--input", required=True, help="a TSV (no quote processing), CSV or JSONL file")
    parse.add_argument("--output", required=True, help="where to write one JSON line per input row")
    parse.add_argument("--text-columns", nargs="+", help="one column, or two for text pairs")
    parse.add_argument("--batch-size", type=int, default=32)
    parse.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parse.add_argument("--id-column", default=None,
                       help="the column whose value starts each output line as \"id\" (default: the input's "
                            f"{', '.join(ID_COLUMNS)} column, the first it has; without one, the row number: 1 for "
                            "the first data row)")
    parse.add_argument("--label-column", default=None,
                       help="gold labels, for accuracy and the exit histogram (default: the run's label column, "
                            "when the input has it)")
    parse.add_argument("--limit", type=int, default=None, metavar="N", help="predict only the first N rows")
    parse.add_argument("--speed-sample", type=int, default=512, metavar="N",
                       help="after predicting, time the policy against the full model on at most N of the rows "
                            "(same batches; one warm-up batch each) for the wall-clock speedup; 0: do not (default: "
                            "512)")
    add_threads_option(parse, "backbone")
    args = parse.parse_args(sys.argv[1:] if argv is None else argv)
    warn_if_busy(args.threads)
    try:
        with threads_for("backbone", args.threads):
            summary = predict_file(args.run_dir, args.input, args.output, args.batch_size, args.text_columns,
                               args.device, args.id_column, args.label_column, args.limit, args.speed_sample)
    except USER_ERRORS as err:
        fail(err, "exitrl.predict")
    except KeyboardInterrupt:  # the output is written at the end: no partial file
        interrupted("nothing was written; run it again (--limit N predicts fewer rows)", "exitrl.predict")
    print(report(summary))


if __name__ == "__main__":
    main()
