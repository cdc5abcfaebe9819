"""Bandits over a grid of confidence thresholds (the multi-armed-bandit exit idea of CeeBERT / UEE-UCB).

Read top to bottom: per-arm exits and rewards for every example, the two selection rules (UCB1 and Gaussian
Thompson sampling), then the online loop. Each round one example arrives, the bandit picks a threshold, the
max-prob rule with that threshold decides where the example exits, and the reward paid there updates that arm.
With the label-free reward (``reward=confidence``) the loop needs no labels, so it can adapt online to a new
domain's traffic. The result is an ordinary confidence `ExitPolicy` with the learned threshold.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.declaration import ALPHA_GRID, LEARNED, AgentSpec, Knob, register
from exitrl.agents.inputs import FitInputs
from exitrl.core.observation import confidence_measure
from exitrl.core.progress import progress
from exitrl.evaluation.evaluate import evaluate_policy
from exitrl.traces.trace import SplitTrace

SELECTION_RULES = ("ucb", "thompson")


def exits_per_threshold(trace: SplitTrace, thresholds: torch.Tensor) -> torch.Tensor:
    """0-based exit layer of every example under every threshold: ``[N, A]`` (the last layer always exits)."""
    max_prob = confidence_measure(trace.logits, "maxprob", trace.token)  # [N, L]
    passes = max_prob[:, :, None] >= thresholds[None, None, :]
    passes[:, -1, :] = True
    return passes.int().argmax(1)


@dataclass
class BanditConfig:
    rule: str = "ucb"
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
                                                             0.95, 0.99])
    rounds: int = 20_000
    ucb_c: float = 1.0  # exploration scale of UCB1's bonus, in reward units
    prior_std: float = 1.0  # Thompson: std of the Gaussian prior over an arm's mean reward
    log_every: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"Unknown bandit rule {self.rule!r}; valid: {', '.join(SELECTION_RULES)}.")


def train_threshold_bandit(cfg: BanditConfig, inputs: FitInputs) -> tuple[ConfidencePolicy, dict]:
    """Run ``cfg.rounds`` online rounds over examples drawn from ``inputs.learn``; returns the policy and a record."""
    start = time.time()
    train, dev, writer, metric = inputs.learn.to("cpu"), inputs.dev, inputs.writer, inputs.metric
    thresholds = torch.tensor(cfg.thresholds, dtype=torch.float32)
    table = train.reward_table(inputs.reward)
    arm_rewards = table.gather(1, exits_per_threshold(train, thresholds)).numpy()  # [N, A]: what each arm would pay
    best_possible = arm_rewards.mean(0)  # known only for the regret curve; the bandit never reads it

    rng = np.random.default_rng(cfg.seed)
    arms = len(cfg.thresholds)
    counts, sums, sum_squares = np.zeros(arms), np.zeros(arms), np.zeros(arms)
    regret, total, first_round = 0.0, 0.0, 1
    # A checkpoint found (a killed run's): the arms' statistics, the counters and the generator, as they were.
    checkpoints = inputs.checkpoints
    if checkpoints is not None and (resumed := checkpoints.load()) is not None:
        counts, sums, sum_squares = resumed["counts"], resumed["sums"], resumed["sum_squares"]
        regret, total, first_round = resumed["regret"], resumed["total"], resumed["round"] + 1
        rng.bit_generator.state = resumed["generator"]
    bar = progress(total=cfg.rounds, desc=f"bandit_{cfg.rule}", unit="round", initial=first_round - 1)
    for t in range(first_round, cfg.rounds + 1):
        bar.update(1)
        means = np.divide(sums, counts, out=np.zeros(arms), where=counts > 0)
        if cfg.rule == "ucb":
            unplayed = np.flatnonzero(counts == 0)
            arm = int(unplayed[0]) if unplayed.size else int(np.argmax(
                means + cfg.ucb_c * np.sqrt(2 * math.log(t) / np.maximum(counts, 1))))
        else:  # Gaussian Thompson: posterior of each arm's mean under a N(0, prior_std^2) prior
            variance = np.divide(sum_squares, counts, out=np.ones(arms), where=counts > 1) - means**2
            noise = np.maximum(variance, 1e-3)
            precision = 1.0 / cfg.prior_std**2 + counts / noise
            posterior_mean = (sums / noise) / precision
            arm = int(np.argmax(rng.normal(posterior_mean, 1.0 / np.sqrt(precision))))
        paid = float(arm_rewards[rng.integers(len(arm_rewards)), arm])
        counts[arm] += 1
        sums[arm] += paid
        sum_squares[arm] += paid * paid
        total += paid
        regret += float(best_possible.max() - best_possible[arm])
        if writer is not None and t % cfg.log_every == 0:
            writer.add_scalar("train/reward", total / t, t)
            writer.add_scalar("train/regret", regret, t)
            writer.add_scalar("train/best_threshold", cfg.thresholds[int(np.argmax(sums / np.maximum(counts, 1)))], t)
        if checkpoints is not None and t < cfg.rounds and t % cfg.log_every == 0 and checkpoints.due():
            checkpoints.save({"round": t, "counts": counts, "sums": sums, "sum_squares": sum_squares,
                              "regret": regret, "total": total, "generator": rng.bit_generator.state})
    bar.close()
    learned = int(np.argmax(np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)))
    policy = ConfidencePolicy(cfg.thresholds[learned])
    history = []
    if dev is not None:
        history.append({**evaluate_policy(policy, dev.to("cpu"), metric), "round": cfg.rounds})
    info = {"config": asdict(cfg), "updates": cfg.rounds, "threshold": cfg.thresholds[learned],
            "arm_counts": counts.astype(int).tolist(), "arm_means": (sums / np.maximum(counts, 1)).tolist(),
            "best_arm_in_hindsight": cfg.thresholds[int(np.argmax(best_possible))], "regret": float(regret),
            "train_seconds": round(time.time() - start, 2), "history": history}
    if checkpoints is not None:  # the run removes the file once its record is written
        info["checkpoints"] = checkpoints.summary()
    return policy, info


@dataclass
class UCBBanditConfig(BanditConfig):
    rule: str = field(default="ucb", init=False)  # fixed by the agent's name


@dataclass
class ThompsonBanditConfig(BanditConfig):
    rule: str = field(default="thompson", init=False)


UCB_AGENT = register(AgentSpec(
    "bandit_ucb", UCBBanditConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_threshold_bandit,
    "UCB1 over a grid of max-prob thresholds; label-free with reward=confidence"))
THOMPSON_AGENT = register(AgentSpec(
    "bandit_thompson", ThompsonBanditConfig, LEARNED, Knob("reward.alpha", ALPHA_GRID), train_threshold_bandit,
    "Gaussian Thompson sampling over a grid of max-prob thresholds; label-free with reward=confidence"))
