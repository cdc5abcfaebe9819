"""Markdown tables from the reference JSON files: a renderer per main schema, and a readable generic fallback.

A renderer is chosen by the shape of the data, not by the file name, so a new measurement of a known study renders
without touching this file; anything else gets `generic`, which shows every scalar, every list of records as a table
and every nested object as its own small section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Markdown = list[str]


# ---------------------------------------------------------------- formatting


def num(value: Any, digits: int = 4) -> str:
    """A number as a person reads it: integers as they are, floats to `digits` significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if value == 0:
            return "0"
        if 100 <= abs(value) < 1e6:  # throughputs and timings keep their one decimal (2154.8, not 2155)
            return f"{value:.1f}"
        if 1e-3 <= abs(value) < 100:
            return f"{value:.{digits}g}"
        return f"{value:.3g}"
    if value is None:
        return "–"
    return cell(str(value))


def cell(text: str) -> str:
    """Text made safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def pct(value: Any) -> str:
    """A fraction in [0, 1] as percent points with two decimals ("–" when absent)."""
    return "–" if value is None else f"{100 * float(value):.2f}"


def times(value: Any) -> str:
    """A speedup, e.g. 1.49×."""
    return "–" if value is None else f"{float(value):.2f}×"


def mean_std(stat: dict | None, scale: float = 100.0, suffix: str = "") -> str:
    """``{"mean", "std", "n"}`` as "m ± s" (scaled, e.g. fractions to points)."""
    if not stat:
        return "–"
    if stat.get("n") == 1:  # one seed: a spread of 0 says nothing
        return f"{scale * stat['mean']:.2f}{suffix}"
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}{suffix}"


def table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> Markdown:
    """A Markdown table; the columns in `right` (by index) are right-aligned (numbers)."""
    right = set(range(1, len(header))) if right is None else right
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def per_layer(values: list[float], scale: float = 100.0) -> str:
    """Per-layer scores as "54.5 / 54.2 / …" (fractions scaled to percent)."""
    return " / ".join(f"{scale * v:.1f}" for v in values)


# ---------------------------------------------------------------- the main schemas


def _outcome_row(name: str, dev: dict) -> list[str]:
    return [cell(name), pct(dev.get("score")), num(dev.get("avg_exit_layer"), 3), times(dev.get("speedup")),
            f"{100 * dev.get('saved_layers', 0):.1f} %"]


_OUTCOME = ["policy", "dev score", "mean exit layer", "speedup", "saved layers"]


def render_agents(data: dict) -> Markdown:
    """Agent comparisons and fixed rules (`benchmarks/agent_comparison.py`): oracles, every run, the confidence
    sweep."""
    oracle = data["oracle"]
    out = [f"Task `{data.get('task', '?')}`: {data.get('train_rows', '?')} training rows, "
           f"{data.get('dev_rows', '?')} dev rows. Per-layer dev score of the heads: "
           f"{per_layer(oracle['per_layer_score'])}.", ""]
    rows = [_outcome_row(name, oracle[key]) for name, key in
            (("full model", "full_model"), ("consistency oracle (bound)", "consistency_oracle"),
             ("correctness oracle (analysis only)", "correctness_oracle")) if key in oracle]
    for run in data["runs"]:
        reward = run.get("reward") or {}
        named = "alpha" in reward and "reward=" not in run["run"]  # a learned agent whose run name omits its reward
        label = run["run"] + (f" (reward {reward['name']})" if named else "")
        rows.append([*_outcome_row(label, run["dev"]), num(run.get("train_seconds"))])
    out += table([*_OUTCOME, "train s"], [r + [""] * (6 - len(r)) for r in rows])
    sweep = data.get("confidence_sweep") or []
    if len(sweep) > 1:
        out += ["Confidence rule (max-prob ≥ τ) over its threshold:", ""]
        out += table(["τ", "dev score", "mean exit layer", "speedup", "saved layers"],
                     [[num(p["threshold"]), *_outcome_row("", p["dev"])[1:]] for p in sweep])
    return out


def render_frontiers(data: dict) -> Markdown:
    """Family comparisons (`exitrl compare`, the honest protocol): per task, each family's trade-off summary."""
    out: Markdown = []
    for task, result in data.items():
        full, oracle = result.get("full_model", {}), result.get("consistency_oracle", {})
        out += [f"**{task}** ({result.get('metric', 'score')}): full model {pct(full.get('score'))}; the consistency "
                f"oracle saves {100 * oracle.get('saved_layers', 0):.1f} % ({times(oracle.get('speedup'))}).", ""]
        if "protocol" in result:
            out += render_protocol(result["protocol"], title="Honest protocol (choices on the held-out split, "
                                   "numbers on dev)")
        learned = set(result.get("learned", []))
        families = sorted(result["families"].items(), key=lambda item: -item[1]["auc"])
        out += ["Dev frontier (every knob read off dev):", ""]
        out += table(["family", "AUC", "best score, ≥ 30 % saved", "best score, ≥ 50 % saved", "speedup within 1 point",
                      "points"],
                     [[cell(name + (" (learned)" if name in learned else "")), pct(f["auc"]),
                       pct(f.get("best_score_saved_30")), pct(f.get("best_score_saved_50")),
                       times(f.get("speedup_within_1pt")), num(f.get("points"))] for name, f in families])
    return out


def difference_line(protocol: dict) -> str:
    """The paired-bootstrap sentence: best learned − best rule, with its 95 % CI."""
    diff = protocol["difference"]
    low, high = diff["ci95"]
    return (f"Best learned **{protocol['best_learned']}** − best rule **{protocol['best_rule']}** (validated AUC): "
            f"**{100 * diff['estimate']:+.2f}** points, paired bootstrap 95 % CI [{100 * low:+.2f}, {100 * high:+.2f}]"
            + (f" ({diff['resamples']} resamples of dev)." if "resamples" in diff else "."))


def render_protocol(protocol: dict, title: str = "") -> Markdown:
    """The honest protocol's table: validated AUC (mean ± std over seeds) and the difference's CI."""
    out = [title + ":", ""] if title else []
    out += [difference_line(protocol), ""]
    families = sorted(protocol["families"].items(), key=lambda item: -item[1]["validated_auc"]["mean"])
    out += table(["family", "validated AUC (dev)", "validation AUC", "speedup within 1 point", "its dev score",
                  "score at ≥ 50 % saved", "seeds", "points"],
                 [[cell(name + (" (learned)" if f.get("learned") else "")), mean_std(f["validated_auc"]),
                   mean_std(f.get("validation_auc")), mean_std(f.get("speedup_within_1pt"), 1.0, "×"),
                   mean_std(f.get("score_within_1pt")), mean_std(f.get("score_saved_50")), num(f.get("seeds")),
                   num(f.get("points"))] for name, f in families])
    return out


def render_tasks_protocol(data: dict) -> Markdown:
    """The learned-vs-rules study: per task, the honest protocol over several seeds."""
    out = [f"Machine: {cell(str(data.get('machine', 'not recorded')))}.", ""]
    for task, result in data["tasks"].items():
        seeds = result.get("seeds", [])
        out += [f"**{task}** ({result.get('metric', 'score')}, seeds {', '.join(map(str, seeds))}; sizes "
                f"{', '.join(f'{k} {v}' for k, v in result.get('sizes', {}).items())})", ""]
        families = {name: {**f, "learned": f.get("learned", not _is_rule(name))}
                    for name, f in result["families"].items()}
        out += render_protocol({**result, "families": families})
    return out


_RULES = ("confidence", "confidence_per_layer", "patience", "static", "calm", "free", "lte")


def _is_rule(name: str) -> bool:
    return name.split("[")[0] in _RULES


def render_recipes(data: dict) -> Markdown:
    """Rules and recipes: per fine-tuning objective, per-layer dev accuracy, then every rule on each backbone."""
    objectives = data["objectives"]
    out = ["Per-layer dev score of the heads, by fine-tuning objective (recipe):", ""]
    out += table(["objective", "dev, layers 1..L", "train, layers 1..L", "held-out, layers 1..L", "fine-tune s"],
                 [[f"`{name}`", per_layer(o["dev_per_layer"]), per_layer(o.get("train_per_layer", [])),
                   per_layer(o.get("policy_per_layer", [])), num(o.get("finetune_seconds"))]
                  for name, o in objectives.items()], right={4})
    for position, (name, o) in enumerate(objectives.items()):  # the first (the reference recipe) unfolded
        out += [f'???{"+" if position == 0 else ""} note "Every rule on the `{name}` backbone (dev)"', ""]
        rows = [_outcome_row("full model", o["oracle"]["full_model"]) + ["", ""]]
        for rule, result in o["rules"].items():
            dev, info = result["dev"], result.get("info") or {}
            certificate = (f"threshold {num(info['threshold'], 3)}, calibration risk {num(info['calibration_risk'], 3)}"
                           if "calibration_risk" in info else "")
            rows.append([*_outcome_row(rule, dev), num(dev.get("disagreement"), 3), cell(certificate)])
        out += ["    " + line for line in table([*_OUTCOME, "disagreement with full", "certificate"], rows)]
        halves = o.get("calm_on_dev_halves")
        if halves:
            out += ["    CALM certified on one random half of dev and tested on the other:", ""]
            out += ["    " + line for line in table(
                ["CALM", "mean risk", "max risk", "within δ", "mean saved", "repeats"],
                [[cell(k), num(v["mean_risk"], 3), num(v["max_risk"], 3), f"{100 * v['fraction_within_delta']:.0f} %",
                  f"{100 * v['mean_saved']:.1f} %", num(v["repeats"])] for k, v in halves.items()])]
    return out


def render_inference(data: dict) -> Markdown:
    """Inference speed (`benchmarks/inference_speed.py`): ms per batch per shape and policy, and the trained run."""
    out = [f"Sequence length {data.get('seq')}, {data.get('reps')} timed repetitions after {data.get('warmup')} "
           f"warm-up; {data.get('torch_threads')} torch threads.", ""]
    rows = data.get("rows") or []
    if rows:
        out += table(["shape", "batch", "policy", "HF eager ms", "exitrl full ms", "runtime ms", "mean exit",
                      "ideal speedup", "speedup", "achieved / ideal"],
                     [[cell(r["shape"]), num(r["batch"]), cell(r["policy"]), num(r.get("hf_eager_ms"), 3),
                       num(r.get("exitrl_full_ms"), 3), num(r.get("runtime_ms"), 3), num(r.get("mean_exit_layer"), 3),
                       times(r.get("ideal_speedup")), times(r.get("speedup")), num(r.get("achieved_over_ideal"), 2)]
                      for r in rows], right=set(range(3, 10)) | {1})
    run = data.get("trained_run")
    if run:
        out += [f"A trained run (`{cell(run.get('run', '?'))}`) on {run.get('examples')} texts"
                + (", compiled" if run.get("compiled") else "") + (", fast path" if run.get("fast_path") else "") + ":",
                ""]
        batches = run.get("batches") or [{"batch": run.get("batch"), **run}]
        out += table(["batch", "full, examples/s", "early exit, examples/s", "mean exit", "ideal speedup", "speedup",
                      "accuracy"],
                     [[num(b.get("batch")), num(b["full"]["examples_per_second"]),
                       num(b["early_exit"]["examples_per_second"]), num(b.get("mean_exit_layer"), 3),
                       times(b.get("ideal_speedup")), times(b.get("speedup")),
                       pct(b["accuracy"]) if "accuracy" in b else "–"] for b in batches])
    return out


def render_env_throughput(data: dict) -> Markdown:
    """Env throughput: steps per second by environment and batch."""
    out = [f"{cell(str(data.get('device_name', data.get('device'))))}, {data.get('cpu_threads')} CPU threads, torch "
           f"{data.get('torch')}; trace shape {data.get('trace_shape')}.", ""]
    out += table(["environment", data.get("unit", "steps/s")],
                 [[f"`{name}`", f"{value:.3g}"] for name, value in data["results"].items()])
    return out


def render_determinism(data: dict) -> Markdown:
    """Determinism: the same setting twice, and across settings."""
    env = data.get("environment", {})
    out = [f"{data.get('rows')} rows; torch {env.get('torch')}, transformers {env.get('transformers')}, "
           f"{env.get('threads')} threads" + (f", {env['gpu']}" if env.get("gpu") else "") + ".", ""]
    out += table(["setting", "identical weights", "max abs dev logit difference", "seconds per run"],
                 [[cell(r["setting"]), num(r["same_weights"]), num(r["max_abs_dev_logit_difference"], 3),
                   " / ".join(num(s) for s in r.get("seconds_per_run", []))] for r in data["runs"]], right={2})
    return out


def render_generation(data: dict) -> Markdown:
    """Generation speed: per run, the model, precision and the full-model baselines (every point is in the tables
    below, from the companion Markdown)."""
    batches = list(dict.fromkeys(b for run in data["runs"] for b in run.get("baselines", {})))
    rows = []
    for run in data["runs"]:
        args, baselines = run.get("args", {}), run.get("baselines", {})
        speeds = [num(baselines.get(b, {}).get(key)) for b in batches for key in ("compiled", "graph_full")]
        rows.append([f"`{cell(run.get('label', '?'))}`", cell(str(run.get("model"))), cell(str(run.get("machine"))),
                     cell(str(args.get("dtype", "?"))), cell(str(args.get("new_tokens", "?"))), num(len(run["points"])),
                     *speeds, num(run.get("total_seconds"))])
    header = ["run", "model", "machine", "dtype", "new tokens", "points",
              *(f"batch {b}, {name} tok/s" for b in batches for name in ("compiled full", "exitrl full")), "script s"]
    return ["Per run: the full model's tokens/s (transformers compiled, and exitrl's captured engine); every method's "
            "points are in the tables below.", "", *table(header, rows, right=set(range(4, len(header))))]


# ---------------------------------------------------------------- the fallback


def _flat(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()) and len(value) <= 6:
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value
    return flat


def _scalar_text(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(_scalar_text(v) for v in value[:12])
        return f"[{shown}{', …' if len(value) > 12 else ''}] ({len(value)})" if len(value) > 12 else f"[{shown}]"
    if isinstance(value, dict):
        return cell(", ".join(f"{k}: {_scalar_text(v)}" for k, v in value.items()))
    return num(value)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_scalarish(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return not isinstance(value, dict)


def _paths(data: Any, prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, list]]]:
    """Every leaf of nested objects as ``(dotted.path, value)``, and every list of records as its own table."""
    leaves: list[tuple[str, Any]] = []
    records: list[tuple[str, list]] = []
    items = data.items() if isinstance(data, dict) else [("", data)]
    for key, value in items:
        path = f"{prefix}{key}" if key != "" else prefix.rstrip(".")
        if isinstance(value, dict) and value:
            more, tables = _paths(value, f"{path}.")
            leaves += more
            records += tables
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records.append((path, value))
            for index, row in enumerate(value):  # records nested in a record get their own tables
                for inner, rows in _paths({k: v for k, v in row.items() if _is_records(v)}, f"{path}[{index}].")[1]:
                    records.append((inner, rows))
        else:
            leaves.append((path, value))
    return leaves, records


def generic(data: Any) -> Markdown:
    """Any JSON, readably: one field/value table of every leaf (dotted paths; lists of numbers inline), then one
    table per list of records."""
    leaves, records = _paths(data)
    out: Markdown = []
    if leaves:
        out += table(["field", "value"], [[cell(path or "value"), _scalar_text(v)] for path, v in leaves], right=set())
    for path, rows in records:
        flats = [_flat(r) for r in rows]
        columns = list(dict.fromkeys(k for f in flats for k in f if _is_scalarish(f[k])))
        out += [f"**{cell(path or 'rows')}**", ""]
        out += table([cell(c) for c in columns], [[_scalar_text(f.get(c)) for c in columns] for f in flats],
                     right=set())
        nested = sorted({k for f in flats for k in f if not _is_scalarish(f[k]) and not _is_records(f[k])})
        if nested:
            out += [f"Nested in each row, not shown: {', '.join(nested)} (see the raw JSON).", ""]
    return out


def metadata(data: Any) -> Markdown:
    """Only the top-level scalars (for files whose tables come from their companion Markdown)."""
    if not isinstance(data, dict):
        return []
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    return table(["field", "value"], [[cell(k), _scalar_text(v)] for k, v in scalars.items()], right=set()) \
        if scalars else []


# ---------------------------------------------------------------- dispatch


def _all_tasks_have(data: dict, key: str) -> bool:
    return bool(data) and all(isinstance(v, dict) and key in v for v in data.values())


Renderer = Callable[[Any], Markdown]
RENDERERS: list[tuple[str, Callable[[Any], bool], Renderer]] = [
    ("agents", lambda d: isinstance(d, dict) and "oracle" in d and "runs" in d, render_agents),
    ("tasks_protocol", lambda d: isinstance(d, dict) and "tasks" in d and _all_tasks_have(d["tasks"], "families"),
     render_tasks_protocol),
    ("frontiers", lambda d: isinstance(d, dict) and _all_tasks_have(d, "families"), render_frontiers),
    ("recipes", lambda d: isinstance(d, dict) and "objectives" in d, render_recipes),
    ("inference", lambda d: isinstance(d, dict) and "trained_run" in d or (
        isinstance(d, dict) and d.get("rows") and isinstance(d["rows"], list) and "runtime_ms" in d["rows"][0]),
     render_inference),
    ("env_throughput", lambda d: isinstance(d, dict) and d.get("benchmark") == "env_throughput", render_env_throughput),
    ("determinism", lambda d: isinstance(d, dict) and isinstance(d.get("runs"), list) and bool(d["runs"])
     and "same_weights" in d["runs"][0], render_determinism),
    ("generation", lambda d: isinstance(d, dict) and isinstance(d.get("runs"), list) and bool(d["runs"])
     and isinstance(d["runs"][0].get("points"), list), render_generation),
]


def pick(data: Any) -> tuple[str, Renderer | None]:
    """The renderer for this data's shape, or ``("generic", None)``."""
    for name, matches, renderer in RENDERERS:
        if matches(data):
            return name, renderer
    return "generic", None
