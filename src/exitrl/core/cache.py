"""Where exitrl keeps what it computes or fetches once (fine-tuned backbones, traces, fetched weights):
``EXITRL_CACHE_DIR``, else ``~/.cache/exitrl``; a config's ``cache_dir`` overrides both."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EXITRL_CACHE_DIR"
DEFAULT_CACHE = "~/.cache/exitrl"


def cache_dir(default: str | Path | None = None) -> Path:
    return Path(default or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
