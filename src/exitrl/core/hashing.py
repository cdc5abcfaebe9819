"""Content hashes for cache keys: the same inputs give the same key, any changed input a new one."""

from __future__ import annotations

import hashlib
import json

import torch


def hash_state_dict(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer, by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def hash_json(obj) -> str:
    """Hash of a JSON-serialisable object with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


PROBE = ("Hello, WORLD! Ünïcode café's 1,234 tokens...", "A second segment: naïve re-entry?")


def hash_tokenizer(tokenizer) -> str:
    """Hash of what decides token ids: the class, the vocabulary and the ids of a probe pair that exercises case,
    accents, punctuation and segments. Behaviour, not config: a tokenizer saved beside a fine-tuned model must
    hash like the one it was loaded from, whatever defaults saving wrote into its files."""
    encoded = tokenizer(*PROBE)
    return hash_json([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                      {k: list(v) for k, v in encoded.items()}])
