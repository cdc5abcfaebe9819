"""Text for causal LMs, available offline: the sentences of a GLUE task (or custom files) and the Python sources of
installed packages as a code corpus; split into train and held-out *by document* (a held-out document never lends
a sentence to training) and packed into fixed-length token chunks.

Why packing: LM training and token traces want every position to count, and equal lengths make batches without
padding. Documents are joined with the tokenizer's end-of-sequence token, as in pretraining.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from exitrl.data.loading import DataError, load_task

SOURCES = ("glue", "python", "files")


def glue_documents(task: str, data_dir: str | Path | None = None, splits=("train", "dev")) -> list[str]:
    """Every distinct sentence of ``task``'s ``splits`` (both sides of a pair), in file order."""
    data = load_task(task, data_dir, splits)
    seen, documents = set(), []
    for split in splits:
        for column in ("text_a", "text_b"):
            for text in data.splits[split][column]:
                if text and text not in seen:
                    seen.add(text)
                    documents.append(text)
    return documents


def python_documents(packages: list[str], max_files: int | None = None) -> list[str]:
    """The ``.py`` files of installed ``packages`` (sorted paths; files that are not UTF-8 are skipped)."""
    documents = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"lm_text: package {name!r} is not installed here (or is a single module); name "
                            "installed packages in lm_text.packages.")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                documents.append(text)
            if max_files is not None and len(documents) >= max_files:
                return documents
    return documents


def file_documents(paths: list[str | Path]) -> list[str]:
    """One document per non-empty line of each UTF-8 text file."""
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"lm_text: file {path} does not exist.")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"lm_text: {path} is not UTF-8 (line {line}).") from err
        documents += [line for line in lines if line.strip()]
    return documents


def held_out_document(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out part: a hash of its text, so the split does not depend on the
    order or on which other documents are present."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def split_documents(documents: list[str], held_out: float) -> dict[str, list[str]]:
    if not 0.0 < held_out < 1.0:
        raise DataError(f"lm_text.held_out must lie in (0, 1), got {held_out}.")
    parts = {"train": [], "held_out": []}
    for text in documents:
        parts["held_out" if held_out_document(text, held_out) else "train"].append(text)
    for name, part in parts.items():
        if not part:
            raise DataError(f"lm_text: the {name} part has no documents ({len(documents)} in all); give more text "
                            "or change lm_text.held_out.")
    return parts


def pack(tokenizer, documents: list[str], length: int, max_chunks: int | None = None) -> list[dict]:
    """Token chunks of exactly ``length`` ids: documents joined by the EOS token, the tail that does not fill a
    chunk dropped. Each chunk is ``{"input_ids", "labels"}`` (the same ids: the loss shifts them)."""
    if length < 2:
        raise DataError(f"lm_text.length must be >= 2 (a token and its successor), got {length}.")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError("The tokenizer has no end-of-sequence (or separator) token to join documents with.")
    stream: list[int] = []
    chunks = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        while len(stream) >= length:
            ids, stream = stream[:length], stream[length:]
            chunks.append({"input_ids": ids, "labels": ids})
            if max_chunks is not None and len(chunks) >= max_chunks:
                return chunks
    return chunks
