"""The LitServe API the inference workers run: each worker loads every served run once, and each model call
classifies the texts of every request LitServe batched together, grouped by run, then splits the answers back per
request (with the counts the metrics need)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from exitrl.serving.metrics import process_metrics, worker_memory
from exitrl.serving.requests import PREDICT_PATH

if TYPE_CHECKING:
    from exitrl.runtime.classifier import EarlyExitClassifier

try:  # `exitrl serve --help` works without the serve extra; serving itself says what to install
    import litserve as ls
except ImportError:  # pragma: no cover - exercised only without the extra
    ls = None


def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent dies, so a killed server leaves no
    workers behind; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ExitAPI(ls.LitAPI if ls is not None else object):
    """The LitServe API of the served runs: each worker loads every run (``setup``); ``predict`` gets a batch of
    checked requests (from `parse_request`), groups their texts by run and classifies each run's texts in one
    `EarlyExitClassifier.predict` call, then splits the answers back per request."""

    def __init__(self, runs: list[dict], full: bool, threads: int | str, workers: int, url: str, max_batch_size: int,
                 batch_timeout: float, runtime: dict | None = None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.runs, self.full, self.threads, self.workers, self.url = runs, full, threads, workers, url
        self.batch_rows = max_batch_size  # rows per forward pass, whatever the requests hold
        self.runtime = dict(runtime or {})  # the fast path's options, for every classifier

    def setup(self, device: str) -> None:
        import torch

        from exitrl.agents.static import StaticPolicy
        from exitrl.core.threads import phase_threads
        from exitrl.runtime.classifier import EarlyExitClassifier

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process stops us
        die_with_parent()
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no loading bars in the server's log (nor tqdm's lock)
        count = phase_threads(self.threads, "backbone")
        if count is not None:
            if self.threads == "auto" and str(device) == "cpu":
                count = max(1, count // self.workers)  # several CPU workers share the cores
            torch.set_num_threads(count)
        self.classifiers = {}
        for run in self.runs:
            classifier = EarlyExitClassifier.from_run(run["dir"], str(device), **self.runtime)
            if self.full:
                classifier = EarlyExitClassifier(classifier.model, classifier.tokenizer,
                                                 StaticPolicy(classifier.model.num_layers), classifier.label_names,
                                                 classifier.max_length, classifier.device, **self.runtime)
            self.warm_up(classifier, run["pairs"], str(device).startswith("cuda"))
            self.classifiers[run["name"]] = classifier
        self.torch_device = torch.device(str(device))
        process_metrics()
        names = ", ".join(f"{r['name']} ({r['policy']})" for r in self.runs)
        print(f"exitrl: worker {os.environ.get('LITSERVE_WORKER_ID', '0')} ready on {device} "
              f"({torch.get_num_threads()} threads): {names}; {self.url}", flush=True)

    def warm_up(self, classifier: EarlyExitClassifier, pairs: bool | None, cuda: bool) -> None:
        """First-call costs before the worker says it is ready: a first prediction (the tokenizer's threads), and
        on CUDA the fast path's graphs for every sequence and batch bucket (`EarlyExitClassifier.warm_up`), so no
        request waits on a capture."""
        classifier.predict([("warm up", "warm up") if pairs else "warm up"], batch_size=self.batch_rows)
        if cuda:
            classifier.warm_up(self.batch_rows)

    def decode_request(self, request: dict, **kwargs) -> dict:
        return request  # checked and normalised by ServeMiddleware in the HTTP process

    def predict(self, batch: dict | list[dict], **kwargs) -> dict | list[dict]:
        single = isinstance(batch, dict)  # max_batch_size 1: LitServe passes one request
        requests = [batch] if single else list(batch)
        started = time.perf_counter()
        metrics = process_metrics()
        answers: list[list] = [[] for _ in requests]
        by_run: dict[tuple[str, bool], list[int]] = defaultdict(list)  # a run whose task is unknown takes both kinds
        for i, request in enumerate(requests):
            by_run[request["run"], request["pairs"] is not None].append(i)
        for (name, _), members in by_run.items():
            classifier = self.classifiers[name]
            rows = []
            for i in members:
                request = requests[i]
                rows += list(zip(request["texts"], request["pairs"])) if request["pairs"] else request["texts"]
            found = classifier.predict(rows, batch_size=self.batch_rows)
            start = 0
            for i in members:
                count = len(requests[i]["texts"])
                answers[i] = [{"label": a["label"], "score": a["probs"][a["label"]], "exit_layer": a["exit_layer"]}
                              for a in found[start:start + count]]
                start += count
            layers = [a["exit_layer"] for a in found]
            metrics.examples.labels(name).inc(len(layers))
            metrics.exit_layers.labels(name).inc(sum(layers))
            metrics.layers.labels(name).inc(len(layers) * classifier.model.num_layers)
            for layer in set(layers):
                metrics.exits.labels(name, str(layer)).inc(layers.count(layer))
        metrics.batch_size.observe(sum(len(r["texts"]) for r in requests))
        metrics.batch_requests.observe(len(requests))
        metrics.batch_seconds.observe(time.perf_counter() - started)
        for kind, value in worker_memory(self.torch_device).items():
            metrics.memory.labels(kind).set(value)
        out = [{"id": r.get("id"), "many": r["many"], "answers": a} for r, a in zip(requests, answers)]
        return out[0] if single else out

    def encode_response(self, output: dict, **kwargs) -> dict:
        return output  # ServeMiddleware unwraps it into the Hugging Face answer
