"""The observation every env emits and every policy rebuilds at inference: one layout, built by one function.
It sits below both envs and policies, so that neither has to import the other to agree on it.

Layout of the flat float32 vector (D = H + C + 3 + K):
``[pooled state (H) | layer position l/L (1) | exit-head probabilities (C) | max-prob (1) | entropy (1) |
history (K)]``.

The history is what a row's walk up the layers has shown so far (ConsistentEE's state has none of it, and without it
a learner cannot even express PABEE or CALM's saturation): whether the prediction agrees with the previous layer's,
PABEE's agreement streak, the change of max-prob and entropy since the previous layer, the running min and max of
max-prob, and cos(h_{l−1}, h_l) of the pooled states. At layer 1 every change, the streak and the cosine are 0. It is
a function of layers 1..l only, so a trace can precompute it for every (example, layer) (`observation_table`) and a
live walk can update it layer by layer in the policy's per-row memory (`init_history` / `step_history`); the two
agree, and tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# views of the observation a policy can learn from (``features=``): the pooled state, the exit head's confidence
# (position, probabilities, max-prob, entropy), both (``observation``, the layout before history existed),
# confidence + history, or everything
FEATURES = ("state", "confidence", "observation", "history", "full")
HISTORY = ("agrees_with_previous", "agreement_streak", "max_prob_change", "min_max_prob", "max_max_prob",
           "entropy_change", "cosine_to_previous")
HISTORY_KEY = "history."  # prefix of the history's entries in a policy's per-row memory


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ValueError(f"Unknown agent.features {features!r}; valid: {', '.join(FEATURES)}.")
    return features


def view_reads_history(features: str) -> bool:
    """Whether the feature view ``features`` includes the history (its policy then sets ``uses_history``)."""
    return check_features(features) in ("history", "full")


@dataclass(frozen=True)
class ObservationLayout:
    hidden_size: int
    num_classes: int

    @property
    def size(self) -> int:
        return self.hidden_size + self.num_classes + 3 + len(HISTORY)

    @property
    def state(self) -> slice:
        return slice(0, self.hidden_size)

    @property
    def position(self) -> int:
        return self.hidden_size

    @property
    def probs(self) -> slice:
        return slice(self.hidden_size + 1, self.hidden_size + 1 + self.num_classes)

    @property
    def max_prob(self) -> int:
        return self.hidden_size + 1 + self.num_classes

    @property
    def entropy(self) -> int:
        return self.hidden_size + 2 + self.num_classes

    @property
    def history(self) -> slice:
        return slice(self.hidden_size + 3 + self.num_classes, self.size)

    def history_index(self, name: str) -> int:
        """Column of one history feature (a name of `HISTORY`)."""
        return self.history.start + HISTORY.index(name)

    def view(self, features: str) -> slice:
        end = self.hidden_size + self.num_classes + 3
        return {"full": slice(0, self.size), "observation": slice(0, end), "state": self.state,
                "confidence": slice(self.hidden_size, end), "history": slice(self.hidden_size, self.size)}[
            check_features(features)]

    def feature_size(self, features: str) -> int:
        view = self.view(features)
        return view.stop - view.start

    def select(self, obs, features: str):
        """The feature view of observations (torch tensors or numpy arrays, last axis = features)."""
        return obs[..., self.view(features)]


@dataclass(frozen=True)
class TokenExit:
    """What a causal LM's exit tells beyond its compact logits. A vocabulary (49k tokens for SmolLM2) is too wide to
    keep per layer, so a *token exit* keeps ``logits [..., k+1]``: the k largest log-probabilities in descending
    order, then the log of the remaining mass (softmax of them is exactly the distribution over "each of the top k
    tokens, or any other"), plus ``predictions`` (the emitted token id) and ``entropy`` (of the whole distribution)
    here. Everything below reads an exit through `exit_predictions` and `confidence_features` /
    `confidence_measure`, which take a TokenExit when there is one, so policies, envs and rewards need not know
    which kind of exit they face. Built from full logits by `summarize_token_logits`."""

    predictions: torch.Tensor
    entropy: torch.Tensor

    def select(self, index) -> TokenExit:
        """The rows (or layer) ``index`` of both tensors."""
        return TokenExit(self.predictions[index], self.entropy[index])

    def to(self, device) -> TokenExit:
        return TokenExit(self.predictions.to(device), self.entropy.to(device))


def summarize_token_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, TokenExit]:
    """Full vocabulary logits ``[..., V]`` -> the compact logits ``[..., k+1]`` and the `TokenExit` (float32)."""
    log_probs = torch.log_softmax(logits.float(), -1)
    top, ids = log_probs.topk(k, -1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.cat([top, rest.unsqueeze(-1)], -1), TokenExit(ids[..., 0], entropy)


def exit_predictions(logits: torch.Tensor, token: TokenExit | None = None) -> torch.Tensor:
    """What each exit emits: the class (argmax of its logits) or, for a token exit, the token id."""
    return logits.argmax(-1) if token is None else token.predictions


def exit_probs(logits: torch.Tensor, token: TokenExit | None = None) -> torch.Tensor:
    """The probabilities confidence measures read: every class, or a token exit's top k (exact, descending)."""
    probs = torch.softmax(logits.float(), -1)
    return probs if token is None else probs[..., :-1]


def confidence_measure(logits: torch.Tensor, measure: str, token: TokenExit | None = None) -> torch.Tensor:
    """``maxprob``, ``margin`` (top-1 minus top-2 probability) or ``entropy`` of each exit: higher is surer, except
    entropy (lower is surer). Exact for token exits too (their entropy is kept, not recomputed from the top k)."""
    probs = exit_probs(logits, token)
    if measure == "maxprob":
        return probs.max(-1).values
    if measure == "margin":
        top2 = probs.topk(2, -1).values
        return top2[..., 0] - top2[..., 1]
    if measure == "entropy":
        if token is not None:
            return token.entropy.float()
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    raise ValueError(f"Unknown confidence measure {measure!r}; valid: maxprob, margin, entropy.")


def confidence_features(logits: torch.Tensor, token: TokenExit | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The observation's probabilities (softmax of the logits: every class, or a token exit's top k and the rest),
    max-prob and entropy of exit logits ``[..., C]`` (float32)."""
    probs = torch.softmax(logits.float(), -1)
    if token is not None:
        return probs, probs[..., 0], token.entropy.float()
    entropy = -(probs * torch.log_softmax(logits.float(), -1)).sum(-1)
    return probs, probs.max(-1).values, entropy


def init_history(batch_size: int, hidden_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fresh history for ``batch_size`` rows, as per-row memory entries (the walks compact them with the rows)."""
    zeros = torch.zeros(batch_size, device=device)
    return {f"{HISTORY_KEY}layer": torch.zeros(batch_size, dtype=torch.long, device=device),
            f"{HISTORY_KEY}prediction": torch.zeros(batch_size, dtype=torch.long, device=device),
            f"{HISTORY_KEY}streak": zeros, f"{HISTORY_KEY}max_prob": zeros.clone(),
            f"{HISTORY_KEY}min": zeros.clone(), f"{HISTORY_KEY}max": zeros.clone(),
            f"{HISTORY_KEY}entropy": zeros.clone(),
            f"{HISTORY_KEY}state": torch.zeros(batch_size, hidden_size, device=device)}


def step_history(memory: dict[str, torch.Tensor], states: torch.Tensor, logits: torch.Tensor,
                 token: TokenExit | None = None) -> torch.Tensor:
    """Advance each row's history by one layer (its states ``[B, H]`` and logits ``[B, C]``); returns the history
    features ``[B, K]`` of this layer and replaces the memory's entries with the updated ones (no host reads)."""
    k = HISTORY_KEY
    _, max_prob, entropy = confidence_features(logits, token)
    states = states.float()
    prediction = exit_predictions(logits, token)
    first = memory[f"{k}layer"] == 0
    agrees = (prediction == memory[f"{k}prediction"]) & ~first
    streak = torch.where(agrees, memory[f"{k}streak"] + 1, torch.zeros_like(max_prob))
    low = torch.where(first, max_prob, torch.minimum(memory[f"{k}min"], max_prob))
    high = torch.where(first, max_prob, torch.maximum(memory[f"{k}max"], max_prob))
    zero = torch.zeros_like(max_prob)
    max_prob_change = torch.where(first, zero, max_prob - memory[f"{k}max_prob"])
    entropy_change = torch.where(first, zero, entropy - memory[f"{k}entropy"])
    cosine = torch.where(first, zero, F.cosine_similarity(memory[f"{k}state"], states, dim=-1))
    memory.update({f"{k}layer": memory[f"{k}layer"] + 1, f"{k}prediction": prediction, f"{k}streak": streak,
                   f"{k}max_prob": max_prob, f"{k}min": low, f"{k}max": high, f"{k}entropy": entropy,
                   f"{k}state": states})
    return torch.stack([agrees.float(), streak, max_prob_change, low, high, entropy_change, cosine], -1)


def history_table(states: torch.Tensor, logits: torch.Tensor, token: TokenExit | None = None) -> torch.Tensor:
    """History features at every (example, layer) of a trace split: ``[N, L, K]``, layer by layer with the same
    `step_history` a live walk uses."""
    memory = init_history(states.shape[0], states.shape[-1], states.device)
    return torch.stack([step_history(memory, states[:, layer], logits[:, layer],
                                     None if token is None else token.select((slice(None), layer)))
                        for layer in range(logits.shape[1])], 1)


def build_observation(states: torch.Tensor, logits: torch.Tensor, layer, num_layers: int,
                      history: torch.Tensor | None = None, token: TokenExit | None = None) -> torch.Tensor:
    """Observations for states ``[..., H]`` and logits ``[..., C]`` at 1-indexed ``layer`` (int or tensor).
    ``history`` ``[..., K]`` from `step_history`; None (a walk for a policy that reads no history) fills NaN, so a
    policy that would read a history it was not given fails loudly instead of reading zeros."""
    probs, max_prob, entropy = confidence_features(logits, token)
    if isinstance(layer, torch.Tensor):
        position = layer.to(device=states.device, dtype=torch.float32) / num_layers
        position = position.expand(states.shape[:-1]).unsqueeze(-1) if position.dim() == 0 else position.unsqueeze(-1)
    else:  # a Python number: no host-to-device copy (which a captured CUDA graph cannot hold)
        position = torch.full((*states.shape[:-1], 1), layer, dtype=torch.float32, device=states.device) / num_layers
    if history is None:
        history = torch.full((*states.shape[:-1], len(HISTORY)), float("nan"), device=states.device)
    return torch.cat([states.float(), position, probs, max_prob.unsqueeze(-1), entropy.unsqueeze(-1),
                      history.float()], -1)


def observation_table(states: torch.Tensor, logits: torch.Tensor, token: TokenExit | None = None) -> torch.Tensor:
    """Observations for every (example, layer) of a trace split: ``[N, L, D]``, history included (``token``: the
    split's `TokenExit` tables ``[N, L]``, for token exits)."""
    num_layers = logits.shape[1]
    layers = torch.arange(1, num_layers + 1, device=states.device).expand(states.shape[0], num_layers)
    return build_observation(states, logits, layers, num_layers, history_table(states, logits, token), token)
