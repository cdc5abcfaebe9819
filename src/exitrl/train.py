"""``python -m exitrl.train agent=reinforce env=rte``: fine-tune (or reuse) the backbone, trace it, train the
agent, evaluate it beside the fixed baselines and the oracle bound, measure its wall-clock speedup against the full
model through the runtime (``eval.speed_sample`` dev rows at most, `exitrl.runtime.speed`), and write TensorBoard,
metrics.json, the saved policy and the resolved config into the run folder (`exitrl.experiments.pipeline`).

In Python the same run is ``exitrl.train(agent="reinforce", env="rte", reward={"alpha": 0.02}) -> Run``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from exitrl.agents.declaration import ANALYSIS
from exitrl.agents.inputs import held_out_error, learn_split
from exitrl.agents.registry import get_agent, rules
from exitrl.backbones.loading import backbone_depth
from exitrl.cli import (
    USER_ERRORS,
    agents_text,
    callable_module,
    check_agent_option,
    check_known_keys,
    check_override_keys,
    compose_config,
    config_text,
    default_agent,
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
from exitrl.core.checkpoint import Checkpoints, save_on_interrupt
from exitrl.core.device import pick_device, set_reproducibility
from exitrl.core.distributed import broadcast, check_sharding, current_world, launched_world, start
from exitrl.core.hashing import hash_json
from exitrl.core.options import check_value, checked_options
from exitrl.core.report import results_table
from exitrl.core.threads import check_threads, threads_for
from exitrl.experiments.cotraining import CotrainConfig, cotrain_rounds
from exitrl.experiments.pipeline import (
    LAYER_OPTIONS,
    AgentRun,
    Prepared,
    check_data_options,
    check_depth,
    checkpoint_seconds,
    finetune_config,
    open_run,
    prepare,
    record_run,
)
from exitrl.experiments.record import RunRecord
from exitrl.experiments.runs import Run
from exitrl.policy import ExitPolicy, policy_from_payload

log = logging.getLogger("exitrl.train")
BACKBONE_MODES = ("frozen", "cotrain")
SPEED_BATCH = 32  # the batch size the wall-clock speedup is measured at (exitrl predict's default)


@dataclass
class TrainPlan:
    """Everything a train run will do, validated before any work starts."""

    agent: AgentRun
    baselines: list[AgentRun]
    mode: str
    cotrain: CotrainConfig


def sharding(cfg: DictConfig) -> str:
    """``distributed.sharding``, checked (ddp when the config has no ``distributed`` section)."""
    return check_sharding(str((cfg.get("distributed") or {}).get("sharding", "ddp")))


def plan(cfg: DictConfig) -> TrainPlan:
    """Check every choice of the config (agent, options, baselines, mode, learn_on, held-out needs); a typo costs
    nothing because nothing has been fine-tuned yet."""
    check_known_keys(cfg)
    agent = AgentRun.from_config(cfg)
    if any(agent.option_values().get(key) is not None for key in LAYER_OPTIONS):
        depth = backbone_depth(cfg.backbone.name, cfg.backbone.get("package"))
        if depth is not None:  # a layer the backbone lacks fails now, not after fine-tuning
            check_depth(agent.name, agent.option_values(), depth)
    mode = cfg.backbone.get("mode", "frozen")
    if mode not in BACKBONE_MODES:
        raise ValueError(f"Unknown backbone.mode {mode!r}; valid: {', '.join(BACKBONE_MODES)}.")
    if mode == "cotrain" and cfg.backbone.get("kind", "encoder") == "lm":
        raise ValueError("backbone.mode=cotrain trains an encoder classifier under its policy; causal LMs are "
                         "continued with backbone.continue_training=true instead.")
    if mode == "cotrain" and agent.spec.kind == ANALYSIS:
        raise ValueError(f"agent={agent.name} reads dev answers and is analysis only: it cannot steer co-training.")
    pick_device(cfg.device)
    sharding(cfg)
    check_threads(cfg.get("threads"))
    speed_options(cfg)
    finetune_config(cfg)
    check_data_options(cfg)
    has_held_out = bool(cfg.data.policy_split)
    learn_split(cfg.learn_on, has_held_out)
    cotrain = CotrainConfig(**checked_options(cfg.get("cotrain") or {}, CotrainConfig, "cotrain", "cotrain."),
                            seed=cfg.seed)
    unknown = [b for b in cfg.baselines if b not in rules()]
    if unknown:
        raise ValueError(f"Unknown baseline(s) {unknown}; valid: {', '.join(rules())}.")
    baselines = [AgentRun.create(name, {"threshold": cfg.confidence_threshold} if name == "confidence" else {},
                                 agent.reward, cfg.learn_on, cfg.seed) for name in cfg.baselines]
    calibrated = [run.name for run in (agent, *baselines) if run.needs_held_out]
    if calibrated and not has_held_out:
        raise held_out_error(", ".join(calibrated), ", or give a fixed threshold")
    return TrainPlan(agent, baselines, mode, cotrain)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole job; returns what it writes to metrics.json. A run that fails leaves no half-written folder
    (`exitrl.cli.discard_failed_run`); an interrupted one keeps it for ``resume=``."""
    kept = folder_entries(run_dir) if not cfg.get("resume") else {p.name for p in run_dir.iterdir()}
    try:
        return run_steps(cfg, run_dir)
    except Exception:
        discard_failed_run(run_dir, kept)
        raise


def run_steps(cfg: DictConfig, run_dir: Path) -> dict:
    """`run`'s work: the backbone and its trace on the ``backbone`` phase's threads, the agent and the evaluation
    on the ``policy`` phase's (`exitrl.core.threads`)."""
    started = time.time()
    steps = plan(cfg)
    threads = cfg.get("threads")
    world, device = start(pick_device(cfg.device), sharding(cfg))  # torchrun: this process's GPU, the group
    writer = open_run(run_dir, cfg) if world.is_main else None
    environment = set_reproducibility(cfg.get("deterministic", False), threads)
    if world.is_main:
        warn_if_busy(threads)
    torch.manual_seed(cfg.seed)
    with threads_for("backbone", threads):
        prepared = prepare(cfg, device, writer)
    if not world.is_main and steps.mode != "cotrain":  # the backbone and the trace were the shared work
        return {}
    prepared.environment = {**environment, "processes": world.size, "sharding": world.sharding}
    agent = steps.agent
    work = hash_json({"agent": agent.name, "options": agent.option_values(), "reward": agent.reward.record(),
                      "learn_on": agent.learn_on, "seed": cfg.seed, "trace": prepared.trace.meta.get("key")})
    checkpoint_dir = Path(broadcast(str(run_dir)) if steps.mode == "cotrain" else run_dir)  # process 0's folder

    def checkpoints_for(name: str) -> Checkpoints:
        """The checkpoint file of one piece of this run's work (``agent``; co-training's rounds, backbone, agent).
        Under torchrun every process reads process 0's files (a resumed co-training must resume everywhere at the
        same step); only process 0 writes them."""
        return Checkpoints(checkpoint_dir / f"checkpoint_{name}.pt", checkpoint_seconds(cfg), work=f"{work}:{name}")

    if not world.is_main:  # co-training: every process trains the backbone under process 0's policies
        with threads_for("policy", threads):
            fitted = agent.fit(prepared.trace, device, metric=prepared.metric)
        fitted.policy = process_zeros(fitted.policy)
        cotrain(agent, fitted, prepared, steps.cotrain, cfg, run_dir, None, checkpoints_for)
        return {}
    checkpoints = checkpoints_for("agent")
    with threads_for("policy", threads):
        fitted = agent.fit(prepared.trace, device, writer, Path(writer.log_dir), prepared.metric, checkpoints)
    extra = {"backbone_mode": steps.mode}
    if steps.mode == "cotrain":
        fitted.policy = process_zeros(fitted.policy)
        prepared, fitted, extra["cotrain"] = cotrain(agent, fitted, prepared, steps.cotrain, cfg, run_dir, writer,
                                                     checkpoints_for)
    extra["wall_clock"] = wall_clock(cfg, prepared, agent, fitted.policy)
    prepared.model = None  # the backbone's memory is no longer needed
    with threads_for("policy", threads):
        record = record_run(agent, fitted, prepared, run_dir, writer, seed=cfg.seed, baselines=steps.baselines,
                            extra=extra, started=started)
    for leftover in run_dir.glob("checkpoint_*.pt"):  # only now: metrics.json is written
        leftover.unlink()
    report(record, prepared)
    return record.to_dict()


def speed_options(cfg: DictConfig) -> tuple[int, float | None]:
    """``eval.speed_sample`` (rows, 0: off) and ``eval.speed_seconds`` (a time limit, or None), checked."""
    sample = check_value("eval.speed_sample", OmegaConf.select(cfg, "eval.speed_sample", default=0), int)
    seconds = check_value("eval.speed_seconds", OmegaConf.select(cfg, "eval.speed_seconds", default=None),
                          float | None)
    return sample, seconds


def wall_clock(cfg: DictConfig, prepared: Prepared, agent: AgentRun, policy: ExitPolicy) -> dict:
    """The trained policy's wall-clock speedup against the full model on at most ``eval.speed_sample`` dev rows,
    through the runtime on the run's device (`exitrl.runtime.speed`), timed on a copy of the policy (the saved one
    and dev's evaluation are untouched); or ``{"skipped": why}``."""
    sample, seconds = speed_options(cfg)
    if not sample:
        return {"skipped": "eval.speed_sample=0"}
    if agent.spec.kind == ANALYSIS or not policy.deployable:
        return {"skipped": f"{agent.name} is analysis only: the runtime cannot run it"}
    if cfg.backbone.get("kind", "encoder") == "lm":
        return {"skipped": "the backbone is a causal LM: exitrl generate measures decoding"}
    if prepared.model is None or prepared.data is None or "dev" not in prepared.data.splits:
        return {"skipped": "no backbone and dev text in memory"}
    if current_world().size > 1:
        return {"skipped": "measured in single-process runs only"}
    from exitrl.runtime.classifier import EarlyExitClassifier  # the runtime, only when it is used
    from exitrl.runtime.speed import measure_wall_clock

    dev = prepared.data.splits["dev"]
    texts, second = list(dev["text_a"]), list(dev["text_b"])
    if any(text is not None for text in second):
        texts = list(zip(texts, second))
    label_names = list(prepared.trace.meta.get("label_names") or prepared.data.label_names)
    try:
        classifier = EarlyExitClassifier(prepared.model, prepared.tokenizer, copy.deepcopy(policy), label_names,
                                         prepared.finetune.max_length, prepared.device)
        with threads_for("backbone", cfg.get("threads")):
            measured = measure_wall_clock(classifier, texts, SPEED_BATCH, sample, seconds)
    except ValueError as err:  # the runtime refuses this backbone or policy: the run's results still stand
        log.warning("Wall-clock speedup not measured: %s", err)
        return {"skipped": f"the runtime refused it: {err}"}
    if measured is None:
        return {"skipped": "no dev rows to time"}
    log.info("Wall-clock speedup of %s: %s", agent.name, measured.describe())
    return measured.to_dict()


def process_zeros(policy):
    """Under several processes, process 0's policy on every process (agents fit on each; their floats may differ)."""
    if not current_world().active:
        return policy
    return policy_from_payload(broadcast(policy.payload() if current_world().is_main else None))


def cotrain(agent: AgentRun, fitted, prepared: Prepared, cotrain_cfg: CotrainConfig, cfg: DictConfig, run_dir: Path,
            writer, checkpoints: Callable[[str], Checkpoints] | None) -> tuple[Prepared, object, dict]:
    """ConsistentEE's iterative training after round 0; the co-trained backbone is saved in the run folder. Under
    several processes every process trains the backbone (`train_stages`) and refits the agent, and all use process
    0's policy; the others pass no ``writer`` (process 0 writes) and read process 0's ``checkpoints``. The backbone
    trains on the ``backbone`` phase's threads, the agent on the ``policy`` phase's."""
    threads = cfg.get("threads")

    def train_agent(trace, agent_writer, agent_checkpoints):
        with threads_for("policy", threads):
            refit = agent.fit(trace, prepared.device, agent_writer,
                              None if agent_writer is None else Path(agent_writer.log_dir), prepared.metric,
                              agent_checkpoints if current_world().is_main else None)  # process 0's policy is used
        return process_zeros(refit.policy), refit.info

    with threads_for("backbone", threads):
        trace, policy, last_info, rounds = cotrain_rounds(
            prepared.model, prepared.tokenizer, prepared.data, prepared.trace, fitted.policy, train_agent,
            cotrain_cfg, cfg.cache_dir, prepared.device, prepared.finetune.max_length, run_dir, writer,
            prepared.metric, None if checkpoints is None else lambda name: checkpoints(f"cotrain_{name}"))
    if writer is None:
        return prepared, fitted, {}
    prepared.model.save(run_dir / "backbone", prepared.tokenizer, extra={"cotrain": asdict(cotrain_cfg)})
    fitted.policy, fitted.info = policy, last_info or fitted.info
    record = {"config": asdict(cotrain_cfg), "rounds": rounds, "backbone": str(run_dir / "backbone")}
    return dataclasses.replace(prepared, trace=trace), fitted, record


def report(record: RunRecord, prepared: Prepared) -> None:
    """The results table (with the full model and both oracles) and the calibration lines, on the terminal."""
    bounds = prepared.bounds
    rows = {"full model": bounds["full_model"], "consistency oracle (bound)": bounds["consistency_oracle"],
            "correctness oracle": bounds["correctness_oracle"], **record.results}
    table = results_table(rows, record.metric, record.num_layers)
    notes = calibration_notes({record.agent: record.agent_info, **record.baseline_info}, record.results)
    text = (f"\nexitrl: {record.agent} on {record.task} (dev, {len(prepared.trace['dev'])} examples, "
            f"{record.num_layers} layers)\n{table}\n{wall_clock_line(record)}\n{notes}run folder: {record.run_dir}")
    print(text)
    with open(Path(record.run_dir) / "train.log", "a") as log_file:  # the log ends with what the terminal showed
        log_file.write(text + "\n")


def wall_clock_line(record: RunRecord) -> str:
    """The policy's measured wall-clock speedup beside its layer speedup, and the device; or why it was not
    measured."""
    measured = record.wall_clock or {"skipped": "not recorded"}
    if "skipped" in measured:
        return f"wall-clock speedup: not measured ({measured['skipped']})"
    layers = record.results.get(record.agent, {}).get("speedup")
    on_dev = f", {layers:.2f}x on all of dev" if layers is not None else ""
    return (f"wall-clock speedup of {record.agent}: {measured['wall_clock_speedup']:.2f}x against the full model on "
            f"{measured['device']} ({measured['examples']} dev rows, batch {measured['batch_size']}); layer "
            f"speedup {measured['layer_speedup']:.2f}x on those rows{on_dev}")


def calibration_notes(infos: dict[str, dict], results: dict[str, dict]) -> str:
    """One line per certified (LTT) rule: δ, the threshold, the calibration risk and the risk measured on dev."""
    lines = []
    for name, info in infos.items():
        if info and "delta" in info and name in results:
            dev_risk = results[name]["disagreement" if info["risk"] == "consistency" else "loss_increase"]
            found = (f"threshold {info['threshold']:.4g} (calibration risk {info['calibration_risk']:.3f} on "
                     f"{info['calibration_examples']} held-out examples)" if info["certified"]
                     else "no threshold certified: never exits early")
            lines.append(f"{name}: delta {info['delta']}, epsilon {info['epsilon']}, {info['risk']} risk: {found}; "
                         f"dev risk {dev_risk:.3f}")
    return "".join(line + "\n" for line in lines)


def train(agent: str = "reinforce", env: str = "rte", run_dir: str | Path | None = None,
          agent_options: dict | None = None, env_options: dict | None = None, overrides: list[str] = (),
          **options) -> Run:
    """The Python form of ``python -m exitrl.train``: the same config tree, defaults and pipeline. The agent's
    options go in ``agent_options`` (``{"epochs": 10}`` is ``agent.epochs=10``), a custom task's in
    ``env_options``; any other key is a keyword argument nested like the config (``reward={"alpha": 0.02}``,
    ``data={"limit": {"train": 500}}``) or a CLI override (``overrides=["reward.alpha=0.02"]``). ``run_dir``
    defaults to the CLI's folder."""
    options = {**options, "agent": agent_options or {}, "env": env_options or {}}
    cfg = compose_config([f"agent={agent}", f"env={env}", *overrides, *overrides_from(options)])
    folder = Path(run_dir or cfg.pop("run_dir"))
    cfg.pop("run_dir", None)
    run(cfg, folder)
    return Run.load(folder)


def help_text() -> str:
    return f"""usage: exitrl train [group=option ...] [key=value ...]       (or python -m exitrl.train)
       exitrl.train(agent="reinforce", env="rte", **options) -> exitrl.experiments.runs.Run      (Python)

Fine-tune (or reuse) the backbone, trace it, train or fit the agent, evaluate it and the baselines on dev, and
write metrics.json, policy.pt, config.yaml, train.log and tensorboard/ into the run folder (hydra.run.dir=).
Bad input exits with status 2 and one line on stderr. Hydra's own help: --hydra-help.

Config groups (group=option):
{groups_text()}

Agents (agent=<name>; options agent.<option>=<value>; defaults shown):
{agents_text()}

Config keys (config.yaml; any key: key=value):
{config_text(("hydra", "sweep"))}
"""


_started_in: list[Path] = []  # the run folder of this process's run, once Hydra made it (for the Ctrl-C line)


@hydra.main(config_path="configs", config_name="config", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _started_in.append(run_dir)
    try:
        run(cfg, run_dir)
    except USER_ERRORS as err:
        fail(err, log.name)


def interrupted_run() -> None:
    """Ctrl-C: one line saying how to continue. The run folder keeps its Hydra config and every checkpoint saved
    (fine-tuning's in the cache, the agent's in the folder), which ``resume=`` continues from; finished cache
    entries are reused."""
    run_dir = _started_in[-1] if _started_in else None
    if run_dir is None or not (run_dir / ".hydra" / "overrides.yaml").is_file():
        interrupted(logger=log.name)
    if (run_dir / "metrics.json").is_file():
        interrupted(f"the run had finished: {run_dir}", log.name)
    interrupted(f"resume with `exitrl train resume={run_dir}`", log.name)


def resume_arguments(argv: list[str]) -> list[str]:
    """``resume=RUN_DIR`` becomes the run's own overrides (``RUN_DIR/.hydra/overrides.yaml``) and
    ``hydra.run.dir=RUN_DIR``: the same config, the same folder, its checkpoints. Other overrides are refused (a
    resumed run must be the run that was started)."""
    wanted = [a for a in argv if a.startswith("resume=")]
    if not wanted:
        return argv
    folder = Path(wanted[-1].split("=", 1)[1]).expanduser()
    others = [a for a in argv if not a.startswith("resume=")]
    if others:
        raise ValueError(f"resume={folder} continues that run with its own config; drop the other overrides "
                         f"{others} (or start a new run).")
    overrides = folder / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        raise ValueError(f"resume={folder}: no {overrides.relative_to(folder)} there; name the folder of a run that "
                         "python -m exitrl.train started.")
    if (folder / "metrics.json").is_file():
        raise ValueError(f"resume={folder}: that run already finished (metrics.json is there); nothing to resume.")
    import yaml

    original = [a for a in yaml.safe_load(overrides.read_text()) or [] if not a.startswith("resume=")]
    return [*original, f"hydra.run.dir={folder}", f"resume={folder}"]


def check_agent_overrides(argv: list[str]) -> None:
    """The chosen agent exists, and ``agent.<option>=`` names one of its options (Hydra would answer with its own
    struct error and a hint to append the key, which exitrl then ignores)."""
    chosen = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("agent=")), default_agent())
    get_agent(chosen)  # an unknown agent is named with the valid ones
    for arg in argv:
        typed = arg.split("=", 1)[0]
        if typed.lstrip("+~").startswith("agent."):
            check_agent_option(chosen, typed.lstrip("+~").removeprefix("agent."), typed)


def quiet_other_processes(argv: list[str]) -> list[str]:
    """Under torchrun, processes other than 0 write no run folder, config or log (their folder's timestamp could
    differ from process 0's)."""
    world = launched_world()
    if world.is_main:
        return argv
    import tempfile

    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
            f"hydra.run.dir={Path(tempfile.gettempdir()) / f'exitrl-process-{world.rank}'}"]


def main() -> None:
    try:
        sys.argv[1:] = quiet_other_processes(resume_arguments(sys.argv[1:]))
        prepare_cli(sys.argv[1:])
        if not wants_help(sys.argv[1:]) and "--hydra-help" not in sys.argv[1:]:
            check_agent_overrides(sys.argv[1:])
            check_override_keys([a for a in sys.argv[1:] if not a.startswith("resume=")])
    except ValueError as err:
        fail(err, log.name)
    except KeyboardInterrupt:
        interrupted(logger=log.name)
    if wants_help(sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        if launched_world().size > 1:  # every process gets Ctrl-C: they stop together, from their last checkpoints
            hydra_main()
        else:
            with save_on_interrupt():  # Ctrl-C: the training loop in progress saves its step, then the run stops
                hydra_main()
    except KeyboardInterrupt:
        interrupted_run()


callable_module(__name__, train)

if __name__ == "__main__":
    main()
