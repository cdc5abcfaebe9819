"""CALM (Schuster et al., NeurIPS 2022) for decoding: a token leaves at the first layer whose confidence passes a
threshold that decays along the sequence, λ(t) = clip(0.9·λ + 0.1·e^(−4t/N), 0, 1) (t: the token's index among
the N new tokens), with the skipped layers' keys and values propagated from the exited state (``copy``).

Confidence measures are the classification rule's (`exitrl.agents.calm.CalmPolicy.score`): the softmax margin of the
exit, the state's saturation cos(h_{l−1}, h_l), or a meta classifier trained on a token trace. The threshold λ is
calibrated by Learn-then-Test with the same certificate code as the classification rules
(`exitrl.calibration.ltt`): candidates from strict to loose, each run on the calibration prompts, risk = 1 − ROUGE-L
of the output against the full model's greedy output (CALM's textual consistency, a loss in [0, 1] per prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from exitrl.agents.calm import CalmPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.calibration.ltt import learn_then_test
from exitrl.core.progress import progress
from exitrl.decoding.engine import Generation
from exitrl.decoding.greedy import greedy
from exitrl.decoding.per_token import Decider, per_token_decoding
from exitrl.decoding.quality import rouge_l, strip_after

DECAY = 4.0  # CALM's τ in e^(−τ·t/N)


def decaying_threshold(base: float, step: int, max_new_tokens: int, decay: float = DECAY) -> float:
    """λ(t) = clip(0.9·λ + 0.1·e^(−τ·t/N), 0, 1): strict for the first tokens, about 0.9·λ for the last."""
    return min(1.0, max(0.0, 0.9 * base + 0.1 * math.exp(-decay * step / max_new_tokens)))


class CalmDecider(Decider):
    """CALM's decision at one layer, on the device (so a GPU captures it with the layer): the measure against a
    threshold tensor the host sets once per token. Saturation compares the layer's output with its input (layer 1's
    input is the embedding: it never exits there)."""

    graph_safe = True

    def __init__(self, policy: CalmPolicy, threshold: float, model: MultiExitLM, max_new_tokens: int,
                 device: torch.device, decay: bool = True,
                 state_projection: torch.Tensor | None = None):
        """``state_projection``: the token trace's map of states, for a meta classifier trained on one."""
        self.policy, self.base, self.num_layers = policy.to(device), float(threshold), model.num_layers
        self.max_new_tokens, self.decay = max_new_tokens, decay
        self.threshold = torch.full((), self.base, device=device)
        self.saturation = policy.measure == "saturation"
        self.needs_logits = policy.measure == "margin"  # saturation and meta read states only
        self.projection = None if state_projection is None or policy.measure != "meta" else \
            state_projection.to(device)
        self.first_exit_layer = 2 if self.saturation else 1

    def start_token(self, step: int) -> None:
        value = decaying_threshold(self.base, step, self.max_new_tokens) if self.decay else self.base
        self.threshold.fill_(value)

    def decide(self, index: int, states: torch.Tensor, logits: torch.Tensor,
               previous: torch.Tensor) -> torch.Tensor:
        states = states[:, 0].float()
        before = previous[:, 0].float() if self.saturation and index > 0 else None
        if self.projection is not None:
            states = states @ self.projection
        return self.policy.score(states, logits, before, index + 1, self.num_layers) >= self.threshold


def calm_decoding(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 32, threshold: float = 0.9, measure: str = "margin",
                  policy: CalmPolicy | None = None, decay: bool = True, propagation: str = "copy",
                  eos_token_id: int | None = None, pad_token_id: int = 0, graphs: bool | None = None,
                  state_projection: torch.Tensor | None = None,
                  exit_layers: Sequence[int] | None = None,
                  on_tokens: Callable[[int], None] | None = None, compile: bool = False) -> Generation:
    """CALM decoding with base threshold λ = ``threshold`` (``policy``: a fitted `CalmPolicy`, whose measure and meta
    classifier are used, with the token trace's ``state_projection``; else ``measure``), leaving only at
    ``exit_layers`` when given (`per_token_decoding`)."""
    policy = policy or CalmPolicy(measure, hidden_size=model.hidden_size)
    if not 0.0 <= threshold <= 1.0 and policy.measure != "saturation":
        raise ValueError(f"CALM's threshold must lie in [0, 1], got {threshold}.")
    decider = CalmDecider(policy, threshold, model, max_new_tokens, input_ids.device, decay, state_projection)
    return per_token_decoding(model, decider, input_ids, attention_mask, max_new_tokens, propagation, eos_token_id,
                              pad_token_id, graphs, exit_layers, on_tokens, compile=compile)


def calibration_candidates(measure: str, count: int = 16) -> list[float]:
    """Base thresholds from strict to loose, fixed before any data is seen (LTT's fixed-sequence test): 1 − 10^−e,
    e from 4 (margin) or 6 (saturation) down to 0, so the strict end, where a decoder's exits are safe, is dense."""
    strictest = 6.0 if measure == "saturation" else 4.0
    return [1.0 - 10.0 ** -e for e in torch.linspace(strictest, 0.0, count).tolist()]


def calibrate_calm(model: MultiExitLM, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                   max_new_tokens: int, delta: float = 0.1, epsilon: float = 0.05, measure: str = "margin",
                   policy: CalmPolicy | None = None, candidates: list[float] | None = None,
                   eos_token_id: int | None = None, pad_token_id: int = 0, propagation: str = "copy",
                   graphs: bool | None = None, decay: bool = True,
                   state_projection: torch.Tensor | None = None,
                   exit_layers: Sequence[int] | None = None) -> tuple[float | None, dict]:
    """The loosest base threshold whose risk (1 − ROUGE-L against full greedy, per prompt) Learn-then-Test
    certifies at most ``delta`` with probability 1 − ``epsilon`` on the calibration ``batches`` of (ids, mask);
    None when not even the strictest candidate is certified. Candidates are decoded from strict to loose and the
    walk stops at the first one it cannot accept."""
    measure = policy.measure if policy is not None else measure
    candidates = candidates if candidates is not None else calibration_candidates(measure)
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
              "graphs": graphs}
    bar = progress(total=len(batches) * (1 + len(candidates)), desc="calibrate calm", unit="batch")
    references = []
    for ids, mask in batches:
        references.append(strip_after(greedy(model, ids, mask, **common).tokens, eos_token_id))
        bar.update(1)
    n = sum(len(rows) for rows in references)
    risks: list[float] = []
    result = learn_then_test([], max(n, 1), delta, epsilon)
    for candidate in candidates:
        bar.set_postfix(threshold=f"{candidate:.4g}")
        losses = []
        for (ids, mask), reference in zip(batches, references):
            out = calm_decoding(model, ids, mask, threshold=candidate, measure=measure, policy=policy, decay=decay,
                                propagation=propagation, state_projection=state_projection,
                                exit_layers=exit_layers, **common)
            losses += [1.0 - rouge_l(a, b) for a, b in zip(strip_after(out.tokens, eos_token_id), reference)]
            bar.update(1)
        risks.append(sum(losses) / len(losses))
        result = learn_then_test(risks, n, delta, epsilon)
        if result.index < len(risks) - 1:  # this candidate was not accepted: the walk ends
            break
    bar.close()  # the walk may stop early: the bar's total is its longest
    chosen = candidates[result.index] if result.certified else None
    return chosen, {"candidates": candidates[:len(risks)], "risks": risks, "pvalues": result.pvalues, "n": n,
                    "delta": delta, "epsilon": epsilon, "threshold": chosen}
