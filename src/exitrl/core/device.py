"""Device and precision choice: CUDA with bf16 autocast when present, the same code in fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch

from exitrl.core.threads import check_threads, threads_record


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; anything else, or CUDA where there is none, is a ValueError that
    names ``device``."""
    if not isinstance(preference, str):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {preference!r}.")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = preference.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {preference!r}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={preference} was asked for but CUDA is not available; use device=auto or cpu.")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device={preference}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return torch.device(preference)


def set_reproducibility(deterministic: bool = False, threads: int | str | None = None) -> dict:
    """Pin what a run's numbers depend on beyond its seed, and say what it was (recorded in ``metrics.json``).

    ``threads`` fixes torch's CPU thread count: matrix products split their sums by thread, so the same seed on
    another thread count gives slightly different floats (measured: README, Reproducibility). A number is set
    here for the whole run; ``auto`` is set per phase (`exitrl.core.threads`), and the record names each phase's
    count. ``deterministic`` makes CUDA use deterministic kernels only (``torch.use_deterministic_algorithms``;
    cuBLAS's workspace is set for it), slower, and an error names any operation that has no deterministic kernel."""
    import os
    import platform

    import transformers

    if isinstance(check_threads(threads), int):
        torch.set_num_threads(check_threads(threads))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(bool(deterministic))
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": threads_record(threads), "deterministic": bool(deterministic),
            "machine": platform.machine(), "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op context on the CPU (fp32 there is both faster and exact)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def varied_shape_attention():
    """Scaled-dot-product attention without cuDNN's backend, for loops whose batches change shape from step to step
    (dynamic padding in fine-tuning and tracing): cuDNN builds an execution plan for every new shape on the host,
    which a GPU profile of fine-tuning showed costing more than the GPU's whole step. The flash, memory-efficient
    and math backends compute the same attention without that. A no-op on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
