"""Steps on fixed tensors, captured once as CUDA graphs and replayed: the device-side trick both fast paths share
(the classification walk, `exitrl.runtime.fast_walk`, and decoding, `exitrl.decoding`). On a small model a GPU spends
more time launching kernels than running them; a replayed graph launches a whole step at once."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable

import torch


def tree_map(fn: Callable, value):
    """``fn`` on every tensor of nested dicts / tuples / lists (None stays None)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: tree_map(fn, v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(tree_map(fn, v) for v in value)
    return value


def tree_copy(target, source) -> None:
    """Copy ``source`` into the same-shaped tensors of ``target`` in place."""
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for k in target:
            tree_copy(target[k], source[k])
    elif isinstance(target, tuple | list):
        for t, s in zip(target, source):
            tree_copy(t, s)


class Replayable:
    """A step on fixed tensors: run eagerly the first time, then (with a graph pool, on CUDA) captured as a CUDA
    graph and replayed. Steps only write into tensors allocated outside them, so their graphs can share one memory
    pool: they never run concurrently, and nothing they allocate outlives them. A step that cannot be captured
    (a model's own code that copies a host tensor, as DeBERTa's relative positions do) stays eager, with a
    warning naming it."""

    def __init__(self, fn: Callable[[], None], pool=None, name: str = "step"):
        self.fn, self.pool, self.name, self.graph = fn, pool, name, None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.fn()
        if self.pool is not None:
            self.graph = self._capture()
            self.pool = None if self.graph is None else self.pool

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()  # a collection during capture may free CUDA memory or graphs, which capture forbids
        try:
            # thread_local: only this thread's unsafe calls break the capture; the runtime's reader thread pins the
            # next batches' host memory meanwhile, which the default (global) mode refuses
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.fn()
        except RuntimeError as error:
            warnings.warn(f"{self.name} cannot be captured in a CUDA graph and runs eagerly: "
                          f"{str(error).splitlines()[-1]}", stacklevel=3)
            torch.cuda.synchronize()
            return None
        finally:
            if collecting:
                gc.enable()
        return graph


def conditional_nodes() -> bool:
    """Whether this torch captures conditional nodes into CUDA graphs (``CUDAGraph.begin_capture_to_if_node``:
    torch 2.13 has it, 2.11 does not)."""
    graph = getattr(torch.cuda, "CUDAGraph", None)
    methods = all(hasattr(graph, name) for name in ("get_currently_capturing_graph", "begin_capture_to_if_node",
                                                    "end_capture_to_conditional_node"))
    cuda = torch.version.cuda  # conditional nodes came with CUDA 12.4; ROCm builds have none
    return methods and torch.version.hip is None and cuda is not None and \
        tuple(int(part) for part in cuda.split(".")[:2]) >= (12, 4)


def run_if(pred: torch.Tensor, fn: Callable[[], None]) -> None:
    """``fn`` where the one-element bool ``pred`` holds. Inside a CUDA graph capture it becomes a conditional node
    (CUDA 12.4+), so the device decides whether its kernels run and no host read is needed; outside one the host
    reads ``pred`` (on CUDA a synchronisation: the eager run before a capture, or a walk without graphs)."""
    if pred.is_cuda and torch.cuda.is_current_stream_capturing():
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(pred)
        try:
            fn()
        finally:
            graph.end_capture_to_conditional_node()
    elif bool(pred):
        fn()
