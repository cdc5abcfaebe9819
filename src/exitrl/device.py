"""Device and precision choice: CUDA with bf16 autocast when present, the same code in fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={preference} was asked for but CUDA is not available; use device=auto or cpu.")
    return torch.device(preference)


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op context on the CPU (fp32 there is both faster and exact)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
