"""The README stays short, its links resolve, and its headline numbers are the measurements they cite.

Each row of the headline table links to one reference JSON file; `SOURCES` names, for every number of the row's
"measured" cell in order, the field of that file it shows. A number must equal its field at the precision shown (as
is, or times 100 for a fraction shown as a percentage), so an edited or mistyped number fails here; a new row needs
its fields named below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
TABLE_HEADING = "## Headline results"

# the first words of a row's "result" cell -> the JSON field of each number of its "measured" cell, in order.
# A path is dotted keys; [k=v,...] picks the list item whose fields equal those values; [i] indexes a list.
SOURCES = {
    "RTE main job": ["runs[run=reinforce alpha=0.04].dev.accuracy", "runs[run=reinforce alpha=0.04].dev.speedup",
                     "oracle.full_model.accuracy", "oracle.full_model.speedup"],
    "Learned policies only tie max-prob on SST-2": [
        "tasks.sst2.families.exit_scorer.validated_auc.mean", "tasks.sst2.families.confidence.validated_auc.mean",
        "tasks.sst2.difference.ci95[0]", "tasks.sst2.difference.ci95[1]"],
    "On MRPC the exit scorer edges max-prob": [
        "tasks.mrpc.families.exit_scorer.validated_auc.mean", "tasks.mrpc.families.confidence.validated_auc.mean",
        "tasks.mrpc.difference.ci95[0]", "tasks.mrpc.difference.ci95[1]"],
    "Runtime with a fixed exit at half depth": [
        "rows[shape=bert-base,batch=1,policy=static 6/12].runtime_ms",
        "rows[shape=bert-base,batch=1,policy=static 6/12].exitrl_full_ms",
        "rows[shape=bert-base,batch=1,policy=static 6/12].hf_eager_ms"],
    "A trained policy on real text, text in, on the CPU": [
        "trained_run.batches[batch=256].speedup", "trained_run.batches[batch=256].ideal_speedup",
        "trained_run.batches[batch=256].over_hf_pipeline", "trained_run.batches[batch=256].accuracy",
        "trained_run.batches[batch=256].accuracy_hf_pipeline"],
    "The counted device walk on the GPU": [
        "batches[batch=256].early_exit_best_compiled_ms", "batches[batch=256].full_best_compiled_ms",
        "batches[batch=256].speedup_best_compiled", "batches[batch=256].ideal_speedup",
        "batches[batch=256].speedup_best"],
    "Self-speculative decoding does not pay on SmolLM2-135M": [
        "runs[label=continued].points[method=selfspec,batch=1,knob.exit_layer=12,knob.draft_tokens=2].tokens_per_s",
        "runs[label=continued].baselines.1.compiled",
        "runs[label=continued].points[method=selfspec,batch=1,knob.exit_layer=12,knob.draft_tokens=2]"
        ".speedup_vs_compiled"],
}


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images that point into the repository (not web addresses, not anchors)."""
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def headline_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the first table under the headline heading."""
    section = text.split(TABLE_HEADING, 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    table = []
    for line in lines:
        if table and not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, _rule, *body = table
    assert header[:2] == ["result", "measured"], f"the headline table's columns changed: {header}"
    return body


def numbers_in(cell: str) -> list[tuple[float, int]]:
    """Every number of a cell with its decimals shown (Unicode minus and thousands commas understood)."""
    found = []
    for token in NUMBER.findall(cell.replace("\u2212", "-")):
        plain = token.replace(",", "")
        decimals = len(plain.split(".")[1]) if "." in plain else 0
        found.append((float(plain), decimals))
    return found


def field(data, path: str):
    """The value at ``path`` (see `SOURCES`) of parsed JSON ``data``."""
    for key, selector in re.findall(r"([^.\[\]]+)?(\[[^\]]*\])?\.?", path):
        if key:
            data = data[key]
        if selector:
            inner = selector[1:-1]
            if inner.isdigit():
                data = data[int(inner)]
            else:
                wanted = dict(part.split("=", 1) for part in inner.split(","))
                matches = [item for item in data if all(str(field(item, k)) == v for k, v in wanted.items())]
                assert len(matches) == 1, f"{path}: {len(matches)} items match {selector}"
                data = matches[0]
    return data


def shows(value: float, decimals: int, measured: float) -> bool:
    """Whether ``value``, shown with ``decimals`` decimals, is ``measured`` (as is, or times 100 as a percentage)."""
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(measured * scale - value) <= tolerance for scale in (1.0, 100.0))


def row_source(row: list[str]) -> Path:
    targets = [t for t in relative_links(" ".join(row)) if t.endswith(".json")]
    assert len(targets) == 1, f"each headline row links to one reference JSON file: {row[0]!r}"
    return ROOT / targets[0]


def row_fields(row: list[str]) -> list[str]:
    names = [prefix for prefix in SOURCES if row[0].startswith(prefix)]
    assert len(names) == 1, f"headline row {row[0]!r}: name the JSON field of each of its numbers in SOURCES"
    return SOURCES[names[0]]


def missing_numbers(row: list[str]) -> list[str]:
    """The numbers of the row's "measured" cell that differ from the fields they show."""
    data = json.loads(row_source(row).read_text())
    numbers, fields = numbers_in(row[1]), row_fields(row)
    assert len(numbers) == len(fields), f"row {row[0]!r} shows {len(numbers)} numbers; SOURCES names {len(fields)}"
    return [f"{value:.{decimals}f} (is {field(data, path)} at {path})"
            for (value, decimals), path in zip(numbers, fields) if not shows(value, decimals, field(data, path))]


def test_readme_is_short():
    count = len(README.read_text().splitlines())
    assert count <= MAX_LINES, f"README.md has {count} lines; keep it to {MAX_LINES} (move detail into docs/)."


def test_every_relative_link_resolves():
    text = README.read_text()
    targets = relative_links(text)
    assert targets, "the README links into the docs"
    broken = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_headline_numbers_are_in_their_json():
    rows = headline_rows(README.read_text())
    assert 4 <= len(rows) <= 6, f"4 to 6 headline results, found {len(rows)}"
    for row in rows:
        assert numbers_in(row[1]), f"row {row[0]!r} shows no number"
        source = row_source(row)
        assert source.is_file(), f"row {row[0]!r} links to {source}, which does not exist"
        date = re.search(r"\d{4}-\d{2}-\d{2}", row[2])
        assert date and date.group() in source.name, f"row {row[0]!r}: its date is not its file's ({source.name})"
        assert not missing_numbers(row), f"row {row[0]!r}: {missing_numbers(row)} not in {source.name}"


@pytest.mark.parametrize("nudge", [1, -1])
def test_a_changed_number_fails(nudge):
    """Change any one headline number by a few units of its last digit: the check must notice."""
    rows = headline_rows(README.read_text())
    for row in rows:
        for index, (value, decimals) in enumerate(numbers_in(row[1])):
            shown = [m for m in NUMBER.finditer(row[1].replace("\u2212", "-"))][index]
            changed = value + nudge * 10 ** -decimals
            text = f"{changed:,.{decimals}f}" if "," in shown.group() else f"{changed:.{decimals}f}"
            cell = row[1].replace("\u2212", "-")
            edited = [row[0], cell[:shown.start()] + text + cell[shown.end():], *row[2:]]
            assert missing_numbers(edited), f"changing {shown.group()} to {text} in {row[0]!r} went unnoticed"
