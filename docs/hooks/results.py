"""MkDocs hook: the results pages, generated at build time from `benchmarks/reference/`.

Nothing under `docs/results/` is committed: every build reads the dated reference files, so the pages cannot drift
from the measurements. `build_pages(reference_dir)` does the work and is what the tests call; the `on_*` functions
only hand its output to MkDocs (pages as generated Markdown files, the raw JSON, Markdown, PNG and log files copied
under `results/raw/`), and fill the claims table of `reproductions.md` (`results_claims`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from results_claims import CLAIMS_MARKER, claims_markdown
from results_io import ResultsError, load_json
from results_tables import Markdown, generic, metadata, pick

RESULTS = "results"
RAW = "raw"  # under results/: the reference files themselves, copied into the site
DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
MACHINES = {"cpu": "CPU", "h100": "H100", "h200": "H200"}  # machine tokens in file names
SUMMARY_ONLY = {"generation", "generic"}  # renderers that leave the details to the companion Markdown


@dataclass(frozen=True)
class Group:
    """One results page: the studies whose file names match one of `patterns`."""

    slug: str
    title: str
    intro: str
    patterns: tuple[str, ...]


GROUPS = (
    Group("learned-vs-rules", "Learned policies against rules",
          "Every family of policies compared on one trace: the dev trade-off curves, and the honest protocol (every "
          "choice on the held-out split, numbers on dev, paired bootstrap CIs).",
          (r"^learned_vs_rules", r"_comparison_\d", r"_reward_study")),
    Group("agents-and-rewards", "Agents, rewards and co-training",
          "Each agent and fixed rule trained on one MiniLM trace; the hardness-guided and vanilla rewards; "
          "ConsistentEE's co-training rounds and their remedies.",
          (r"_agents_", r"_fixed_rules_", r"cotrain")),
    Group("rules-and-recipes", "Rules and backbone recipes",
          "Every rule (confidence, patience, CALM with Learn-then-Test, FREE, learn-to-exit) on backbones fine-tuned "
          "with each recipe (weighted CE, SWEET, LayerSkip, DeeBERT, FREE).",
          (r"rules_recipes", r"_finetune_", r"policy_split_study")),
    Group("lm-studies", "Causal LM studies",
          "SmolLM2-135M: continued training for early exit (plain against LayerSkip), exit adapters trained on the "
          "frozen model's own text, and learned agents against rules on token episodes.",
          (r"^lm_token", r"^layerskip_continual", r"^exit_adapters")),
    Group("generation-speed", "Generation speed",
          "Early-exit decoding on SmolLM2-135M: tokens/s and ROUGE-L against full greedy decoding, for the full model, "
          "self-speculative decoding, CALM, FREE, a learned policy and peer implementations; what an exit costs the "
          "engine against a model cut at the exit layer.",
          (r"^generation_speed", r"^decoder_engine", r"^self_speculative")),
    Group("inference-speed", "Inference speed",
          "Early-exit classification with the runtime: milliseconds per batch against the full model, a trained "
          "run's examples/s (pre-tokenized and from text, against Hugging Face's pipeline), and the profile of where "
          "a trained policy's GPU time goes (batches in flight, per-step GPU time with and without the decision).",
          (r"^inference_speed", r"^runtime_profile", r"^runtime_timeline", r"^runtime_cost_model", r"^counted_layers")),
    Group("serving", "Serving under load",
          "`exitrl serve` under Poisson arrivals: p50/p99 latency and throughput of early exit against the full "
          "model at each offered load, and soaks (lost or duplicated answers, memory over time).",
          (r"^serve_load",)),
    Group("scale", "Scale and distributed",
          "Fine-tuning throughput in one and more processes, dev accuracy across process counts, and sweeps over "
          "workers.",
          (r"^scale", r"^sweep_scale")),
    Group("determinism", "Determinism",
          "What changes the numbers: the same setting twice, and across thread counts or deterministic kernels.",
          (r"^determinism",)),
    Group("env-throughput", "Env throughput",
          "Environment steps per second on a synthetic trace of MiniLM's shape.",
          (r"^env_throughput",)),
    Group("other", "Other measurements",
          "Reference files that no other page claims (a new study lands here until it gets its own page).", ()),
)

WHAT = (  # a one-line description per study, by file-name pattern (first match wins)
    (r"^learned_vs_rules", "Learned policies against the strongest rules, honest protocol, several seeds"),
    (r"^lm_token_comparison", "Learned agents against rules on SmolLM2's token episodes"),
    (r"_comparison_", "Every family swept on one trace, compared by the area under its dev trade-off curve"),
    (r"_reward_study", "ConsistentEE's hardness reward against the vanilla reward on cross-fitted states, every "
                       "family under the honest protocol"),
    (r"_agents_", "Every agent on one MiniLM trace: dev score and layers saved"),
    (r"_fixed_rules_", "Fixed rules (static, patience, entropy, margin) at two settings"),
    (r"cotrain_remedies", "One round of co-training, plain and with each remedy, three seeds"),
    (r"cotrain", "ConsistentEE co-training, two rounds: per-layer accuracy and REINFORCE per round"),
    (r"rules_recipes", "Every rule on backbones fine-tuned with each recipe"),
    (r"_finetune_", "The fine-tuned backbone behind the agent comparison: per-layer accuracy"),
    (r"policy_split_study", "Log of the policy-split study (backbone epochs, REINFORCE on states and on confidence)"),
    (r"^lm_token_study", "SmolLM2-135M continued with LayerSkip, and token traces of both models"),
    (r"^layerskip_continual", "SmolLM2-135M continued training: plain against LayerSkip"),
    (r"^generation_speed", "Early-exit decoding speed and quality on SmolLM2-135M"),
    (r"^decoder_engine", "What an exit costs the decoding engine: an exit at E against the E-layer model"),
    (r"^self_speculative", "Self-speculative decoding through exit adapters, chosen on validation prompts"),
    (r"^exit_adapters", "Exit adapters on the frozen SmolLM2-135M: agreement with the last layer"),
    (r"^inference_speed", "Early-exit classification speed of the runtime"),
    (r"^runtime_profile", "Where a trained policy's GPU time goes: batches in flight, steps, tokenization"),
    (r"^runtime_timeline", "Whether the GPU is busy or waiting for the host during a whole-split walk"),
    (r"^runtime_cost_model", "The encoder walk's cost model: each launch at its measured GPU cost, and what-ifs"),
    (r"^counted_layers", "One encoder layer's GPU time: eager on the alive rows, counted layers over the window"),
    (r"^serve_load", "exitrl serve under Poisson load: latency, throughput, losses, memory"),
    (r"^scale_dev_accuracy", "One against two processes: dev accuracy and throughput"),
    (r"^scale", "Fine-tuning throughput by process count"),
    (r"^sweep_scale", "A sweep's wall-clock time by worker count"),
    (r"^determinism", "The same setting twice, and across settings"),
    (r"^env_throughput", "Env steps per second"),
)


@dataclass
class Measurement:
    """One measurement: its main file (the JSON, else the lone file) and its companions (Markdown, plots)."""

    stem: str
    main: Path
    companions: list[Path] = field(default_factory=list)
    data: object = None

    @property
    def files(self) -> list[Path]:
        return [self.main, *self.companions]

    @property
    def group(self) -> Group:
        return next((g for g in GROUPS if any(re.search(p, self.stem) for p in g.patterns)), GROUPS[-1])

    @property
    def what(self) -> str:
        return next((text for pattern, text in WHAT if re.search(pattern, self.stem)), self.stem.replace("_", " "))

    @property
    def date(self) -> str:
        found = DATE.search(self.stem)
        if found:
            return found.group(1)
        if isinstance(self.data, dict) and isinstance(self.data.get("date"), str):
            return self.data["date"]
        return "not recorded"

    @property
    def machine(self) -> str:
        tokens = [MACHINES[t] for t in self.stem.lower().split("_") if t in MACHINES]
        recorded = _recorded_machine(self.data)
        if tokens:
            extra = recorded and recorded.lower() not in {t.lower() for t in tokens} | {"cpu", "cuda", "vm"}
            return tokens[0] + (f" ({recorded})" if extra else "")
        return recorded or "not recorded"


def _recorded_machine(data: object, depth: int = 0) -> str:
    """The machine a JSON says it ran on (its `machine`, `device_name` or `device`), searched a few levels down."""
    if depth > 3:
        return ""
    if isinstance(data, dict):
        for key in ("machine", "device_name", "device"):
            if isinstance(data.get(key), str):
                return data[key]
        children = list(data.values())
    elif isinstance(data, list):
        children = data[:1]
    else:
        return ""
    return next((found for child in children if (found := _recorded_machine(child, depth + 1))), "")


def collect(reference_dir: Path) -> list[Measurement]:
    """Every measurement in the folder: each JSON with the files whose names extend its stem, then the lone files."""
    if not reference_dir.is_dir():
        raise ResultsError(f"{reference_dir}: no such folder; the results pages are generated from the reference "
                           "measurements in benchmarks/reference/")
    paths = sorted(p for p in reference_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    measurements = [Measurement(p.stem, p, data=load_json(p)) for p in paths if p.suffix == ".json"]
    by_length = sorted(measurements, key=lambda m: -len(m.stem))
    for path in paths:
        if path.suffix == ".json":
            continue
        owner = next((m for m in by_length if path.stem == m.stem or path.stem.startswith(m.stem + "_")), None)
        if owner is None:
            measurements.append(Measurement(path.stem, path))
        else:
            owner.companions.append(path)
    return sorted(measurements, key=lambda m: m.stem)


def _demote(markdown: str, top: int = 3) -> Markdown:
    """A companion's Markdown with its headings moved under the section's own: its highest becomes level `top`."""
    heading = re.compile(r"^(#{1,6})\s+(.*)$")
    levels = [len(found.group(1)) for line in markdown.splitlines() if (found := heading.match(line))]
    shift = max(0, top - min(levels)) if levels else 0
    lines = []
    for line in markdown.splitlines():
        found = heading.match(line)
        lines.append(f"{'#' * min(6, shift + len(found.group(1)))} {found.group(2)}" if found else line)
    return [*lines, ""]


def _link(path: Path) -> str:
    return f"[`{path.name}`]({RAW}/{path.name})"


def measurement_section(m: Measurement) -> Markdown:
    """One measurement's section: what, when, where, its tables (from the JSON), companion tables, plots, raw files."""
    out = [f"## `{m.stem}` {{#{m.stem}}}", "", f"*{m.what}.*", "",
           f"**Date:** {m.date} · **machine:** {m.machine} · **files:** {', '.join(_link(p) for p in m.files)}", ""]
    markdown = [p for p in m.companions if p.suffix == ".md"]
    kind = ""
    if m.main.suffix == ".json":
        kind, renderer = pick(m.data)
        try:
            body = renderer(m.data) if renderer else (metadata(m.data) if markdown else generic(m.data))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ResultsError(f"{m.main}: looks like a '{kind}' file but could not be read ({type(error).__name__}: "
                               f"{error}); fix the file, or its renderer in docs/hooks/results_tables.py") from error
        out += body
    elif m.main.suffix == ".log":
        out += [f"A log; read it raw: {_link(m.main)}.", ""]
    elif m.main.suffix == ".md":
        markdown.insert(0, m.main)
    for path in markdown:  # what the benchmark script printed; folded where the JSON's tables above say it all
        folded = m.main.suffix == ".json" and kind not in SUMMARY_ONLY
        out += [f'???{"" if folded else "+"} abstract "Tables from `{path.name}`, as the benchmark script wrote them"',
                ""]
        out += ["    " + line if line else "" for line in _demote(path.read_text(encoding="utf-8"))]
    for path in (p for p in m.files if p.suffix == ".png"):
        out += [f"![{path.stem}]({RAW}/{path.name})", "", f"*{path.name}*", ""]
    return out


def group_page(group: Group, measurements: list[Measurement]) -> str:
    """A results page: the group's intro, then one section per measurement, newest first."""
    out = [f"# {group.title}", "", group.intro, "",
           "Generated from `benchmarks/reference/` when the site is built; each section links to its raw files.", ""]
    if not measurements:
        out += ["No reference file belongs here yet.", ""]
    for m in sorted(measurements, key=lambda m: (m.date, m.stem), reverse=True):
        out += measurement_section(m)
    return "\n".join(out)


def index_page(measurements: list[Measurement]) -> str:
    """The results index: one line per measurement (what, date, machine, page, files)."""
    out = ["# Results", "",
           "Every measurement the project keeps, generated from the dated files in `benchmarks/reference/` when this "
           "site is built. Each number's home is its page here; the raw files are linked beside it. The pages:", ""]
    out += [f"- [{g.title}]({g.slug}.md): {g.intro}" for g in GROUPS]
    out += ["", "| what | date | machine | page | files |", "| --- | --- | --- | --- | --- |"]
    for m in sorted(measurements, key=lambda m: (m.group.slug, m.stem)):
        out.append(f"| {m.what} | {m.date} | {m.machine} | [{m.group.title}]({m.group.slug}.md#{m.stem}) | "
                   f"{', '.join(_link(p) for p in m.files)} |")
    return "\n".join([*out, ""])


def build_pages(reference_dir: Path) -> dict[str, str]:
    """Every results page as ``{"results/<page>.md": markdown}``; raises `ResultsError` naming a file it cannot read."""
    measurements = collect(reference_dir)
    pages = {f"{RESULTS}/index.md": index_page(measurements)}
    for group in GROUPS:
        pages[f"{RESULTS}/{group.slug}.md"] = group_page(group, [m for m in measurements if m.group == group])
    return pages


def raw_files(reference_dir: Path) -> dict[str, Path]:
    """The reference files copied into the site: ``{"results/raw/<name>": path}``."""
    return {f"{RESULTS}/{RAW}/{p.name}": p for m in collect(reference_dir) for p in m.files}


def reproductions(reference_dir: Path) -> str:
    """The reproductions page's claims, each linked to the results section of the file it quotes."""
    owners = {m.stem: m for m in collect(reference_dir)}

    def link(stem: str) -> str:
        if stem not in owners:
            raise ResultsError(f"{reference_dir / stem}.json: missing; reproductions.md quotes it")
        return f"{RESULTS}/{owners[stem].group.slug}.md#{stem}"

    return claims_markdown(reference_dir, link)


# ---------------------------------------------------------------- MkDocs events


def _reference_dir(config) -> Path:  # MkDocsConfig (MkDocs imported lazily: the tests need none)
    return Path(config.config_file_path).resolve().parent / "benchmarks" / "reference"


def on_config(config):  # MkDocs' hook signature
    """Snippets (the changelog page's include of CHANGELOG.md) resolve from the repository root, wherever the build
    is started from."""
    snippets = config.mdx_configs.get("pymdownx.snippets")
    if snippets is not None:
        snippets["base_path"] = [str(Path(config.config_file_path).resolve().parent)]
    return config


def on_files(files, config):  # MkDocs' hook signature
    """Add the generated results pages and the raw reference files to the site."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File, InclusionLevel

    reference = _reference_dir(config)
    try:
        pages, raw = build_pages(reference), raw_files(reference)
    except ResultsError as error:  # one line naming the file, not a traceback
        raise PluginError(f"results pages: {error}") from error
    for uri, markdown in pages.items():
        files.append(File.generated(config, uri, content=markdown))
    for uri, path in raw.items():  # a companion .md is also rendered as a page of its own, reachable by its link
        inclusion = InclusionLevel.NOT_IN_NAV if path.suffix == ".md" else InclusionLevel.UNDEFINED
        files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=inclusion))
    return files


def on_page_markdown(markdown, page, config, files):  # MkDocs' hook signature
    """Fill the reproductions page's claims from the reference JSON."""
    if CLAIMS_MARKER in markdown:
        from mkdocs.exceptions import PluginError

        try:
            return markdown.replace(CLAIMS_MARKER, reproductions(_reference_dir(config)))
        except ResultsError as error:
            raise PluginError(f"reproductions page: {error}") from error
    return markdown
