"""A contextual bandit that decides exit / continue at every layer from the layer's features (disjoint LinUCB).

Read top to bottom: the deployable policy (one linear value per layer and action), the config, then the online loop.

Each layer l < L is a two-armed contextual bandit: arm *exit* pays the reward of exiting at l, arm *continue* pays
whatever the episode pays in the end (the reward at the layer where the example does exit). Every (layer, arm)
keeps the ridge-regression statistics of LinUCB (Li et al., 2010): ``A = λI + Σ x xᵀ``, ``b = Σ x r``, estimate
``θ = A⁻¹ b`` and optimism bonus ``bonus·sqrt(xᵀ A⁻¹ x)`` (LinUCB's α, renamed because α here is the reward's).
Examples arrive in small batches (delayed feedback): the bandit walks each batch up the layers choosing the arm
with the higher upper bound, then every (layer, arm) it chose is updated with the return that followed. The
deployable policy drops the bonus: exit where the estimated exit value is at least the estimated continue value.

Features are a view of the env observation (``confidence`` by default: layer position, head probabilities,
max-prob and entropy), standardised per layer with training-trace statistics, plus a constant.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.agents.standardize import fit_standardizer
from exitrl.core.observation import ObservationLayout, check_features, view_reads_history
from exitrl.core.progress import progress
from exitrl.evaluation.evaluate import evaluate_policy, log_eval
from exitrl.policy import LayerBatch, Memory, ModuleExitPolicy

EXIT_ARM, CONTINUE_ARM = 0, 1  # rows of each layer's theta (saved in policy files), not the env's action ids


class LinearExitValues(nn.Module):
    """Per-layer standardisation and the two linear value estimates ``theta [L, 2, D + 1]`` (last column: bias)."""

    def __init__(self, num_layers: int, input_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_layers, input_dim))
        self.register_buffer("std", torch.ones(num_layers, input_dim))
        self.register_buffer("theta", torch.zeros(num_layers, 2, input_dim + 1))

    def contexts(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """Standardised features of rows at 0-based ``layer`` with a trailing 1: ``[B, D + 1]``."""
        x = (features.float() - self.mean[layer]) / self.std[layer]
        return torch.cat([x, torch.ones_like(x[:, :1])], -1)


class LinUCBPolicy(ModuleExitPolicy):
    """Exit where the estimated value of exiting is at least that of continuing (no exploration bonus)."""

    name = "linucb"
    graph_safe = True

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, features: str = "confidence"):
        self.layout = ObservationLayout(hidden_size, num_classes)
        self.features = features
        self.uses_history = view_reads_history(features)
        self._config = {"num_layers": num_layers, "hidden_size": hidden_size, "num_classes": num_classes,
                        "features": features}
        self.values = LinearExitValues(num_layers, self.layout.feature_size(features))
        self.module = self.values

    @torch.no_grad()
    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        layer = batch.layer - 1
        x = self.values.contexts(batch.features(self.layout, self.features), layer)
        estimates = x @ self.values.theta[layer].T  # [B, 2]
        return estimates[:, EXIT_ARM] >= estimates[:, CONTINUE_ARM]

    def config(self) -> dict:
        return dict(self._config)


def spd_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive definite matrices (every A is λI plus a Gram matrix) through Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(matrices))


@dataclass
class LinUCBConfig:
    features: str = "confidence"  # state | confidence | observation | history | full (exitrl.core.observation)
    bonus: float = 0.5  # LinUCB's α: width of the optimism bonus, in reward units
    ridge: float = 1.0  # λ: prior precision of every θ
    rounds: int = 50_000  # examples seen online
    batch_size: int = 64  # examples whose feedback arrives together
    log_every: int = 20  # batches between TensorBoard points
    eval_every: int = 100  # batches between dev evaluations
    seed: int = 0

    def __post_init__(self):
        check_features(self.features)


def train_linucb(cfg: LinUCBConfig, inputs: FitInputs) -> tuple[LinUCBPolicy, dict]:
    """Run ``cfg.rounds`` online examples drawn from ``inputs.learn``; returns the greedy policy and a record."""
    start = time.time()
    device, dev, writer, metric = inputs.device, inputs.dev, inputs.writer, inputs.metric
    train = inputs.learn.to(device)
    num_layers = train.num_layers
    policy = LinUCBPolicy(num_layers, train.hidden_size, train.num_classes, cfg.features).to(device)
    values = policy.values
    features = policy.layout.select(train.observations(), cfg.features)  # [N, L, D]
    fit_standardizer(values, features)
    table = train.reward_table(inputs.reward).to(device)  # [N, L]
    oracle_return = table.max(1).values

    dim = features.shape[-1] + 1
    precision = cfg.ridge * torch.eye(dim, device=device).expand(num_layers, 2, dim, dim).clone()  # A
    weighted = torch.zeros(num_layers, 2, dim, device=device)  # b
    covariance = spd_inverse(precision)  # A⁻¹
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    history, total, regret, seen, batches = [], 0.0, 0.0, 0, 0
    # 0. A checkpoint found (a killed run's): the statistics, the counters and the generator, as they were.
    checkpoints = inputs.checkpoints
    if checkpoints is not None and (resumed := checkpoints.load()) is not None:
        precision, weighted = resumed["precision"].to(device), resumed["weighted"].to(device)
        covariance = spd_inverse(precision)
        generator.set_state(resumed["generator"])
        history, total, regret = resumed["history"], resumed["total"], resumed["regret"]
        seen, batches = resumed["seen"], resumed["batches"]
    bar = progress(total=cfg.rounds, desc="linucb", unit="example", initial=seen)
    while seen < cfg.rounds:
        rows = torch.randint(len(train), (min(cfg.batch_size, cfg.rounds - seen),), generator=generator).to(device)
        # 1. Walk the batch up the layers, each row taking the arm with the higher upper confidence bound.
        exit_layer = torch.full_like(rows, num_layers - 1)
        running = torch.ones_like(rows, dtype=torch.bool)
        chosen = []  # (layer, arm, row positions, contexts) to update once the returns are known
        for layer in range(num_layers - 1):
            where = running.nonzero().squeeze(1)
            if where.numel() == 0:
                break
            x = values.contexts(features[rows[where], layer], layer)
            theta = (covariance[layer] @ weighted[layer].unsqueeze(-1)).squeeze(-1)  # [2, D + 1]
            width = ((x @ covariance[layer]) * x.unsqueeze(0)).sum(-1).clamp_min(0).sqrt()  # [2, B]
            upper = x @ theta.T + cfg.bonus * width.T  # [B, 2]
            exits = upper[:, EXIT_ARM] >= upper[:, CONTINUE_ARM]
            exit_layer[where[exits]] = layer
            running[where[exits]] = False
            chosen += [(layer, EXIT_ARM, where[exits], x[exits]), (layer, CONTINUE_ARM, where[~exits], x[~exits])]
        returns = table[rows, exit_layer]
        # 2. Every decision on the way is credited with the return that followed it.
        for layer, arm, positions, x in chosen:
            if positions.numel():
                precision[layer, arm] += x.T @ x
                weighted[layer, arm] += x.T @ returns[positions]
        covariance = spd_inverse(precision)
        seen += len(rows)
        batches += 1
        bar.update(len(rows))
        total += returns.sum().item()
        regret += (oracle_return[rows] - returns).sum().item()
        if writer is not None and batches % cfg.log_every == 0:
            writer.add_scalar("train/reward", returns.mean().item(), seen)
            writer.add_scalar("train/regret_to_oracle", regret, seen)
            writer.add_scalar("train/avg_exit_layer", exit_layer.float().mean().item() + 1, seen)
        if dev is not None and (batches % cfg.eval_every == 0 or seen >= cfg.rounds):
            values.theta.copy_((covariance @ weighted.unsqueeze(-1)).squeeze(-1))
            metrics = {**evaluate_policy(policy, dev.to(device), metric), "round": seen}
            history.append(metrics)
            log_eval(writer, metrics, seen)
            bar.set_postfix(dev=f"{metrics['score']:.3f}", exit=f"{metrics['avg_exit_layer']:.2f}")
        if checkpoints is not None and seen < cfg.rounds and checkpoints.due():
            checkpoints.save({"precision": precision, "weighted": weighted, "generator": generator.get_state(),
                              "history": history, "total": total, "regret": regret, "seen": seen,
                              "batches": batches})
    bar.close()
    values.theta.copy_((covariance @ weighted.unsqueeze(-1)).squeeze(-1))
    info = {"config": asdict(cfg), "updates": seen, "mean_reward": total / max(seen, 1),
            "regret_to_oracle": regret, "train_seconds": round(time.time() - start, 2), "history": history}
    if checkpoints is not None:  # the run removes the file once its record is written
        info["checkpoints"] = checkpoints.summary()
    return policy, info


AGENT = register(AgentSpec(
    "linucb", LinUCBConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_linucb,
    "disjoint LinUCB per layer over {exit, continue}; continue is paid the episode's eventual reward"))
