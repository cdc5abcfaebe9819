"""The server's Prometheus metrics, summed over its processes: LitServe answers HTTP in API-server processes (forked
from the main process) and runs the model in inference-worker processes (spawned), so no one process sees every
number.

The server uses prometheus_client's multiprocess mode: the main process creates a private folder and points
``PROMETHEUS_MULTIPROC_DIR`` at it before any process starts (each process inherits it); every process writes its
own counters and histograms there (memory-mapped files: the API servers count requests and their latency, the
workers count batches, examples and exit layers, synchronously, before the batch's answers leave), and ``/metrics``
sums every process's files at each scrape (``MultiProcessCollector``) and derives the mean exit layer and the
saved-layers fraction from the summed counters. The folder is removed when the server stops. Series:
``exitrl_requests_total{status}`` (``/predict`` requests by status class 2xx/4xx/5xx),
``exitrl_request_latency_seconds{status}`` (histogram), ``exitrl_examples_total{run}``,
``exitrl_exits_total{run,layer}``, ``exitrl_exit_layers_total{run}`` (sum of exit layers),
``exitrl_layers_total{run}`` (examples times the run's depth), ``exitrl_mean_exit_layer{run}`` and
``exitrl_saved_layers_fraction{run}`` (once the run has answered), ``exitrl_batch_size`` (histogram of texts per
model call), ``exitrl_batch_requests`` (requests per batch: above 1 when requests were batched together),
``exitrl_batch_seconds``, ``exitrl_worker_memory_bytes{pid,kind}`` (a worker's RSS and, on CUDA, torch's allocated
and reserved memory) and ``exitrl_run_info{run,policy,inputs,layers}``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

from exitrl.serving.runs import ServedRun

if TYPE_CHECKING:
    import torch
    from prometheus_client import Metric

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# one set per process, summed over processes at each scrape (the module docstring says how)
_metrics: SimpleNamespace | None = None


def process_metrics() -> SimpleNamespace:
    """This process's metrics, created on first use (after the fork or spawn that made the process), writing into
    the multiprocess folder the main process set up."""
    global _metrics
    if _metrics is None:
        if not os.environ.get(METRICS_DIR_ENV):
            raise RuntimeError(f"{METRICS_DIR_ENV} is not set: the serve metrics need prometheus_client's "
                               "multiprocess folder (exitrl.serve sets it up).")
        from prometheus_client import Counter, Gauge, Histogram, values

        values.ValueClass = values.get_value_class()  # multiprocess values, even if imported before the folder was set
        _metrics = SimpleNamespace(
            requests=Counter("exitrl_requests", "POST /predict requests answered, by status class", ["status"],
                             registry=None),
            latency=Histogram("exitrl_request_latency_seconds", "POST /predict latency in the HTTP server, from "
                              "the request's arrival to its answer", ["status"], buckets=LATENCY_BUCKETS,
                              registry=None),
            examples=Counter("exitrl_examples", "texts (or pairs) classified", ["run"], registry=None),
            exits=Counter("exitrl_exits", "texts (or pairs) that exited at each layer", ["run", "layer"],
                          registry=None),
            exit_layers=Counter("exitrl_exit_layers", "sum of the exit layers of the texts classified", ["run"],
                                registry=None),
            layers=Counter("exitrl_layers", "texts classified times the run's depth (what the full model runs)",
                           ["run"], registry=None),
            batch_size=Histogram("exitrl_batch_size", "texts per model call (the texts of every request batched "
                                 "together)", buckets=BATCH_BUCKETS, registry=None),
            batch_requests=Histogram("exitrl_batch_requests", "requests per model call (above 1: batched "
                                     "together)", buckets=BATCH_BUCKETS, registry=None),
            batch_seconds=Histogram("exitrl_batch_seconds", "seconds per model call", buckets=LATENCY_BUCKETS,
                                    registry=None),
            memory=Gauge("exitrl_worker_memory_bytes", "an inference worker's memory: rss, and torch's "
                         "cuda_allocated and cuda_reserved on a GPU", ["kind"], multiprocess_mode="all",
                         registry=None),
        )
    return _metrics


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class MetricsCollector:
    """What ``/metrics`` shows: every process's series summed (prometheus_client's `MultiProcessCollector`), the
    mean exit layer and saved-layers fraction derived from them, and one info series per served run."""

    def __init__(self, path: str, runs: list[ServedRun]):
        self.path, self.runs = path, runs

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.multiprocess import MultiProcessCollector

        families = list(MultiProcessCollector(None, path=self.path).collect())
        yield from families
        sums: dict[tuple[str, str], float] = defaultdict(float)
        for family in families:
            for sample in family.samples:
                if sample.name in ("exitrl_examples_total", "exitrl_exit_layers_total", "exitrl_layers_total"):
                    sums[sample.name, sample.labels.get("run", "")] += sample.value
        mean = GaugeMetricFamily("exitrl_mean_exit_layer", "mean exit layer of the texts classified (1..L)",
                                 labels=["run"])
        saved = GaugeMetricFamily("exitrl_saved_layers_fraction", "1 - exit layers / (texts x depth): the share "
                                  "of the full model's layers the exits saved", labels=["run"])
        info = GaugeMetricFamily("exitrl_run_info", "the served runs", labels=["run", "policy", "inputs", "layers"])
        for run in self.runs:
            examples = sums["exitrl_examples_total", run.name]
            if examples:
                mean.add_metric([run.name], sums["exitrl_exit_layers_total", run.name] / examples)
                saved.add_metric([run.name], 1 - sums["exitrl_exit_layers_total", run.name]
                                 / sums["exitrl_layers_total", run.name])
            info.add_metric([run.name, run.policy, run.inputs, str(run.num_layers)], 1)
        yield from (mean, saved, info)


def metrics_text(path: str, runs: list[ServedRun]) -> bytes:
    """The Prometheus text exposition of every process's metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(MetricsCollector(path, runs))
    return generate_latest(registry)


def worker_memory(device: torch.device) -> dict[str, int]:
    """This process's resident memory, and torch's CUDA memory on a GPU, in bytes."""
    out = {}
    try:
        with open("/proc/self/statm") as statm:
            out["rss"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        import torch

        out["cuda_allocated"] = torch.cuda.memory_allocated(device)
        out["cuda_reserved"] = torch.cuda.memory_reserved(device)
    return out
