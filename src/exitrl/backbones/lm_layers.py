"""How good each exit of a causal LM is on held-out text, teacher-forced: perplexity, next-token accuracy and
agreement with the last layer's greedy token (what an early exit must match for greedy decoding to be unchanged)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.device import autocast


@torch.no_grad()
def per_layer_report(model: MultiExitLM, chunks: list[dict], batch_size: int = 8,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Per layer (1..L): ``perplexity`` (exp of the mean next-token NLL), ``accuracy`` (argmax == next token) and
    ``agreement`` (argmax == the last layer's argmax), over every predicted position of ``chunks``."""
    device = torch.device(device)
    model.eval().to(device)
    layers = model.num_layers
    nll = torch.zeros(layers, dtype=torch.float64)
    correct = torch.zeros(layers, dtype=torch.long)
    agree = torch.zeros(layers, dtype=torch.long)
    positions = 0
    for first in range(0, len(chunks), batch_size):
        ids = torch.tensor([c["input_ids"] for c in chunks[first:first + batch_size]], device=device)
        targets = ids[:, 1:].reshape(-1)
        with autocast(device):
            states = model.layer_states(ids)
            last = None
            for layer in reversed(range(layers)):  # the last layer first: every exit is compared with it
                logits = model.exit_logits(layer, states[layer][:, :-1]).float().flatten(0, 1)
                prediction = logits.argmax(-1)
                last = prediction if last is None else last
                nll[layer] += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
                correct[layer] += int((prediction == targets).sum())
                agree[layer] += int((prediction == last).sum())
        positions += targets.numel()
    if positions == 0:
        raise ValueError("per_layer_report needs at least one chunk of two or more tokens.")
    return {"perplexity": [math.exp(float(v) / positions) for v in nll],
            "accuracy": (correct.double() / positions).tolist(),
            "agreement": (agree.double() / positions).tolist(), "positions": positions}
