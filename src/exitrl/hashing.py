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


def hash_tokenizer(tokenizer) -> str:
    """Hash of what decides token ids: the tokenizer class, its vocabulary and its normalisation settings."""
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if isinstance(v, (str, int, float, bool, type(None))) and k != "name_or_path"}
    return hash_json([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), settings])
