"""One self-contained folder per `EarlyExitClassifier`, as a Hugging Face user expects from ``save_pretrained`` /
``from_pretrained``: it loads anywhere, without the run folder, the exitrl cache or the hub.

The folder reuses the formats exitrl already writes, so there is no second format to keep in step::

    exitrl_classifier.json   the manifest (below)
    backbone/                `MultiExitModel.save`, as ``exitrl export`` writes it: encoder/ (weights, config and the
                             tokenizer, by save_pretrained), heads.pt, exitrl_backbone.json
    policy.pt                `ExitPolicy.save`, as a run's policy.pt: class path, constructor config, tensors

The manifest: ``format`` and ``format_version`` (a newer one is refused with "upgrade exitrl"), ``exitrl_version``,
``num_layers``, ``num_labels``, ``label_names``, ``max_length`` (tokens), ``dtype`` (of the saved weights),
``policy`` (name, class and config), ``task`` (name, metric, text and label columns, when known: ``exitrl predict``
reads them), ``source`` (the run folder, when exported from one) and ``files``: the sha256 of every other file, checked
on load, so a missing or damaged file is named instead of failing somewhere inside transformers or torch.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from exitrl.backbones.multi_exit import MultiExitModel
from exitrl.backbones.wheel_weights import sha256_of
from exitrl.core.device import pick_device
from exitrl.policy import ExitPolicy, load_policy

MANIFEST = "exitrl_classifier.json"
FORMAT = "exitrl-classifier"
FORMAT_VERSION = 1  # raise on a change that older exitrl cannot read
BACKBONE = "backbone"
POLICY = "policy.pt"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED = ("num_layers", "label_names", "max_length", "files")
SAVE_HINT = "save it again with EarlyExitClassifier.save_pretrained(dir) or exitrl export RUN_DIR --pretrained DIR"


class Classifier(Protocol):
    """What a folder holds of an `exitrl.runtime.classifier.EarlyExitClassifier` (that module imports this one, not
    the other way round)."""

    model: MultiExitModel
    tokenizer: Any
    policy: ExitPolicy
    label_names: list[str]
    max_length: int


class PretrainedError(ValueError):
    """A folder that is not a saved classifier, or one with a missing, damaged or too new file; the message names
    the file and what to do."""


def dtype_of(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"`` / ``torch.float16`` style names of the precisions a folder may hold; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise PretrainedError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")


def is_pretrained(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved classifier (its manifest), checked or not."""
    return (Path(directory) / MANIFEST).is_file()


def _json_safe(value: Any) -> Any:
    """The policy's constructor config as the manifest shows it (tuples as lists; anything else JSON lacks as text);
    policy.pt keeps the real one."""
    return json.loads(json.dumps(value, default=str))


def _checksums(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): sha256_of(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def save_pretrained(classifier: Classifier, directory: str | Path, dtype: str | torch.dtype | None = None,
                    task: dict | None = None, source: str | None = None) -> Path:
    """Write ``classifier`` into ``directory`` (created; a classifier saved there before is replaced, any other
    non-empty folder is refused). ``dtype``: the weights' precision on disk (default: the model's own; another one
    converts a copy, the classifier keeps its weights). ``task``: ``{"name", "metric", "text_columns",
    "label_column"}`` for ``exitrl predict`` (default: what the classifier was loaded with, if anything);
    ``source``: where it came from (a run folder). The folder is written beside its place and renamed, so an
    interrupted save leaves no half folder under the name."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir()) and not is_pretrained(directory)):
        raise PretrainedError(f"{directory} exists and is not a saved classifier: save into a new or empty folder "
                              "(a classifier saved there before is replaced).")
    wanted = dtype_of(dtype)
    model = classifier.model
    current = next(model.parameters()).dtype
    if wanted is not None and wanted != current:
        model = copy.deepcopy(model).to(dtype=wanted)
    saved_dtype = str(wanted or current).removeprefix("torch.")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save(partial / BACKBONE, classifier.tokenizer, extra={"dtype": saved_dtype})
    policy = classifier.policy
    policy.save(partial / POLICY)
    payload = policy.payload()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "exitrl_version": _version(),
        "num_layers": model.num_layers, "num_labels": model.num_labels, "label_names": list(classifier.label_names),
        "max_length": classifier.max_length, "dtype": saved_dtype,
        "policy": {"name": policy.name, "class": payload["class"], "config": _json_safe(payload["config"])},
        "task": task if task is not None else getattr(classifier, "task_info", None), "source": source,
        "files": _checksums(partial),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def _version() -> str:
    from exitrl import __version__

    return __version__


def read_manifest(directory: str | Path) -> dict:
    """The folder's manifest, checked for its format and version (not its files: `verify_files`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        where = "does not exist" if not directory.exists() else f"is not a saved classifier (no {MANIFEST})"
        hint = (" It is a run folder: load it with EarlyExitClassifier.from_run, or make a classifier folder of it "
                "with exitrl export RUN_DIR --pretrained OUT_DIR." if (directory / "metrics.json").is_file() else
                " Point at a folder written by EarlyExitClassifier.save_pretrained or exitrl export RUN_DIR "
                "--pretrained OUT_DIR.")
        raise PretrainedError(f"{directory} {where}.{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{path} is damaged (not JSON: {err}): copy the folder again, or {SAVE_HINT}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PretrainedError(f"{path} is not an exitrl classifier manifest (no \"format\": \"{FORMAT}\"): copy the "
                              f"folder again, or {SAVE_HINT}.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PretrainedError(f"{path} has format_version {version!r} (saved by exitrl "
                              f"{manifest.get('exitrl_version', '?')}); this exitrl ({_version()}) reads up to "
                              f"{FORMAT_VERSION}: upgrade exitrl.")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise PretrainedError(f"{path} lacks {missing}: copy the folder again, or {SAVE_HINT}.")
    return manifest


def verify_files(directory: str | Path, manifest: dict) -> None:
    """Every file the manifest lists is there, with the sha256 it was saved with."""
    directory = Path(directory)
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise PretrainedError(f"{path} is missing ({MANIFEST} lists it): copy the whole folder again, or "
                                  f"{SAVE_HINT}.")
        if sha256_of(path) != digest:
            raise PretrainedError(f"{path} does not match its sha256 in {MANIFEST}: the file is damaged or was "
                                  f"changed after saving. Copy the folder again, or {SAVE_HINT}.")


def load_pretrained(directory: str | Path, factory: type, device: str | torch.device = "auto", verify: bool = True,
                    **options) -> Any:
    """The classifier saved in ``directory``, built by ``factory`` (`EarlyExitClassifier` or a subclass: its
    constructor takes the model, tokenizer, policy, label names, max length and device) on ``device``. ``verify``:
    check every file's sha256 first (a few seconds per GB). ``options``: the constructor's options (``dtype``:
    default bf16 on CUDA, fp32 on the CPU, whatever precision the folder holds; ``fast``; ``compile_decisions``;
    ``window``; ``compile_layers``; ``late_reads``; ``device_walk``)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    model, tokenizer, _ = MultiExitModel.load(directory / BACKBONE)
    policy = load_policy(directory / POLICY)
    device = pick_device(str(device))
    classifier = factory(model, tokenizer, policy, manifest["label_names"], manifest["max_length"], device, **options)
    classifier.task_info = manifest.get("task")  # kept when the classifier is saved again
    return classifier
