"""Per-exit temperature scaling (Guo et al. 2017; used by SWEET to compare exits fairly): one temperature T_l per
exit head, fitted by minimising the negative log-likelihood of held-out labels, so that a confidence threshold means
the same thing at every layer. Scaling leaves every argmax, and so every prediction, unchanged.

`TemperatureScaledPolicy` wraps any confidence-type rule and shows it logits / T_l.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F

from exitrl.policy import ExitPolicy, LayerBatch, Memory

CANDIDATES = torch.logspace(-1.3, 1.3, 261)  # 0.05 .. 20, steps of 2.3 %


@torch.no_grad()
def fit_temperatures(logits: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor = CANDIDATES,
                     token=None) -> torch.Tensor:
    """``logits [N, L, C]``, ``labels [N]`` -> ``[L]`` temperatures, each the NLL minimiser on a log-spaced grid
    (a grid rather than gradient steps: one scalar per layer, no step size to tune, no divergence). ``token``: a
    token trace's exits, which keep the top k log-probabilities only and cannot be rescaled: refused."""
    if token is not None:
        raise ValueError("Temperature scaling needs every class's logit; a token trace keeps a causal LM's top k only. "
                         "Leave agent.temperature=false for LMs.")
    logits, labels = logits.float().cpu(), labels.long().cpu()
    if labels.numel() == 0:
        raise ValueError("fitting temperatures needs at least one labelled example; the held-out split is empty.")
    temperatures = []
    for layer in range(logits.shape[1]):
        nll = torch.zeros(candidates.numel())
        for rows in torch.arange(labels.numel()).split(8192):  # [K, rows, C] at a time
            log_probs = F.log_softmax(logits[rows, layer][None] / candidates[:, None, None], -1)
            nll -= log_probs.gather(-1, labels[rows][None, :, None].expand(candidates.numel(), -1, 1)).sum((1, 2))
        temperatures.append(float(candidates[int(nll.argmin())]))
    return torch.tensor(temperatures)


def _scaled(batch: LayerBatch, temperatures: torch.Tensor) -> LayerBatch:
    t = temperatures[batch.layer - 1].to(batch.logits.device)
    return dataclasses.replace(batch, logits=batch.logits.float() / t)  # history and the rest kept


class TemperatureScaledPolicy(ExitPolicy):
    """``inner`` deciding on temperature-scaled exit logits; persistence stores the inner policy's class and
    config beside the temperatures, so `load_policy` rebuilds both."""

    def __init__(self, inner: ExitPolicy | dict, temperatures: list[float] | torch.Tensor):
        if isinstance(inner, dict):  # from a saved config
            module_name, _, qualname = inner["class"].partition(":")
            inner_cls = getattr(importlib.import_module(module_name), qualname)
            inner = inner_cls(**inner["config"])
        self.inner = inner
        self.temperatures = torch.as_tensor(temperatures, dtype=torch.float32)
        if (self.temperatures <= 0).any():
            raise ValueError("temperatures must be > 0.")
        self.name = inner.name
        self.deployable = inner.deployable

    @property
    def graph_safe(self) -> bool:
        return self.inner.graph_safe

    @property
    def first_exit_layer(self) -> int:
        return self.inner.first_exit_layer

    @property
    def observes_final(self) -> bool:
        return self.inner.observes_final

    def init_memory(self, batch_size: int, device: torch.device) -> Memory:
        return self.inner.init_memory(batch_size, device)

    def decide(self, batch: LayerBatch, memory: Memory) -> torch.Tensor:
        return self.inner.decide(_scaled(batch, self.temperatures), memory)

    def observe_final(self, batch: LayerBatch, memory: Memory) -> None:
        self.inner.observe_final(_scaled(batch, self.temperatures), memory)

    def to(self, device: torch.device) -> TemperatureScaledPolicy:
        self.inner.to(device)
        self.temperatures = self.temperatures.to(device)
        return self

    def config(self) -> dict:
        inner = {"class": f"{type(self.inner).__module__}:{type(self.inner).__qualname__}",
                 "config": self.inner.config()}
        return {"inner": inner, "temperatures": self.temperatures.cpu().tolist()}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def with_temperatures(policy: ExitPolicy, held_out) -> tuple[ExitPolicy, dict]:
    """``policy`` deciding on logits scaled by per-exit temperatures fitted on ``held_out`` (a trace split of
    examples the backbone never saw), and the record of the temperatures."""
    temperatures = fit_temperatures(held_out.logits, held_out.labels, token=held_out.token)
    return TemperatureScaledPolicy(policy, temperatures), {"temperatures": temperatures.tolist()}
