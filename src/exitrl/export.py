"""``python -m exitrl.export RUN_DIR``: make a run folder self-contained, so it reloads on another machine without
the cache: the backbone the run used (fp16 by default) goes into ``RUN_DIR/backbone/`` and its trace into
``RUN_DIR/trace.pt``; metrics.json records what was exported. `exitrl.experiments.runs.Run` and `exitrl.load_trace`
look in the folder first. A co-trained run already holds its backbone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from exitrl.backbones import MultiExitModel
from exitrl.cli import add_threads_option, fail, interrupted
from exitrl.core.threads import threads_for
from exitrl.experiments.runs import BACKBONE_DIR, TRACE_FILE, Run

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(prog="exitrl export", description=__doc__.split("\n\n")[0])
    parse.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by exitrl.train or exitrl.sweep")
    parse.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="precision of the copied backbone")
    parse.add_argument("--no-trace", action="store_true", help="do not copy the trace (reload then needs the cache)")
    add_threads_option(parse, "backbone")
    args = parse.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with threads_for("backbone", args.threads):
            run = export_run(args.run_dir, args.dtype, not args.no_trace)
    except ValueError as err:
        fail(err, "exitrl.export")
    except KeyboardInterrupt:  # the backbone is written beside its place and renamed: no half copy remains
        interrupted("run it again to finish the export", "exitrl.export")
    print(f"exported {run.dir}: {run.record.backbone['exported']}")


if __name__ == "__main__":
    main()
