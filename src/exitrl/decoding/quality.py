"""How close early-exit output is to the full model's: ROUGE-L between token sequences, and the perplexity of the
produced text under the full model."""

from __future__ import annotations

import torch

from exitrl.backbones.multi_exit_lm import MultiExitLM


def strip_after(tokens: torch.Tensor, eos: int | None) -> list[list[int]]:
    """Each row of ``tokens [B, n]`` up to (without) its first end of sequence."""
    rows = tokens.tolist()
    return [row[:row.index(eos)] if eos is not None and eos in row else row for row in rows]


def longest_common_subsequence(a: list[int], b: list[int]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 (β = 1) of two token sequences: 1.0 when equal; two empty sequences are equal."""
    if not candidate or not reference:
        return float(candidate == reference)
    lcs = longest_common_subsequence(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def perplexity(model: MultiExitLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               generated: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of the generated tokens (all rows pooled) under the full model, given
    their left-padded prompts."""
    device = input_ids.device
    width = max(len(row) for row in generated)
    if width == 0:
        return float("nan")
    new = torch.zeros(len(generated), width, dtype=torch.long, device=device)
    new_mask = torch.zeros_like(new)
    for row, ids in enumerate(generated):
        new[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        new_mask[row, :len(ids)] = 1
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    sequence, full_mask = torch.cat([input_ids, new], 1), torch.cat([mask, new_mask], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.lm(input_ids=sequence, attention_mask=full_mask, position_ids=positions).logits.float()
    log_probs = torch.log_softmax(logits[:, input_ids.shape[1] - 1:-1], -1)
    picked = log_probs.gather(-1, new[..., None])[..., 0]
    keep = new_mask.bool()
    return float(torch.exp(-picked[keep].mean()))
