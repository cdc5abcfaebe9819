"""``python -m exitrl.export RUN_DIR``: make a run folder self-contained, so it reloads on another machine without
the cache: the backbone the run used (fp16 by default) goes into ``RUN_DIR/backbone/`` and its trace into
``RUN_DIR/trace.pt``; metrics.json records what was exported. `exitrl.experiments.runs.Run` and `exitrl.load_trace`
look in the folder first. A co-trained run already holds its backbone.

``python -m exitrl.export RUN_DIR --pretrained OUT_DIR`` writes instead one self-contained classifier folder
(`exitrl.runtime.pretrained`: backbone, tokenizer, policy, label names, max length, the task's columns and a
checksummed manifest) that ``EarlyExitClassifier.from_pretrained`` and ``exitrl predict`` load; the run folder is left
as it is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from exitrl.backbones import MultiExitModel
from exitrl.cli import add_threads_option, fail, interrupted
from exitrl.core.threads import threads_for
from exitrl.experiments.runs import BACKBONE_DIR, TRACE_FILE, Run
from exitrl.runtime.pretrained import DTYPES


def export_run(run_dir: str | Path, dtype: str = "float16", trace: bool = True) -> Run:
    """Copy the run's backbone (cast to ``dtype``) and, with ``trace``, its trace into the run folder."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    run = Run.load(run_dir)
    record = run.record
    exported = dict(record.backbone.get("exported") or {})
    target = run.dir / BACKBONE_DIR
    if not (target / "exitrl_backbone.json").is_file():
        source = run.backbone_path()  # a clear error when the cache entry is gone
        model, tokenizer, meta = MultiExitModel.load(source, dtype=DTYPES[dtype])
        partial = target.with_name(target.name + ".partial")
        model.save(partial, tokenizer, extra={**meta, "exported_from": str(source), "dtype": dtype})
        partial.rename(target)
        exported.update(backbone=BACKBONE_DIR, dtype=dtype)
    if trace and not (run.dir / TRACE_FILE).is_file():
        shutil.copyfile(run.trace_path(), run.dir / TRACE_FILE)
        exported["trace"] = TRACE_FILE
    record.backbone["exported"] = exported
    record.write(run.dir)
    return Run.load(run.dir)


def export_pretrained(run_dir: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """The run's backbone (cast to ``dtype``), tokenizer and policy, its label names, traced length and task columns
    as one classifier folder ``out_dir`` (`exitrl.runtime.pretrained`)."""
    from exitrl.predict import run_task  # the runtime, only when it is used: `exitrl export` starts quickly
    from exitrl.runtime.classifier import EarlyExitClassifier
    from exitrl.runtime.pretrained import save_pretrained

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    run_dir = Path(run_dir)
    task = run_task(run_dir)  # a folder that is not a run fails here, before any loading
    classifier = EarlyExitClassifier.from_run(run_dir, "cpu", dtype=DTYPES[dtype])
    columns = {"name": task.name, "metric": task.metric, "text_columns": task.text_columns,
               "label_column": task.label_column}
    return save_pretrained(classifier, out_dir, task=columns, source=str(run_dir.resolve()))


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(prog="exitrl export", description=__doc__.split("\n\n")[0])
    parse.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by exitrl.train or exitrl.sweep")
    parse.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="precision of the copied backbone")
    parse.add_argument("--no-trace", action="store_true", help="do not copy the trace (reload then needs the cache)")
    parse.add_argument("--pretrained", metavar="OUT_DIR", default=None,
                       help="write one self-contained classifier folder there instead (EarlyExitClassifier."
                            "from_pretrained, exitrl predict OUT_DIR); the run folder is left as it is")
    add_threads_option(parse, "backbone")
    args = parse.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with threads_for("backbone", args.threads):
            if args.pretrained is not None:
                folder = export_pretrained(args.run_dir, args.pretrained, args.dtype)
            else:
                run = export_run(args.run_dir, args.dtype, not args.no_trace)
    except ValueError as err:
        fail(err, "exitrl.export")
    except KeyboardInterrupt:  # the backbone is written beside its place and renamed: no half copy remains
        interrupted("run it again to finish the export", "exitrl.export")
    if args.pretrained is not None:
        print(f"exported {args.run_dir} as a classifier folder: {folder} (EarlyExitClassifier.from_pretrained, "
              f"exitrl predict {folder})")
    else:
        print(f"exported {run.dir}: {run.record.backbone['exported']}")


if __name__ == "__main__":
    main()
