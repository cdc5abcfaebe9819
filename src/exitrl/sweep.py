"""``python -m exitrl.sweep agent=reinforce,confidence,patience,calm,free env=rte``: run each policy family over its
trade-off knob's grid (each agent declares its knob) on ONE fine-tuned backbone and ONE trace per task, so a sweep
costs one fine-tuning, not one per point. Then ``python -m exitrl.compare runs/sweep/rte`` compares the families.

Every override of ``python -m exitrl.train`` works and applies to every family (``env=sst2``,
``data.policy_split=0.2``, ``reward=vanilla``, ``backbone.finetune.epochs=3``); ``<family>.<option>=<value>`` sets
an option of one family (``reinforce.epochs=10``); ``sweep.grids.<family>=[...]`` replaces a family's grid;
``sweep.trace=PATH`` sweeps a saved trace instead of fine-tuning; a family with a curve (REINFORCE's π threshold)
records one point per curve value from each fitted policy (``sweep.curve=false``: only its default); a learned
family's α grid is extended until its points span the saved-layer range on the held-out split
(``sweep.adaptive=false``: the default grid only);
``sweep.label=x`` names the families ``a[x]`` in
comparisons (e.g. a second sweep with ``learn_on=train``). Each point writes
``<out>/<family>/<knob>=<value>/`` with ``metrics.json``, ``policy.pt``, ``config.yaml`` and ``tensorboard/``
(eval/*, exit/layer, hparams), through the same pipeline as ``exitrl.train``; ``<out>`` is ``hydra.run.dir=`` when
given, else ``sweep.out``.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from exitrl.agents.inputs import learn_split
from exitrl.agents.registry import agent_names
from exitrl.backbones.loading import backbone_depth
from exitrl.cli import (
    CONFIGS,
    USER_ERRORS,
    agents_text,
    callable_module,
    check_agent_option,
    check_known_keys,
    check_override_keys,
    config_text,
    discard_failed_run,
    fail,
    folder_entries,
    groups_text,
    interrupted,
    overrides_from,
    prepare_cli,
    wants_help,
    warn_if_busy,
)
from exitrl.compare import compare
from exitrl.core.device import pick_device, set_reproducibility
from exitrl.core.options import check_value
from exitrl.core.progress import progress
from exitrl.core.threads import threads_for
from exitrl.experiments.pipeline import (
    LAYER_OPTIONS,
    AgentRun,
    Prepared,
    check_depth,
    prepare,
    prepare_from_trace,
)
from exitrl.experiments.record import RunRecord
from exitrl.rewards import resolve_reward
from exitrl.sweep_points import point_folders, record_point, run_points, sweep_devices, with_value
from exitrl.traces.trace import HELD_OUT

log = logging.getLogger("exitrl.sweep")
RUN_DIR = "hydra.run.dir"


@dataclass
class SweepArguments:
    families: list[str]
    shared: list[str]  # overrides for every family
    own: dict[str, list[str]]  # per family: its ``agent.*`` overrides
    grids: dict[str, list]  # per family: the values of its knob
    out: str | None  # hydra.run.dir=, when given


def number_or_text(value):
    """YAML 1.1 reads ``1e-3`` as text; a grid value that reads as a number is one."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def split_arguments(argv: list[str]) -> SweepArguments:
    """Families from ``agent=a,b``; ``a.key=v`` becomes ``agent.key=v`` of family a; ``sweep.grids.a=[..]`` a's grid;
    everything else is shared."""
    known = agent_names()
    families = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "agent":
            families = [name.strip() for name in value.split(",") if name.strip()]
    if not families:
        raise ValueError(f"Name the families to sweep: agent=a,b,... (valid: {', '.join(known)}).")
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(f"Unknown agent(s) {unknown}; valid agents: {', '.join(known)}.")
    args = SweepArguments(families, [], {}, {}, None)
    for arg in argv:
        key, _, value = arg.partition("=")
        family, _, option = key.lstrip("+~").partition(".")
        if key == "agent":
            continue
        if family in known and family not in families and option:
            raise ValueError(f"{key}: {family} is not one of the swept families {families}; add it to agent=... or "
                             "drop the option.")
        if key.startswith("sweep.grids."):
            name = key.removeprefix("sweep.grids.")
            if name not in known:
                raise ValueError(f"{key}: unknown agent {name!r}; valid agents: {', '.join(known)}.")
            grid = yaml.safe_load(value)
            if not isinstance(grid, list) or not grid:
                raise ValueError(f"{key} must be a non-empty list, e.g. {key}=[0.1,0.2]; got {value!r}.")
            args.grids[name] = [number_or_text(v) for v in grid]
        elif key == RUN_DIR:
            args.out = value
        elif family in families and option:
            check_agent_option(family, option, key)
            args.own.setdefault(family, []).append(f"agent.{option}={value}")
        else:
            args.shared.append(arg)
    return args


def check_grid_depth(runs: dict[str, AgentRun], points: list[tuple], num_layers: int) -> None:
    """Each ``(family, knob value)`` point names layers the backbone has (`exitrl.experiments.pipeline.check_depth`)."""
    for family, value in points:
        check_depth(family, {**runs[family].option_values(), runs[family].spec.knob.option: value}, num_layers,
                    f"sweep.grids.{family}: ")


def check_swept_reward(runs: dict[str, AgentRun], cfg: DictConfig) -> None:
    """A family swept over ``reward.alpha`` needs a reward that takes ``alpha`` and no fixed ``reward.kwargs.alpha``
    (which would override every point); say so before any fine-tuning."""
    if not any(run.spec.knob.key == "reward.alpha" for run in runs.values()):
        return
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    if "alpha" in (reward.get("kwargs") or {}):
        raise ValueError("reward.kwargs.alpha would fix alpha at every point of an alpha sweep: remove it and let "
                         "sweep.grids set reward.alpha.")
    if reward.get("fn"):
        fn = resolve_reward(fn=reward["fn"])
        parameters = inspect.signature(fn).parameters
        if "alpha" not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            raise ValueError(f"{reward['fn']} takes no alpha, the knob of the learned families swept here: add an "
                             "alpha parameter to it, or sweep only rules.")


def compose_family(family: str, shared: list[str], own: list[str]) -> DictConfig:
    try:
        return compose("config", overrides=[f"agent={family}", *shared, *own])
    except HydraException as err:
        raise ValueError(f"{family}: {err}") from err


def run_sweep(argv: list[str]) -> Path:
    """The sweep of the command-line arguments ``argv``; returns its folder."""
    prepare_cli(argv)
    args = split_arguments(argv)
    check_override_keys([f"agent={args.families[0]}", *args.shared], "exitrl sweep")  # agent.* keys: checked above
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        configs = {f: compose_family(f, args.shared, args.own.get(f, [])) for f in args.families}
    for config in configs.values():
        check_known_keys(config)
    runs = {f: AgentRun.from_config(c) for f, c in configs.items()}  # every option checked before any fine-tuning
    first = configs[args.families[0]]
    calibrating = [f for f, run in runs.items() if run.needs_held_out]
    if calibrating and not first.data.policy_split and not first.sweep.trace:
        log.warning("%s calibrate(s) on held-out data: holding out data.policy_split=%s of train for every family",
                    ", ".join(calibrating), first.sweep.held_out)
        configs = {f: with_value(c, "data.policy_split", first.sweep.held_out) for f, c in configs.items()}
        first = configs[args.families[0]]
    learn_split(first.learn_on, bool(first.data.policy_split) or bool(first.sweep.trace))
    check_swept_reward(runs, first)
    for family, grid in args.grids.items():  # every grid value is checked as its point will use it, before any work
        if family not in runs:
            raise ValueError(f"sweep.grids.{family}: {family} is not one of the swept families {args.families}.")
        for value in grid:
            knob = runs[family].spec.knob
            if knob.key.startswith("agent."):
                runs[family].spec.make_options({**runs[family].option_values(), knob.option: value})
            else:
                check_value(knob.key, value, float)
    if any(runs[f].spec.knob.option in LAYER_OPTIONS for f in args.grids) and not first.sweep.trace:
        depth = backbone_depth(first.backbone.name, first.backbone.get("package"))
        if depth is not None:  # a grid naming a layer the backbone lacks fails now, not after fine-tuning
            check_grid_depth(runs, [(f, v) for f, grid in args.grids.items() for v in grid], depth)
    device = pick_device(first.device)
    workers = check_value("sweep.workers", first.sweep.get("workers", 1), int)
    devices = sweep_devices(OmegaConf.to_container(first.sweep.devices) if first.sweep.get("devices") else None,
                            device)  # an unknown or absent device is named now, before any work
    threads = first.get("threads")
    environment = set_reproducibility(first.get("deterministic", False), threads)
    warn_if_busy(threads)
    torch.manual_seed(first.seed)
    out = Path(args.out or first.sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if first.sweep.trace:
        prepared = prepare_from_trace(first.sweep.trace, device, first.env.task)
        if (calibrating or first.learn_on == "held_out") and HELD_OUT not in prepared.trace.splits:
            raise ValueError(f"{first.sweep.trace} has no held-out split, which {', '.join(calibrating) or 'learn_on'} "
                             "needs: trace a backbone fine-tuned with data.policy_split > 0.")
    else:
        with threads_for("backbone", threads):
            prepared = prepare(first, device)
        prepared.model = None
    prepared.environment = environment
    num_layers = prepared.trace["dev"].num_layers
    points = [(f, v) for f in args.families for v in runs[f].spec.knob.values(num_layers, args.grids.get(f))]
    check_grid_depth(runs, points, num_layers)  # before any point runs
    log.info("Sweeping %d points of %d families on %s (%d layers)", len(points), len(args.families), prepared.task,
             num_layers)
    if workers > 1:  # the points in parallel; the loop below then finds them recorded and reads them back
        run_points(prepared, [(f, v, configs[f]) for f, v in points], out, workers, devices,
                   first.sweep.get("launcher", "joblib"), list(first.sweep.get("launcher_args") or []))
    bar = progress(points, desc=f"sweep {prepared.task}", unit="point")
    recorded = {family: [] for family in args.families}
    with threads_for("policy", threads):
        for family, value in bar:
            bar.set_postfix(family=family, **{runs[family].spec.knob.option: value})
            recorded[family].append((value, recorded_point(configs[family], family, value, prepared, out)))
        bar.close()
        for family in args.families:
            if first.sweep.get("adaptive", True) and runs[family].spec.knob.key == "reward.alpha" \
                    and family not in args.grids:
                extend_alpha(configs[family], family, recorded[family], prepared, out, num_layers)
    log.info("Sweep done in %.0f s: %s", time.time() - started, out)
    return out


def recorded_point(cfg: DictConfig, family: str, value, prepared: Prepared, out: Path) -> list[RunRecord]:
    """`record_point`; a point that fails leaves no half-written folder (`exitrl.cli.discard_failed_run`)."""
    run_dir = point_folders(cfg, family, value, out)[2]
    kept = folder_entries(run_dir)
    try:
        return record_point(cfg, family, value, prepared, out)
    except Exception:
        if discard_failed_run(run_dir, kept) and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()  # the family's folder, when this was its only point
        raise


ALPHA_STEP, ALPHA_ROUNDS = 3.0, 4
COVER_LOW, COVER_HIGH = 0.15, 0.7  # the saved-layer fractions a learned family's curve must reach, of (L - 1) / L


def saved_off_dev(records: list[RunRecord]) -> list[float]:
    """Saved layers of a point's policies on the held-out split (never dev: the grid must not be chosen by it)."""
    return [r.validation_results[r.agent]["saved_layers"] for r in records if r.agent in r.validation_results]


def extend_alpha(cfg: DictConfig, family: str, recorded: list, prepared: Prepared, out: Path,
                 num_layers: int) -> None:
    """Adaptive α grid: while no point of the family saves ``COVER_HIGH`` of the layers (measured on the
    held-out split), add α × 3 beyond the largest; while none saves as little as ``COVER_LOW``, α / 3 below the
    smallest; at most ``ALPHA_ROUNDS`` each way. Without a held-out split the default grid stays."""
    top = (num_layers - 1) / num_layers
    saved = [s for _, records in recorded for s in saved_off_dev(records)]
    if not saved:
        log.info("%s: no held-out split to check its alpha grid's coverage on; keeping the default grid", family)
        return
    values = [value for value, _ in recorded]
    for direction in (+1, -1):
        for _ in range(ALPHA_ROUNDS):
            if direction > 0 and max(saved) >= COVER_HIGH * top:
                break
            if direction < 0 and min(saved) <= COVER_LOW * top:
                break
            value = float(f"{(max(values) * ALPHA_STEP if direction > 0 else min(values) / ALPHA_STEP):.3g}")
            log.info("%s: extending its alpha grid to %s (held-out saved layers so far %.2f-%.2f)", family, value,
                     min(saved), max(saved))
            values.append(value)
            saved += saved_off_dev(recorded_point(cfg, family, value, prepared, out))


def sweep(agents: list[str] | str, env: str = "rte", overrides: list[str] = (), compare_runs: bool = True,
          **options) -> Path:
    """The Python form of ``python -m exitrl.sweep``: ``exitrl.sweep(["reinforce", "confidence"], "rte",
    reinforce={"epochs": 10}, sweep={"grids": {"confidence": [0.9, 0.8]}})``; returns the sweep folder (compared
    unless ``compare_runs=False``)."""
    names = agents.split(",") if isinstance(agents, str) else list(agents)
    out = run_sweep([f"agent={','.join(names)}", f"env={env}", *overrides, *overrides_from(options)])
    if compare_runs:
        compare(out)
    return out


def help_text() -> str:
    return f"""usage: exitrl sweep agent=a,b,... [<family>.<option>=v ...] [sweep.grids.<family>=[...]]
                    [key=value ...]                                  (or python -m exitrl.sweep)
       exitrl.sweep(["a", "b"], env="rte", **options) -> folder       (Python)

Run each family over its trade-off knob's grid on ONE fine-tuned backbone and ONE trace, write one run folder per
point (<out>/<family>/<knob>=<value>/, the same files as exitrl.train) and compare them (exitrl.compare). <out> is
hydra.run.dir= when given, else sweep.out. Every exitrl.train key applies to every family; <family>.<option>=v sets
one family's option; sweep.grids.<family>=[...] replaces its grid. Bad input exits with status 2.

Config groups (group=option):
{groups_text()}

Families (per-family options <family>.<option>=<value>; defaults shown; the knob is swept):
{agents_text("{family}.{option}")}

Config keys (config.yaml; any key: key=value):
{config_text(("hydra",))}
"""


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if wants_help(argv):
            prepare_cli(argv)
            print(help_text())
            return
        out = run_sweep(argv)
        compare(out)
    except USER_ERRORS as err:
        fail(err, log.name)
    except KeyboardInterrupt:
        interrupted("run the same command again to continue: the points already recorded are skipped", log.name)


callable_module(__name__, sweep)

if __name__ == "__main__":
    main()
