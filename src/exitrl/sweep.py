"""``python -m exitrl.sweep agent=reinforce,confidence,patience,calm,free env=rte``: run each policy family over its
trade-off knob's grid (`exitrl.knobs`) on ONE fine-tuned backbone and ONE trace per task, so a sweep costs one
fine-tuning, not one per point. Then ``python -m exitrl.compare runs/sweep/rte`` compares the families.

Every override of ``python -m exitrl.train`` works and applies to every family (``env=sst2``,
``data.policy_split=0.2``, ``reward=vanilla``, ``backbone.finetune.epochs=3``); ``<family>.<option>=<value>`` sets
an option of one family (``reinforce.epochs=10``); ``sweep.grids.<family>=[...]`` replaces a family's grid;
``sweep.trace=PATH`` sweeps a saved trace instead of fine-tuning; ``sweep.label=x`` names the families ``a[x]`` in
comparisons (e.g. a second sweep with ``learn_on=train``). Each point writes
``<sweep.out>/<family>/<knob>=<value>/`` with ``metrics.json``, ``config.yaml`` and ``tensorboard/`` (eval/*,
exit/layer, hparams).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from exitrl.agents.registry import AGENTS, AgentContext, build_agent, check_agent, check_learn_on, needs_held_out
from exitrl.backbones import BackboneError
from exitrl.data import DataError
from exitrl.device import pick_device
from exitrl.evaluate import evaluate_policy, oracle_bounds
from exitrl.knobs import KNOBS
from exitrl.rewards import RewardError, resolve_reward
from exitrl.run_summary import log_run_summary
from exitrl.trace import Trace
from exitrl.train import prepare_trace, reward_settings

log = logging.getLogger("exitrl.sweep")
CONFIGS = Path(__file__).parent / "configs"  # the same config tree as exitrl.train


def split_arguments(argv: list[str]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(families, shared overrides, per-family ``agent.*`` overrides) from ``agent=a,b`` and ``a.key=v``."""
    families, shared, own = [], [], {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "agent":
            families = [name.strip() for name in value.split(",") if name.strip()]
    for arg in argv:
        key, _, value = arg.partition("=")
        family, _, option = key.partition(".")
        if key == "agent":
            continue
        if family in families and option:
            own.setdefault(family, []).append(f"agent.{option}={value}")
        else:
            shared.append(arg)
    if not families:
        raise ValueError(f"Name the families to sweep: agent=a,b,... (valid: {', '.join(AGENTS)}).")
    unknown = [f for f in families if f not in AGENTS]
    if unknown:
        raise ValueError(f"Unknown agent(s) {unknown}; valid agents: {', '.join(AGENTS)}.")
    return families, shared, own


def check_swept_reward(families: list[str], cfg: DictConfig) -> None:
    """A family swept over ``reward.alpha`` needs a reward that takes ``alpha`` and no fixed ``reward.kwargs.alpha``
    (which would override every point); say so before any fine-tuning."""
    if not any(KNOBS[f].key == "reward.alpha" for f in families):
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


def point_config(cfg: DictConfig, key: str, value) -> DictConfig:
    """``cfg`` with the knob set (``reward.alpha``: only for built-in or custom rewards that take alpha)."""
    point = cfg.copy()
    OmegaConf.set_struct(point, False)
    OmegaConf.update(point, key, value, merge=False)
    return point


def sweep(argv: list[str]) -> Path:
    families, shared, own = split_arguments(argv)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        configs = {f: compose_family(f, shared, own.get(f, [])) for f in families}
    first = configs[families[0]]
    grids = OmegaConf.to_container(first.sweep.grids, resolve=True)
    for family, cfg in configs.items():  # every option and value checked before any fine-tuning
        check_agent(family, {k: v for k, v in OmegaConf.to_container(cfg.agent, resolve=True).items()
                             if k != "name"})
    calibrating = [f for f, c in configs.items() if needs_held_out(f, OmegaConf.to_container(c.agent, resolve=True))]
    if calibrating and not first.data.policy_split and not first.sweep.trace:
        log.warning("%s calibrate(s) on held-out data: holding out data.policy_split=%s of train for every family",
                    ", ".join(calibrating), first.sweep.held_out)
        configs = {f: point_config(c, "data.policy_split", first.sweep.held_out) for f, c in configs.items()}
        first = configs[families[0]]
    check_learn_on(first.learn_on, bool(first.data.policy_split) or bool(first.sweep.trace))
    check_swept_reward(families, first)
    device = pick_device(first.device)
    torch.manual_seed(first.seed)
    out = Path(first.sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if first.sweep.trace:
        trace = Trace.load(Path(first.sweep.trace).expanduser())
        if (calibrating or first.learn_on == "held_out") and "policy" not in trace.splits:
            raise ValueError(f"{first.sweep.trace} has no held-out split, which {', '.join(calibrating) or 'learn_on'} "
                             "needs: trace a backbone fine-tuned with data.policy_split > 0.")
        task, metric, backbone = trace.meta.get("task", first.env.task), trace.meta.get("metric", "accuracy"), {
            "trace": str(first.sweep.trace)}
    else:
        data, finetune_cfg, model, _, info, trace = prepare_trace(first, device)
        task, metric = data.name, data.metric
        backbone = {"name": first.backbone.name, "objective": finetune_cfg.objective,
                    **{k: v for k, v in info.items() if k in ("key", "path", "cached")}}
        del model
    num_layers, dev = trace["dev"].num_layers, trace["dev"]
    bounds = oracle_bounds(dev, metric)
    points = [(f, v) for f in families for v in KNOBS[f].values(num_layers, grids.get(f))]
    log.info("Sweeping %d points of %d families on %s (%d layers)", len(points), len(families), task, num_layers)
    bar = tqdm(points, desc=f"sweep {task}", unit="point")
    for family, value in bar:
        bar.set_postfix(family=family, **{KNOBS[family].option: value})
        record_point(configs[family], family, value, trace, task, metric, device, out, bounds, backbone)
    bar.close()
    log.info("Sweep done in %.0f s: %s", time.time() - started, out)
    return out


def record_point(cfg: DictConfig, family: str, value, trace: Trace, task: str, metric: str, device, out: Path,
                 bounds: dict, backbone: dict) -> dict:
    """Train or fit one family at one knob value, evaluate it on dev, write its run folder."""
    knob = KNOBS[family]
    cfg = point_config(cfg, knob.key, value)
    label = f"{family}[{cfg.sweep.label}]" if cfg.sweep.label else family
    run_dir = out / label / f"{knob.option}={value}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    agent_cfg = {k: v for k, v in OmegaConf.to_container(cfg.agent, resolve=True).items() if k != "name"}
    reward, reward_fn, reward_kwargs = reward_settings(OmegaConf.to_container(cfg.reward, resolve=True))
    ctx = AgentContext(trace, reward, reward_fn, reward_kwargs, device, writer, metric, cfg.seed,
                       Path(writer.log_dir), cfg.learn_on)
    started = time.time()
    policy, info = build_agent(family, agent_cfg, ctx)
    seconds = time.time() - started
    policy.to(torch.device("cpu")).save(run_dir / "policy.pt")  # before dev can move an online-adaptive rule
    result = evaluate_policy(policy, trace["dev"], metric)
    hyperparameters = {"agent": family, "family": label, "learn_on": cfg.learn_on, "task": task, "knob": knob.key,
                       "knob_value": value, **agent_cfg,
                       "reward": {"name": reward or reward_fn, **reward_kwargs}, "seed": cfg.seed}
    log_run_summary(writer, result, trace["dev"].num_layers, hyperparameters, info.get("updates", 0))
    writer.close()
    metrics = {"agent": family, "family": label, "learn_on": cfg.learn_on, "task": task, "metric": metric,
               "num_layers": trace["dev"].num_layers,
               "knob": {"key": knob.key, "value": value}, "results": {family: result}, "oracle": bounds,
               "agent_info": info, "agent_seconds": round(seconds, 2), "backbone": backbone,
               "trace_key": trace.meta.get("key"),
               "reward": {"name": reward, "fn": reward_fn, **reward_kwargs}, "run_dir": str(run_dir)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        out = sweep(argv)
    except (DataError, BackboneError, RewardError, ValueError) as err:
        log.error("%s", err)
        print(f"exitrl: error: {err}", file=sys.stderr)
        sys.exit(2)
    from exitrl.compare import compare

    compare(out)


if __name__ == "__main__":
    main()
