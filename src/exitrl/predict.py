"""``python -m exitrl.predict RUN_DIR --input FILE.{tsv,csv,jsonl} --output preds.jsonl``: classify a file with the
run's backbone and exit policy (`exitrl.runtime.classifier.EarlyExitClassifier`), one JSON line per input row
(``label``, ``probs``, ``exit_layer``), then a summary line: examples/s, mean exit layer, saved layers.

Text columns default to the run's task (a GLUE task's file columns, or a custom task's ``text_columns``);
``--text-columns a b`` names others. Files are read by the same readers as training data, with the same errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from exitrl.cli import USER_ERRORS, fail
from exitrl.data import GLUE_TASKS, read_texts
from exitrl.experiments.runs import Run
from exitrl.runtime.classifier import EarlyExitClassifier


def default_columns(run_dir: Path, task: str) -> list[str]:
    """The run's text columns: a custom task's from its config, a GLUE task's from its file layout."""
    config = run_dir / "config.yaml"
    if config.is_file():
        custom = OmegaConf.select(OmegaConf.load(config), "env.custom.text_columns")
        if custom:
            return list(custom)
    if task in GLUE_TASKS:
        return list(GLUE_TASKS[task].local_columns)
    raise ValueError(f"Cannot tell the text columns of task {task!r}: name them with --text-columns.")


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 32,
                 text_columns: list[str] | None = None, device: str = "auto") -> dict:
    """Predict every row of ``input_path`` into ``output_path``; returns the summary."""
    run_dir = Path(run_dir)
    classifier = EarlyExitClassifier.from_run(run_dir, device)
    columns = text_columns or default_columns(run_dir, Run.load(run_dir).record.task)
    first, second = read_texts(input_path, columns)
    started = time.time()
    pairs = list(zip(first, second)) if second is not None else first
    answers = classifier.predict(pairs, batch_size=batch_size, progress=True)
    seconds = time.time() - started
    with open(output_path, "w") as out:
        for answer in answers:
            out.write(json.dumps(answer) + "\n")
    num_layers = classifier.model.num_layers
    mean_exit = sum(a["exit_layer"] for a in answers) / max(len(answers), 1)
    return {"examples": len(answers), "seconds": round(seconds, 3), "examples_per_second": len(answers) / seconds,
            "avg_exit_layer": mean_exit, "saved_layers": 1 - mean_exit / num_layers, "device": str(classifier.device),
            "output": str(output_path)}


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(prog="python -m exitrl.predict", description=__doc__.split("\n\n")[0])
    parse.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by exitrl.train")
    parse.add_argument("--input", required=True, help="a TSV (no quote processing), CSV or JSONL file")
    parse.add_argument("--output", required=True, help="where to write one JSON line per input row")
    parse.add_argument("--text-columns", nargs="+", help="one column, or two for text pairs")
    parse.add_argument("--batch-size", type=int, default=32)
    parse.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parse.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = predict_file(args.run_dir, args.input, args.output, args.batch_size, args.text_columns,
                               args.device)
    except USER_ERRORS as err:
        fail(err, "exitrl.predict")
    print(f"exitrl: {summary['examples']} examples in {summary['seconds']:.2f} s "
          f"({summary['examples_per_second']:.1f} examples/s on {summary['device']}), mean exit layer "
          f"{summary['avg_exit_layer']:.2f}, saved layers {100 * summary['saved_layers']:.1f} %; wrote "
          f"{summary['output']}")


if __name__ == "__main__":
    main()
