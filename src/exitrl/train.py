"""``python -m exitrl.train agent=reinforce env=rte``: fine-tune (or reuse) the backbone, trace it, train the
agent, evaluate it beside the fixed baselines and the oracle bound, and write TensorBoard, metrics.json, the
saved policy and the resolved config into the run folder.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from exitrl.agents.registry import (
    RULES,
    AgentContext,
    build_agent,
    check_agent,
    check_learn_on,
    needs_held_out,
)
from exitrl.backbones import BackboneError, FinetuneConfig, load_or_finetune
from exitrl.backbones.cotrain import CotrainConfig
from exitrl.cotraining import cotrain_rounds
from exitrl.data import DataError, load_task
from exitrl.device import pick_device
from exitrl.evaluate import evaluate_policy, oracle_bounds
from exitrl.options import checked_options
from exitrl.report import results_table
from exitrl.rewards import RewardError
from exitrl.run_summary import log_run_summary
from exitrl.trace import load_or_build_trace

log = logging.getLogger("exitrl.train")
BACKBONE_MODES = ("frozen", "cotrain")


def baseline_options(name: str, cfg: DictConfig) -> dict:
    """Baselines run at their defaults; the confidence rule at ``confidence_threshold``."""
    return {"threshold": cfg.confidence_threshold} if name == "confidence" else {}


def reward_settings(reward_cfg: dict) -> tuple[str | None, str | None, dict]:
    """(built-in name, import path, keyword arguments) from the ``reward`` group."""
    kwargs = {k: v for k, v in reward_cfg.items() if k not in ("name", "fn", "kwargs")}
    kwargs.update(reward_cfg.get("kwargs") or {})
    fn = reward_cfg.get("fn")
    return (None if fn else reward_cfg.get("name")), fn, kwargs


def prepare_trace(cfg: DictConfig, device: torch.device, writer=None) -> tuple:
    """Load the task, fine-tune the backbone (or reuse the cached one) and trace it (or reuse the cached trace);
    returns ``(data, finetune_cfg, model, tokenizer, backbone_info, trace)``. Shared by train and sweep."""
    limit = OmegaConf.to_container(cfg.data.limit, resolve=True)
    custom = OmegaConf.to_container(cfg.env.custom, resolve=True) if "custom" in cfg.env else None
    data = load_task(cfg.env.task, cfg.data.dir, limit=limit, custom=custom, policy_split=cfg.data.policy_split)
    log.info("Task %s from %s: %s", data.name, data.source, {k: len(v) for k, v in data.splits.items()})
    finetune_cfg = FinetuneConfig(**checked_options(cfg.backbone.finetune, FinetuneConfig, "backbone.finetune"),
                                  seed=cfg.seed)
    model, tokenizer, backbone_info = load_or_finetune(
        cfg.backbone.name, data, finetune_cfg, cfg.cache_dir, device, cfg.backbone.pooling, cfg.backbone.package,
        writer,
    )
    trace = load_or_build_trace(model, tokenizer, data, cfg.cache_dir, device, finetune_cfg.max_length,
                                objective=finetune_cfg.objective)
    log.info("Dev %s per layer: %s", data.metric,
             " ".join(f"{100 * s:.1f}" for s in oracle_bounds(trace["dev"], data.metric)["per_layer_score"]))
    return data, finetune_cfg, model, tokenizer, backbone_info, trace


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole job; returns what it writes to metrics.json."""
    started = time.time()
    agent_name = cfg.agent.name
    agent_cfg = {k: v for k, v in OmegaConf.to_container(cfg.agent, resolve=True).items() if k != "name"}
    check_agent(agent_name, agent_cfg)  # before any fine-tuning: a typo costs nothing
    mode = cfg.backbone.get("mode", "frozen")
    if mode not in BACKBONE_MODES:
        raise ValueError(f"Unknown backbone.mode {mode!r}; valid: {', '.join(BACKBONE_MODES)}.")
    if mode == "cotrain" and agent_name == "oracle":
        raise ValueError("agent=oracle reads dev answers and is analysis only: it cannot steer co-training.")
    check_learn_on(cfg.learn_on, bool(cfg.data.policy_split))
    cotrain_cfg = CotrainConfig(**checked_options(cfg.get("cotrain") or {}, CotrainConfig, "cotrain"), seed=cfg.seed)
    unknown_baselines = [b for b in cfg.baselines if b not in RULES]
    if unknown_baselines:
        raise ValueError(f"Unknown baseline(s) {unknown_baselines}; valid: {', '.join(RULES)}.")
    calibrated = [n for n, c in [(agent_name, agent_cfg), *((b, baseline_options(b, cfg)) for b in cfg.baselines)]
                  if needs_held_out(n, c)]
    if calibrated and not cfg.data.policy_split:
        raise ValueError(f"{', '.join(calibrated)} calibrate(s) on examples the backbone never saw: add "
                         "data.policy_split=0.2 (holds 20 % of train out of fine-tuning), or give a fixed threshold.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    data, finetune_cfg, model, tokenizer, backbone_info, trace = prepare_trace(cfg, device, writer)
    num_layers = model.num_layers

    reward, reward_fn, reward_kwargs = reward_settings(OmegaConf.to_container(cfg.reward, resolve=True))

    def train_agent(trace, agent_writer) -> tuple:
        ctx = AgentContext(trace, reward, reward_fn, reward_kwargs, device, agent_writer, data.metric, cfg.seed,
                           Path(agent_writer.log_dir), cfg.learn_on)
        return build_agent(agent_name, agent_cfg, ctx)

    agent_started = time.time()
    policy, agent_info = train_agent(trace, writer)
    agent_seconds = time.time() - agent_started
    cotrain_record = None
    if mode == "cotrain":
        trace, policy, last_info, rounds = cotrain_rounds(
            model, tokenizer, data, trace, policy, train_agent, cotrain_cfg, cfg.cache_dir, device,
            finetune_cfg.max_length, run_dir, writer, data.metric)
        agent_info = last_info or agent_info
        model.save(run_dir / "backbone", tokenizer, extra={"cotrain": asdict(cotrain_cfg)})
        cotrain_record = {"config": asdict(cotrain_cfg), "rounds": rounds, "backbone": str(run_dir / "backbone")}
    del model
    policy.to(torch.device("cpu")).save(run_dir / "policy.pt")
    dev = trace["dev"]
    bounds = oracle_bounds(dev, data.metric)
    per_layer = bounds["per_layer_score"]

    results = {agent_name: evaluate_policy(policy, dev, data.metric)}
    baseline_info = {}
    for name in cfg.baselines:
        if name != agent_name:
            ctx = AgentContext(trace, reward, reward_fn, reward_kwargs, device, None, data.metric, cfg.seed,
                               learn_on=cfg.learn_on)
            baseline, baseline_info[name] = build_agent(name, baseline_options(name, cfg), ctx)
            results[name] = evaluate_policy(baseline, dev, data.metric)
    hyperparameters = {"agent": agent_name, "task": data.name, **agent_cfg,
                       "reward": {"name": reward or reward_fn, **reward_kwargs},
                       "backbone": cfg.backbone.name, "objective": finetune_cfg.objective, "seed": cfg.seed}
    log_run_summary(writer, results[agent_name], num_layers, hyperparameters, agent_info.get("updates", 0))
    writer.close()

    table_rows = {
        "full model": bounds["full_model"],
        "consistency oracle (bound)": bounds["consistency_oracle"],
        "correctness oracle": bounds["correctness_oracle"],
        **results,
    }
    table = results_table(table_rows, data.metric, num_layers)
    metrics = {
        "agent": agent_name, "task": data.name, "data_source": data.source, "metric": data.metric,
        "device": str(device), "num_layers": num_layers, "dev_per_layer": per_layer, "oracle": bounds,
        "results": results, "backbone": {k: v for k, v in backbone_info.items() if k != "dev_accuracy_per_epoch"},
        "trace_key": trace.meta.get("key"), "reward": {"name": reward, "fn": reward_fn, **reward_kwargs},
        "policy_trained_on": AgentContext(trace, None, None, {}, device, None, data.metric, cfg.seed,
                                           learn_on=cfg.learn_on).policy_split, "backbone_mode": mode,
        "cotrain": cotrain_record, "agent_info": agent_info, "baseline_info": baseline_info,
        "agent_seconds": round(agent_seconds, 2),
        "total_seconds": round(time.time() - started, 1), "run_dir": str(run_dir),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    notes = calibration_notes({agent_name: agent_info, **baseline_info}, results)
    print(f"\nexitrl: {agent_name} on {data.name} (dev, {len(dev)} examples, {num_layers} layers)\n{table}\n"
          f"{notes}run folder: {run_dir}")
    return metrics


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


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except (DataError, BackboneError, RewardError, ValueError) as err:
        log.error("%s", err)
        print(f"exitrl: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
