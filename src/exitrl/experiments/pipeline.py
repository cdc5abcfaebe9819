"""One run pipeline: prepare (data → backbone → trace), fit one agent spec, evaluate it (and any baselines) on dev,
write one run record. ``python -m exitrl.train``, every point of ``python -m exitrl.sweep``, the Python API and the
benchmarks are loops over these steps; none of them writes a run another way.

Everything a run could refuse is checked by `AgentRun.create` (agent, options, values, learn_on) before any
fine-tuning starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from exitrl.agents.declaration import LEARNED, AgentSpec
from exitrl.agents.inputs import FitInputs, learn_split
from exitrl.agents.registry import get_agent
from exitrl.agents.rule_guard import check_share, guarded_fit
from exitrl.backbones import FinetuneConfig, load_or_finetune
from exitrl.core.checkpoint import Checkpoints
from exitrl.core.hashing import hash_json
from exitrl.core.options import check_value, checked_options
from exitrl.data import TaskData, load_task
from exitrl.evaluation.evaluate import evaluate_exits, oracle_bounds
from exitrl.experiments.record import RunRecord, write_exits
from exitrl.experiments.run_summary import log_run_summary
from exitrl.policy import ExitPolicy
from exitrl.rewards import RewardSpec
from exitrl.traces.build import load_or_build_trace
from exitrl.traces.crossfit import check_crossfit, crossfit_train
from exitrl.traces.lm_run import LMBackboneConfig, LMTextConfig, load_or_build_lm_trace
from exitrl.traces.trace import HELD_OUT, Trace

log = logging.getLogger("exitrl.experiments.pipeline")


# -- one agent spec: which agent, its validated options, the reward it learns from, where it learns ---------------
@dataclass(frozen=True)
class AgentRun:
    spec: AgentSpec
    options: Any  # the agent's options dataclass, validated
    reward: RewardSpec = RewardSpec()
    learn_on: str = "auto"
    rule_guard: float = 0.0  # a learned agent: share of its learn rows held back to keep it at least the rule
    seed: int = 0

    @classmethod
    def create(cls, agent: str, options: dict | None = None, reward: RewardSpec | str | None = None,
               learn_on: str = "auto", seed: int = 0, rule_guard: float = 0.0) -> AgentRun:
        """Validate everything about one agent spec; a ValueError names the bad key or value."""
        spec = get_agent(agent)
        learn_split(learn_on, True)  # a bad learn_on fails here; whether there is a held-out split, later
        guard = float(rule_guard or 0.0)
        if guard:
            check_share(guard)
            if spec.kind != LEARNED:
                guard = 0.0  # a rule or an oracle is not trained: nothing to guard
        return cls(spec, spec.make_options(options, seed), RewardSpec.coerce(reward).check(), learn_on, guard, seed)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AgentRun:
        """From a composed config: ``agent`` (name and options), ``reward``, ``learn_on``, ``seed``."""
        agent = OmegaConf.to_container(cfg.agent, resolve=True)
        return cls.create(agent.pop("name"), agent, RewardSpec.from_config(
            OmegaConf.to_container(cfg.reward, resolve=True)), cfg.learn_on, cfg.seed, cfg.get("rule_guard", 0.0))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_held_out(self) -> bool:
        return self.spec.needs_held_out(self.options)

    def option_values(self) -> dict:
        """The options as set (``seed`` aside), for hyperparameters and records."""
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k != "seed"}

    def fit(self, trace: Trace, device: torch.device, writer=None, log_dir: Path | None = None,
            metric: str = "accuracy", checkpoints: Checkpoints | None = None) -> Fitted:
        """Fit on ``trace`` (the split chosen by ``learn_on``); returns the policy, its record and the time.
        ``checkpoints``: where an agent that checkpoints its training saves and resumes."""
        split = learn_split(self.learn_on, HELD_OUT in trace.splits)
        check_depth(self.spec.name, self.option_values(), trace["dev" if "dev" in trace.splits else split].num_layers)
        inputs = FitInputs(trace, split, self.reward, device, writer, log_dir, metric, checkpoints)
        started = time.time()
        if self.rule_guard:
            policy, info = guarded_fit(self.spec, self.options, inputs, self.rule_guard, self.seed)
        else:
            policy, info = self.spec.fit(self.options, inputs)
        return Fitted(policy, info, time.time() - started, split)


LAYER_OPTIONS = ("layer", "shallow_layer")  # 1-indexed layers: within the backbone's depth


def check_depth(agent: str, options: dict, num_layers: int, where: str = "agent.") -> None:
    """Layer-valued options (``static``'s layer, FREE's shallow layer) name a layer the backbone has."""
    for key in LAYER_OPTIONS:
        value = options.get(key)
        if value is not None and not 1 <= value <= num_layers:
            raise ValueError(f"agent={agent}: {where}{key}={value} is not a layer of this backbone; valid: "
                             f"1..{num_layers}.")


@dataclass
class Fitted:
    policy: ExitPolicy
    info: dict
    seconds: float
    learned_on: str


# -- preparing: data, backbone, trace ------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What every agent of a run shares: the trace and where it came from (the data and the backbone, when the run
    built them; a sweep of a saved trace has neither)."""

    task: str
    metric: str
    trace: Trace
    backbone: dict
    device: torch.device
    data: TaskData | None = None
    model: Any = None
    tokenizer: Any = None
    finetune: FinetuneConfig | None = None
    data_source: str | None = None
    environment: dict = field(default_factory=dict)  # `exitrl.core.device.set_reproducibility`'s, for the records

    @cached_property
    def bounds(self) -> dict:
        """`oracle_bounds` on dev (full model, per-layer scores, oracles)."""
        return oracle_bounds(self.trace["dev"], self.metric)


def finetune_config(cfg: DictConfig) -> FinetuneConfig:
    return FinetuneConfig(**checked_options(cfg.backbone.finetune, FinetuneConfig, "backbone.finetune",
                                          "backbone.finetune."), seed=cfg.seed)


def checkpoint_seconds(cfg: DictConfig) -> float:
    """``checkpoint.every_seconds``: how often fine-tuning and policy training save their state."""
    return check_value("checkpoint.every_seconds", cfg.get("checkpoint", {}).get("every_seconds", 300.0), float)


def check_data_options(cfg: DictConfig) -> None:
    """The run-level values outside any dataclass, checked before any work: ``seed``, ``data.policy_split``,
    ``data.limit.*``, ``data.crossfit``, ``confidence_threshold`` and ``checkpoint.every_seconds``."""
    check_value("seed", cfg.seed, int)
    check_value("data.policy_split", cfg.data.policy_split, float)
    check_value("data.train_from_dev", cfg.data.get("train_from_dev", 0.0), float)
    for split, limit in (OmegaConf.to_container(cfg.data.limit, resolve=True) or {}).items():
        if limit is not None:
            check_value(f"data.limit.{split}", limit, int)
            if limit < 1:
                raise ValueError(f"data.limit.{split}={limit} is out of range: it must be >= 1 (or null: all rows).")
    check_crossfit(cfg.data.get("crossfit", 0))
    check_value("confidence_threshold", cfg.get("confidence_threshold", 0.9), float)
    checkpoint_seconds(cfg)


def backbone_mode(cfg: DictConfig) -> dict:
    """Frozen, or co-trained with these settings (seed aside): runs in different modes are never seeds of one
    group."""
    mode = cfg.backbone.get("mode", "frozen")
    cotrain = OmegaConf.to_container(cfg.cotrain, resolve=True) if mode == "cotrain" and "cotrain" in cfg else None
    return {"mode": mode, "cotrain": cotrain}


def seed_group(name: str, finetune: FinetuneConfig, data, meta: dict, crossfit: int, mode: dict) -> str:
    """What a backbone's trace is, its fine-tuning seed aside: runs whose backbones differ only in that seed are
    seeds of one experiment (`exitrl.compare` averages them); anything else (data, recipe, settings) keeps runs
    apart."""
    recipe = {k: v for k, v in dataclasses.asdict(finetune).items() if k != "seed"}
    settings = {k: meta.get(k) for k in ("max_length", "pooling", "splits", "precision", "objective")}
    return hash_json({"backbone": name, "recipe": recipe, "data": data.fingerprint(), "settings": settings,
                      "crossfit": crossfit, "mode": mode})


def prepare_lm(cfg: DictConfig, device: torch.device) -> Prepared:
    """A causal-LM run (``backbone.kind: lm``, ``env=lm_text``): text, the LM (continued with a recipe when asked),
    token traces (`exitrl.traces.lm_run`)."""
    if "lm_text" not in cfg.env:
        raise ValueError(f"backbone={cfg.backbone.get('name') or 'random'} is a causal LM: use env=lm_text (episodes "
                         f"are token positions of text), not env={cfg.env.task}.")
    text = LMTextConfig(**checked_options(cfg.env.lm_text, LMTextConfig, "env.lm_text", "env.lm_text."))
    backbone = LMBackboneConfig(**checked_options(
        {k: v for k, v in cfg.backbone.items() if k not in ("kind", "mode", "finetune", "pooling")},
        LMBackboneConfig, "backbone", "backbone."))
    finetune = finetune_config(cfg)
    policy_split = check_value("data.policy_split", cfg.data.policy_split, float)
    trace, model, tokenizer, info = load_or_build_lm_trace(backbone, finetune, text, cfg.data.dir, policy_split,
                                                           cfg.cache_dir, device, cfg.seed, checkpoint_seconds(cfg))
    group = hash_json({"backbone": dataclasses.asdict(backbone), "text": dataclasses.asdict(text),
                       "finetune": {k: v for k, v in dataclasses.asdict(finetune).items() if k != "seed"}
                       if backbone.continue_training else None, "policy_split": policy_split})
    described = {**info, "objective": finetune.objective if backbone.continue_training else None,
                 "seed_group": group}
    prepared = Prepared("lm_text", "accuracy", trace, described, device, None, model, tokenizer,
                        finetune if backbone.continue_training else None, f"lm_text: {', '.join(text.sources)}")
    log.info("Token episodes %s; dev next-token accuracy per layer: %s", {k: len(v) for k, v in trace.splits.items()},
             " ".join(f"{100 * s:.1f}" for s in prepared.bounds["per_layer_score"]))
    return prepared


def prepare(cfg: DictConfig, device: torch.device, writer=None) -> Prepared:
    """Load the task, fine-tune the backbone (or reuse the cached one), trace it (or reuse the cached trace)."""
    if cfg.backbone.get("kind", "encoder") == "lm":
        return prepare_lm(cfg, device)
    if "lm_text" in cfg.env:
        raise ValueError("env=lm_text needs a causal LM backbone: backbone=smollm2 or backbone=tiny_llama.")
    limit = OmegaConf.to_container(cfg.data.limit, resolve=True)
    custom = OmegaConf.to_container(cfg.env.custom, resolve=True) if "custom" in cfg.env else None
    crossfit = check_crossfit(cfg.data.get("crossfit", 0))
    data = load_task(cfg.env.task, cfg.data.dir, limit=limit, custom=custom, policy_split=cfg.data.policy_split,
                     train_from_dev=cfg.data.get("train_from_dev", 0.0))
    log.info("Task %s from %s: %s", data.name, data.source, {k: len(v) for k, v in data.splits.items()})
    check_crossfit(crossfit, len(data.splits["train"]))
    finetune = finetune_config(cfg)
    model, tokenizer, info = load_or_finetune(cfg.backbone.name, data, finetune, cfg.cache_dir, device,
                                              cfg.backbone.pooling, cfg.backbone.package, writer,
                                              checkpoint_seconds(cfg))
    trace = load_or_build_trace(model, tokenizer, data, cfg.cache_dir, device, finetune.max_length,
                                objective=finetune.objective)
    if crossfit:
        trace = crossfit_train(trace, data, cfg.backbone.name, finetune, cfg.cache_dir, device, crossfit,
                               cfg.backbone.pooling, cfg.backbone.package,
                               checkpoint_seconds=checkpoint_seconds(cfg))
    backbone = {"name": cfg.backbone.name, "objective": finetune.objective,
                **{k: v for k, v in info.items() if k != "dev_accuracy_per_epoch"},
                "seed_group": seed_group(cfg.backbone.name, finetune, data, trace.meta, crossfit, backbone_mode(cfg))}
    prepared = Prepared(data.name, data.metric, trace, backbone, device, data, model, tokenizer, finetune,
                        data.source)
    log.info("Dev %s per layer: %s", data.metric,
             " ".join(f"{100 * s:.1f}" for s in prepared.bounds["per_layer_score"]))
    return prepared


def prepare_from_trace(path: str | Path, device: torch.device, task: str) -> Prepared:
    """A saved trace file (`exitrl.traces.trace.Trace.save`) instead of fine-tuning and tracing."""
    trace = Trace.load(Path(path).expanduser())
    return Prepared(trace.meta.get("task", task), trace.meta.get("metric", "accuracy"), trace,
                    {"trace": str(path)}, device)


# -- one run: fit, evaluate, record ------------------------------------------------------------------------------
def open_run(run_dir: Path, cfg: DictConfig | None = None) -> SummaryWriter:
    """Create the run folder, save the resolved config and open its TensorBoard writer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return SummaryWriter(str(run_dir / "tensorboard"))


def record_run(run: AgentRun, fitted: Fitted, prepared: Prepared, run_dir: Path, writer, *, seed: int,
               baselines: list[AgentRun] = (), label: str | None = None, knob: dict | None = None,
               extra: dict | None = None, started: float | None = None) -> RunRecord:
    """Save the policy (before dev can move an online-adaptive rule), evaluate it and the ``baselines`` on dev,
    log the run summary to TensorBoard, close ``writer`` and write the run record (``started``: when the run
    began, for its total time)."""
    fitted.policy.to(torch.device("cpu")).save(run_dir / "policy.pt")
    fitted.policy.save_native(run_dir)
    trace, metric = prepared.trace, prepared.metric
    dev, validation = trace["dev"], trace.splits.get(HELD_OUT)
    results, validation_results, exits = {}, {}, {}

    def assess(name: str, policy: ExitPolicy) -> None:
        """Dev (and held-out) results and per-example exits; the held-out walk runs on a copy, so an online-adaptive
        rule meets dev as it would without it."""
        exits[name] = {}
        if validation is not None and policy.deployable:  # an oracle answers for the split it read (dev) only
            validation_results[name], exits[name][HELD_OUT] = evaluate_exits(copy.deepcopy(policy), validation,
                                                                             metric)
        results[name], exits[name]["dev"] = evaluate_exits(policy, dev, metric)

    assess(run.name, fitted.policy)
    kinds = {run.name: run.spec.kind}
    baseline_info = {}
    for baseline in baselines:
        if baseline.name != run.name:
            fitted_baseline = baseline.fit(trace, prepared.device, metric=metric)
            assess(baseline.name, fitted_baseline.policy)
            kinds[baseline.name] = baseline.spec.kind
            baseline_info[baseline.name] = fitted_baseline.info
    splits = {"dev": dev, **({HELD_OUT: validation} if validation is not None else {})}
    write_exits(run_dir, {k: v.labels.cpu().to(torch.int32) for k, v in splits.items()}, exits,
                {"full": {k: v.prediction_table()[:, -1].cpu().to(torch.int32) for k, v in splits.items()},
                 "layer_one": {k: v.prediction_table()[:, 0].cpu().to(torch.int32) for k, v in splits.items()}})
    hyperparameters = {
        "agent": run.name, "family": label or run.name, "task": prepared.task, "learn_on": run.learn_on,
        **({"knob": knob["key"], "knob_value": knob["value"]} if knob else {}), **run.option_values(),
        "reward": {"name": run.reward.label, **run.reward.kwargs},
        **{k: prepared.backbone[k] for k in ("name", "objective") if k in prepared.backbone}, "seed": seed,
    }
    log_run_summary(writer, results[run.name], dev.num_layers, hyperparameters, fitted.info.get("updates", 0))
    writer.close()
    record = RunRecord(
        agent=run.name, family=label or run.name, options=run.option_values(), kinds=kinds, task=prepared.task,
        metric=metric, label_names=trace.meta.get("label_names"), max_length=trace.meta.get("max_length"),
        num_layers=dev.num_layers, results=results, oracle=prepared.bounds,
        dev_per_layer=prepared.bounds["per_layer_score"], knob=knob, reward=run.reward.record(),
        learn_on=run.learn_on, policy_trained_on=fitted.learned_on, trace_key=trace.meta.get("key"),
        backbone=prepared.backbone, agent_info=fitted.info, baseline_info=baseline_info,
        agent_seconds=round(fitted.seconds, 2), data_source=prepared.data_source, device=str(prepared.device),
        run_dir=str(run_dir), total_seconds=None if started is None else round(time.time() - started, 1),
        seed=seed, validation_results=validation_results, environment=prepared.environment,
        **(extra or {}))
    record.write(run_dir)
    return record
