"""The docs' generated pages: the results pages and the reproductions claims come from `benchmarks/reference/` (real
files), every reference file is listed, a number from a JSON reaches its page, and a bad file fails naming itself."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "reference"
sys.path.insert(0, str(ROOT / "docs" / "hooks"))

import results  # noqa: E402 - the MkDocs hook, importable from docs/hooks
from results_io import ResultsError  # noqa: E402


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return results.build_pages(REFERENCE)


def test_every_reference_file_is_listed_and_copied(pages: dict[str, str]) -> None:
    names = sorted(p.name for p in REFERENCE.iterdir() if p.is_file())
    assert names
    index = pages["results/index.md"]
    raw = results.raw_files(REFERENCE)
    for name in names:
        assert f"(raw/{name})" in index, name
        assert raw[f"results/raw/{name}"] == REFERENCE / name
    for group in results.GROUPS:  # every page the nav of mkdocs.yml names exists, even when empty
        assert f"results/{group.slug}.md" in pages
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"results/{group.slug}.md" in nav for group in results.GROUPS)


def test_numbers_from_the_json_reach_their_page(pages: dict[str, str]) -> None:
    learned = pages["results/learned-vs-rules.md"]
    study = json.loads((REFERENCE / "learned_vs_rules_h200_2026-12-01.json").read_text())["tasks"]["mrpc"]
    low, high = (100 * v for v in study["difference"]["ci95"])
    assert f"[{low:+.2f}, {high:+.2f}]" == "[+0.06, +0.85]"  # the MRPC CI the README quotes
    assert "[+0.06, +0.85]" in learned
    auc = study["families"]["exit_scorer"]["validated_auc"]
    assert f"{100 * auc['mean']:.2f} ± {100 * auc['std']:.2f}" in learned
    env = json.loads((REFERENCE / "env_throughput_h100_2026-11-23.json").read_text())["results"]
    throughput = pages["results/env-throughput.md"]
    assert all(f"| `{name}` | {value:.3g} |" in throughput for name, value in env.items())
    recipes = pages["results/rules-and-recipes.md"]
    assert "81.3 / 83.8 / 88.6 / 89.8 / 90.3 / 90.1" in recipes  # SST-2 weighted_ce heads, as the README quotes them
    determinism = pages["results/determinism.md"]
    assert "0.0552" in determinism and "threads=1 vs threads=2" in determinism


def test_sections_carry_date_machine_companions_and_plots(pages: dict[str, str]) -> None:
    learned = pages["results/learned-vs-rules.md"]
    section = learned[learned.index("{#learned_vs_rules_h200_2026-12-01}"):]
    assert "**Date:** 2026-12-01 · **machine:** H200" in section
    assert '??? abstract "Tables from `learned_vs_rules_h200_2026-12-01.md`' in section
    for task in ("sst2", "mrpc", "rte"):
        assert f"![learned_vs_rules_h200_2026-12-01_{task}](raw/learned_vs_rules_h200_2026-12-01_{task}.png)" in section
    # the companion's tables, folded under the JSON's, with its headings below the section's own (h2)
    companion = section[section.index("??? abstract"):].split("\n## ")[0]
    assert "    | family | validated AUC (dev) |" in companion
    assert re.search(r"^    ### sst2 \(accuracy", companion, flags=re.M)
    assert not re.search(r"^\s*#{1,2} ", companion, flags=re.M)
    every_png = [p.name for p in REFERENCE.glob("*.png")]
    assert all(any(f"(raw/{name})" in page for page in pages.values()) for name in every_png)


def test_date_and_machine_from_the_file_name_or_its_content(tmp_path: Path) -> None:
    (tmp_path / "probe_h100_2026-01-02.json").write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3"}))
    (tmp_path / "probe_2026-03-04.json").write_text(json.dumps({"machine": "2-core CPU", "x": 1}))
    (tmp_path / "probe_undated.json").write_text(json.dumps({"x": 1}))
    found = {m.stem: m for m in results.collect(tmp_path)}
    assert (found["probe_h100_2026-01-02"].date, found["probe_h100_2026-01-02"].machine) == \
        ("2026-01-02", "H100 (NVIDIA H100 80GB HBM3)")
    assert (found["probe_2026-03-04"].date, found["probe_2026-03-04"].machine) == ("2026-03-04", "2-core CPU")
    assert (found["probe_undated"].date, found["probe_undated"].machine) == ("not recorded", "not recorded")


def test_an_unknown_schema_gets_the_generic_page(tmp_path: Path) -> None:
    data = {"date": "2026-02-03", "note": "a new study",
            "runs": [{"workers": 1, "seconds": 12.5, "extra": {"a": 1}}, {"workers": 2, "seconds": 7.25}],
            "nested": {"deeper": {"value": 0.123456}}}
    (tmp_path / "brand_new_study_cpu_2026-02-03.json").write_text(json.dumps(data))
    (tmp_path / "brand_new_study_cpu_2026-02-03.png").write_bytes(b"\x89PNG")
    built = results.build_pages(tmp_path)
    other = built["results/other.md"]
    assert "{#brand_new_study_cpu_2026-02-03}" in other and "**machine:** CPU" in other
    assert "| workers | seconds | extra.a |" in other and "| 2 | 7.25 | – |" in other
    assert "0.1235" in other and "a new study" in other
    assert "(raw/brand_new_study_cpu_2026-02-03.png)" in other
    assert "No reference file belongs here yet." in built["results/determinism.md"]


def test_a_malformed_json_fails_naming_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "good_cpu_2026-01-01.json").write_text("{}")
    (tmp_path / "broken_cpu_2026-01-01.json").write_text('{\n  "rows": [1, 2,\n}\n')
    with pytest.raises(ResultsError, match=r"broken_cpu_2026-01-01\.json: not valid JSON \(line 3"):
        results.build_pages(tmp_path)


def test_a_known_schema_with_missing_fields_fails_naming_the_file(tmp_path: Path) -> None:
    # looks like the learned-vs-rules study (tasks with families) but a family lacks its validated AUC
    (tmp_path / "learned_vs_rules_cpu_2026-01-01.json").write_text(json.dumps(
        {"tasks": {"rte": {"families": {"confidence": {"points": 3}}}}}))
    with pytest.raises(ResultsError, match=r"learned_vs_rules_cpu_2026-01-01\.json: looks like a 'tasks_protocol'"):
        results.build_pages(tmp_path)


def test_reproductions_read_the_reference_and_link_to_existing_sections(pages: dict[str, str]) -> None:
    claims = results.reproductions(REFERENCE)
    for paper in ("ConsistentEE", "PABEE", "CALM", "FREE", "LayerSkip", "SWEET", "DeeBERT", "BERxiT"):
        assert f"## {paper}" in claims, paper
    assert claims.count("**Confidence interval:**") == claims.count("**Verdict:") == 10
    for anchor in re.findall(r"\]\(#([\w-]+)\)", claims):  # the summary table links each claim's section
        assert f"{{#{anchor}}}" in claims, anchor
    assert "[+0.06, +0.85]" in claims and "[-4.85, -3.38]" in claims
    links = re.findall(r"\]\((results/[^)#]+)#([^)]+)\)", claims)
    assert links
    for page, anchor in links:
        assert f"{{#{anchor}}}" in pages[page], (page, anchor)
    assert results.CLAIMS_MARKER in (ROOT / "docs" / "reproductions.md").read_text()


def test_reproductions_fail_naming_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "rte_agents_2026-11-23.json").write_text((REFERENCE / "rte_agents_2026-11-23.json").read_text())
    with pytest.raises(ResultsError, match=r"\.json: missing"):
        results.reproductions(tmp_path)


def test_every_module_has_an_api_reference_entry() -> None:
    documented = set(re.findall(r"^::: (exitrl[\w.]*)", "\n".join(
        p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")), flags=re.M))
    source = ROOT / "src"
    modules = {".".join(p.relative_to(source).with_suffix("").parts[:-1] if p.stem == "__init__"
                        else p.relative_to(source).with_suffix("").parts)
               for p in (source / "exitrl").rglob("*.py") if "configs" not in p.parts and p.stem != "__main__"}
    assert modules - documented == set(), "add these modules to a page under docs/reference/"
    assert documented - modules == set(), "these reference entries name no module"
