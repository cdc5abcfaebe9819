"""Reading the reference files: one error type that names the file and says what to do."""

from __future__ import annotations

import json
from pathlib import Path


class ResultsError(ValueError):
    """A reference file the generator cannot read; the message names the file and what to do."""


def load_json(path: Path) -> object:
    """A reference JSON, or a `ResultsError` naming the file, the line and what to do."""
    if not path.is_file():
        raise ResultsError(f"{path}: missing; the docs quote it (restore it, or change docs/hooks/results_claims.py)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); fix the "
                           "file or move it out of benchmarks/reference/") from error
    except UnicodeDecodeError as error:
        raise ResultsError(f"{path}: not UTF-8 text ({error.reason}); reference JSON must be UTF-8") from error
