"""A sweep's points spread over devices through Hydra multirun and the joblib launcher (``sweep.workers=N``):
``exitrl.sweep`` prepares the backbone and the trace once, writes a plan (the prepared run without its backbone, the
trace, each point's config), and starts ``python -m exitrl.sweep_points --multirun point=0,...,K-1`` with
``hydra/launcher=joblib`` and N jobs. Each joblib worker claims one device slot for its lifetime (a lock file per
slot: slot i runs on ``devices[i % len(devices)]``), so N workers on N GPUs run one point per GPU; a point that an
earlier run finished is skipped (`record_point`, which a one-process sweep uses too). On several machines the
same command runs with a launcher plugin that spans them (Ray, Slurm/submitit) and a plan folder they all see.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from exitrl.agents.registry import get_agent
from exitrl.cli import CONFIGS
from exitrl.experiments.pipeline import AgentRun, Prepared, open_run, record_run
from exitrl.experiments.record import FILE_NAME, RunRecord
from exitrl.traces.trace import Trace

log = logging.getLogger("exitrl.sweep_points")
PLAN, TRACE = "plan.pt", "trace.pt"
_worker: dict = {}  # this worker process's claimed slot and loaded plan (kept across its jobs)


def write_plan(folder: Path, prepared: Prepared, points: list[tuple[str, object, DictConfig]], out: Path,
               devices: list[str], workers: int) -> Path:
    """Everything a point needs, for processes that share a file system with this one."""
    folder.mkdir(parents=True, exist_ok=True)
    prepared.trace.save(folder / TRACE)
    shared = {k: v for k, v in vars(prepared).items() if k not in ("trace", "model", "tokenizer", "bounds")}
    torch.save({"prepared": shared, "out": str(out), "devices": devices, "workers": workers,
                "points": [(family, value, OmegaConf.to_yaml(cfg, resolve=True)) for family, value, cfg in points]},
               folder / PLAN)
    for stale in folder.glob("slot-*.lock"):
        stale.unlink()
    return folder


def claim_slot(folder: Path, workers: int) -> int:
    """The first slot no live process holds (the lock goes with the process, so a killed worker frees it)."""
    import fcntl  # POSIX: only workers need it

    for slot in range(workers):
        handle = open(folder / f"slot-{slot}.lock", "w")  # noqa: SIM115 - held open for the worker's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _worker["lock"] = handle
        return slot
    raise RuntimeError(f"all {workers} sweep worker slots in {folder} are taken: is another sweep running on this "
                       "folder?")


def worker_state(folder: Path) -> dict:
    """This process's slot, device and prepared run (loaded once per worker process)."""
    if _worker.get("folder") != folder:
        plan = torch.load(folder / PLAN, weights_only=False)
        slot = claim_slot(folder, plan["workers"])
        device = torch.device(plan["devices"][slot % len(plan["devices"])])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU workers share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan["workers"]))
        shared = dict(plan["prepared"])
        shared["device"] = device
        shared["environment"] = {**shared.get("environment", {}), "sweep_worker": slot, "device": str(device)}
        prepared = Prepared(trace=Trace.load(folder / TRACE), **shared)
        _worker.update(folder=folder, plan=plan, prepared=prepared, slot=slot)
    return _worker


def with_value(cfg: DictConfig, key: str, value) -> DictConfig:
    """``cfg`` with one key set (a knob, or ``data.policy_split``)."""
    point = cfg.copy()
    OmegaConf.set_struct(point, False)
    OmegaConf.update(point, key, value, merge=False)
    return point


def comparable(cfg: DictConfig) -> str:
    """A point's config as text, without the settings that only say where it ran."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("workers", "devices"):
        (plain.get("sweep") or {}).pop(key, None)
    return OmegaConf.to_yaml(OmegaConf.create(plain))


def finished(run_dirs: list[Path], cfg: DictConfig, prepared: Prepared, quiet: bool = False
             ) -> list[RunRecord] | None:
    """The records of a point a previous sweep finished with this very config on this trace (a rerun skips it), or
    None: a point with a missing ``metrics.json`` (killed half-way; it is the last file written) or another config
    is done again. How the sweep was spread (``sweep.workers``, ``sweep.devices``) does not count. ``quiet``: no
    log lines (a look before dispatching points)."""
    wanted = comparable(cfg)
    records = []
    for run_dir in run_dirs:
        metrics, config = run_dir / FILE_NAME, run_dir / "config.yaml"
        if not metrics.is_file() or not config.is_file():
            return None
        try:
            record = RunRecord.read(metrics)
        except ValueError:
            return None
        if comparable(OmegaConf.load(config)) != wanted or record.trace_key != prepared.trace.meta.get("key"):
            if not quiet:
                log.warning("%s holds a point of another sweep (config or trace differ): running it again.",
                            run_dir)
            return None
        records.append(record)
    if not quiet:
        log.info("%s: finished by an earlier run of this sweep, skipped.", run_dirs[0].parent if len(run_dirs) > 1
                 else run_dirs[0])
    return records


def point_folders(cfg: DictConfig, family: str, value, out: Path) -> tuple[DictConfig, str, Path, list[Path]]:
    """A point's config (the knob set), its family's label, its folder and the folders its records go to (one per
    curve value)."""
    spec = get_agent(family)
    cfg = with_value(cfg, spec.knob.key, value)
    label = f"{family}[{cfg.sweep.label}]" if cfg.sweep.label else family
    run_dir = out / label / f"{spec.knob.option}={value}"
    curve_dirs = ([run_dir / f"{spec.curve.attribute}={v}" for v in spec.curve.values]
                  if spec.curve is not None and cfg.sweep.get("curve", True) else [run_dir])
    return cfg, label, run_dir, curve_dirs


def record_point(cfg: DictConfig, family: str, value, prepared: Prepared, out: Path) -> list[RunRecord]:
    """Fit one family at one knob value and record it (the same pipeline as ``exitrl.train``). A family that
    declares a curve (REINFORCE's π threshold) and ``sweep.curve=true`` records one point per curve value from the
    one fitted policy, in ``<knob>=<value>/<attribute>=<v>/``; returns the records."""
    spec = get_agent(family)
    knob = spec.knob
    cfg, label, run_dir, curve_dirs = point_folders(cfg, family, value, out)
    run = AgentRun.from_config(cfg)
    done = finished(curve_dirs, cfg, prepared)
    if done is not None:
        return done
    writer = open_run(run_dir, cfg)
    fitted = run.fit(prepared.trace, prepared.device, writer, Path(writer.log_dir), prepared.metric)
    point = {"key": knob.key, "value": value}
    if spec.curve is None or not cfg.sweep.get("curve", True):
        return [record_run(run, fitted, prepared, run_dir, writer, seed=cfg.seed, label=label, knob=point)]
    writer.close()  # the fit's learning curves stay in <knob>=<value>/tensorboard
    records = []
    for setting in spec.curve.values:
        policy = copy.deepcopy(fitted.policy)
        setattr(policy, spec.curve.attribute, setting)
        curve_dir = run_dir / f"{spec.curve.attribute}={setting}"
        records.append(record_run(run, dataclasses.replace(fitted, policy=policy), prepared, curve_dir,
                                  open_run(curve_dir, cfg), seed=cfg.seed, label=label,
                                  knob={**point, "curve": {"attribute": spec.curve.attribute, "value": setting}}))
    return records


def sweep_devices(devices: list[str] | None, device: torch.device) -> list[str]:
    """The devices the workers' slots cycle through: ``sweep.devices``, else every visible GPU when the run's device
    is CUDA, else the CPU."""
    if devices:
        from exitrl.core.device import pick_device

        try:
            return [str(pick_device(str(d))) for d in devices]
        except ValueError as err:
            raise ValueError(f"sweep.devices={list(devices)}: {err}") from err
    if device.type == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def run_points(prepared: Prepared, points: list[tuple[str, object, DictConfig]], out: Path, workers: int,
               devices: list[str], launcher: str = "joblib", launcher_args: list[str] = ()) -> None:
    """Every point through Hydra multirun with ``launcher`` (joblib: ``workers`` processes at a time; another
    installed Hydra launcher plugin gets ``launcher_args``, its ``hydra.launcher.*`` overrides); returns when all
    are recorded in ``out`` (each point's folder, as a one-process sweep writes it)."""
    import subprocess
    import sys

    def pending(cfg: DictConfig, family: str, value) -> bool:
        point_cfg, _, _, folders = point_folders(cfg, family, value, out)
        return finished(folders, point_cfg, prepared, quiet=True) is None

    points = [(f, v, c) for f, v, c in points if pending(c, f, v)]
    if not points:  # an earlier run recorded them all: no workers to start
        return
    folder = write_plan(out / ".plan", prepared, points, out, devices, workers)
    command = [sys.executable, "-m", "exitrl.sweep_points", "--multirun", f"plan={folder}",
               f"point={','.join(str(i) for i in range(len(points)))}", f"hydra/launcher={launcher}",
               *([f"hydra.launcher.n_jobs={workers}"] if launcher == "joblib" else []), *launcher_args,
               f"hydra.sweep.dir={out / '.multirun'}"]
    log.info("%d points on %d workers over %s (Hydra multirun, %s launcher)", len(points), workers,
             ", ".join(devices), launcher)
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1)
                                                                                 // workers))})
    if done.returncode != 0:
        raise RuntimeError(f"a sweep worker failed (exit status {done.returncode}); its log is under "
                           f"{out / '.multirun'}. Points already recorded are kept and skipped on a rerun.")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@hydra.main(config_path=str(CONFIGS), config_name="sweep_points", version_base=None)
def run_point(cfg: DictConfig) -> None:
    state = worker_state(Path(cfg.plan))
    family, value, text = state["plan"]["points"][cfg.point]
    log.info("point %d: %s at %s on %s (slot %d)", cfg.point, family, value, state["prepared"].device,
             state["slot"])
    record_point(OmegaConf.create(text), family, value, state["prepared"], Path(state["plan"]["out"]))


if __name__ == "__main__":  # through the imported module: joblib then pickles run_point by reference, so each
    import exitrl.sweep_points as by_name  # worker keeps one `_worker` (its slot) across its jobs

    by_name.run_point()
