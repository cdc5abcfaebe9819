"""Several processes on torch.distributed (``torchrun --nproc-per-node N -m exitrl.train …``): who this process is,
and the few collectives the rest of exitrl needs.

exitrl splits the work so that the result does not depend on the number of processes: every global batch of the
config's ``batch_size`` is shared out row by row (`share`), and gradients are averaged with each share's weight, so
N processes take the optimiser steps one process takes (up to the order of floating-point sums). That is why a run's
cache keys leave the number of processes out, and why a checkpoint resumes on any number of GPUs. Process 0 writes
every file (run record, cache entries, checkpoints); the others wait at `barrier` where a file must exist first.

Two ways to hold the model (``distributed.sharding``): ``ddp`` (DistributedDataParallel: every process holds all of
it) and ``fsdp`` (FSDP2's ``fully_shard``: weights, gradients and optimiser state split over the processes, for
backbones whose training does not fit one GPU). The choice changes memory and speed, never the optimiser steps.

One process (no ``WORLD_SIZE``, or 1) is the plain path: every helper here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SHARDINGS = ("ddp", "fsdp")
_sharding = "ddp"  # the started group's choice (`start`), like the process group itself: one per process


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine, and how training holds
    the model across them (``sharding``, one of `SHARDINGS`)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharding: str = "ddp"

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The world torchrun (or any launcher setting RANK / WORLD_SIZE / LOCAL_RANK) started this process in."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {name: os.environ.get(name) for name in names}
    if raw["WORLD_SIZE"] is None:
        return World()
    try:
        rank, size = int(raw["RANK"] or 0), int(raw["WORLD_SIZE"])
        local = int(raw["LOCAL_RANK"] if raw["LOCAL_RANK"] is not None else rank)
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, got {raw}; start the processes "
                         "with torchrun.") from err
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not describe a process group.")
    return World(rank, size, local)


def current_world() -> World:
    """The initialised process group's world (one process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), launched_world().local_rank, _sharding)
    return World()


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"Unknown distributed.sharding={sharding!r}; valid: {', '.join(SHARDINGS)} (ddp: every "
                         "process holds the whole model; fsdp: FSDP2 splits it over the processes).")
    return sharding


def start(device: torch.device, sharding: str = "ddp") -> tuple[World, torch.device]:
    """Join the process group the launcher describes (NCCL on CUDA, gloo on the CPU) and return this process's
    device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA. One process: nothing is started. ``sharding``: how
    training holds the model (`SHARDINGS`); a second call only changes that."""
    global _sharding
    _sharding = check_sharding(sharding)
    world = launched_world()
    if not world.active:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={world.local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per machine.")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_world(), device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current_world().active:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object) on every process."""
    if not current_world().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    world = current_world()
    if not world.active:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def same_everywhere(value: Any, what: str) -> Any:
    """``value``, after checking every process has the same one (a collective); a clear error names ``what`` and
    each process's value when they differ (a process that would go its own way would leave the others waiting)."""
    values = gather(value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"The processes disagree on {what}: {values} (process 0 first). Under torchrun every "
                           "process must see process 0's files: put the run and cache folders on a file system "
                           "all machines share.")
    return value


def share(items: list, world: World) -> list:
    """This process's share of one global batch: rows rank, rank + size, … (shares differ by one row at most)."""
    return items[world.rank::world.size]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (in place, returned)."""
    if current_world().active:
        dist.all_reduce(tensor)
    return tensor


def in_order(local: dict[int, Any]) -> list[Any]:
    """Results every process made, keyed by a global item number, merged into one list in that order (on every
    process): a sharded loop's output, as one process would have made it."""
    merged: dict[int, Any] = {}
    for part in gather(local):
        merged.update(part)
    return [merged[number] for number in sorted(merged)]
