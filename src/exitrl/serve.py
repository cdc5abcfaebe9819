"""``python -m exitrl.serve RUN_DIR [RUN_DIR ...]``: an HTTP endpoint for trained runs, on LitServe. Each request's
texts walk up the layers with the run's exit policy (`exitrl.runtime.classifier.EarlyExitClassifier`), batched with
the requests of other clients (LitServe's dynamic batching: ``--max-batch-size`` requests, waiting at most
``--batch-timeout`` seconds for them). ``--full`` serves the same runs without exits (every row runs every layer).

Routes: ``POST /predict`` (Hugging Face's text-classification format, below), ``GET /health`` (200 ``ok`` once every
worker has loaded its runs, 503 before) and ``GET /metrics`` (Prometheus text format).

Request: ``{"inputs": "a text"}``, ``{"inputs": ["a", "b"]}``, a pair ``{"inputs": {"text": "...", "text_pair":
"..."}}`` or a list of pairs; optional ``"run": "<name>"`` (a run is named by its folder's name; the first run is the
default). Answer: ``{"label": ..., "score": <probability of that label>, "exit_layer": <1..L>}`` per input, a list
when the inputs were a list. An ``X-Request-Id`` header comes back on its answer, carried through the inference
worker with the answer, so a client can check that each answer is its own. Bad input answers 4xx with
``{"detail": "<what to fix>"}`` and the server goes on: 400 (not JSON, not an object), 404 (unknown run: the detail
names the served runs), 413 (more than ``--max-texts-per-request`` texts, a text over ``--max-chars`` characters),
422 (no ``"inputs"``, a wrong type, an empty list, single texts for a pair run or pairs for a single-text run).
Requests are checked in the HTTP process before they reach a worker, so one bad request never fails a batch.

Metrics across processes: LitServe answers HTTP in API-server processes (forked from the main process) and runs the
model in inference-worker processes (spawned), so no one process sees every number. The server uses
prometheus_client's multiprocess mode: the main process creates a private folder and points
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

The command line is checked (run folders, backbones, policies, the port, the values) before any model loads: a bad
value is one line and status 2; Ctrl-C stops every process with one line and status 130 (SIGTERM: 143). Binds to
127.0.0.1 unless ``--host`` says otherwise. Several GPUs: LitServe starts ``--workers-per-device`` workers on each
visible GPU (choose them with ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from exitrl.cli import USER_ERRORS, add_threads_option, fail, interrupted, warn_if_busy

try:  # `exitrl serve --help` works without the serve extra; serving itself says what to install
    import litserve as ls
except ImportError:  # pragma: no cover - exercised only without the extra
    ls = None

PREDICT_PATH = "/predict"
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to; "localhost" means 127.0.0.1
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
REQUEST_ID_HEADER = b"x-request-id"
EXAMPLE = '{"inputs": "a text"}'
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


# -- the served runs, checked without loading a model ---------------------------------------------------------------
@dataclass
class ServedRun:
    """One run as the server names and checks it: its folder's name, whether it classifies text pairs (None when
    its task does not say), its task, policy and depth."""

    name: str
    dir: str
    pairs: bool | None
    task: str
    policy: str
    num_layers: int

    @property
    def inputs(self) -> str:
        return {True: "text pairs", False: "single texts", None: "texts"}[self.pairs]


def served_run(run_dir: str | Path, full: bool = False) -> ServedRun:
    """Check one run folder as the server will load it (a run, its backbone present, a deployable policy) without
    loading the backbone; a problem is a ValueError that says what to do."""
    from exitrl.experiments.runs import Run
    from exitrl.predict import run_task

    path = Path(run_dir)
    if not path.exists():
        raise ValueError(f"{run_dir}: no such folder; give the folder of a trained run (exitrl train writes "
                         "runs/<task>/<agent>/<time>/).")
    if not path.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder; give the folder exitrl train wrote.")
    run = Run.load(path)
    run.backbone_path()
    policy = run.policy
    if not policy.deployable:
        raise ValueError(f"{run_dir}: the {policy.name} policy is analysis only (it reads answers it cannot have at "
                         "inference); serve a run of a deployable agent or rule.")
    task = run_task(path)
    pairs = None if not task.text_columns else len(task.text_columns) == 2
    name = path.resolve().name
    return ServedRun(name, str(path.resolve()), pairs, task.name, "static (full model)" if full else policy.name,
                     int(run.record.num_layers))


# -- requests ----------------------------------------------------------------------------------------------------
class RequestError(Exception):
    """A request the server refuses: its HTTP status and what the client should fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"), (list, "list"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def parse_request(body: bytes, runs: dict[str, ServedRun], default: str, max_texts: int, max_chars: int) -> dict:
    """A request body checked and put in the form the workers take: ``{"run", "texts", "pairs" (None for single
    texts), "many" (the inputs were a list)}``; a bad body is a `RequestError` naming what to fix."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the request body is not JSON ({err}); send a JSON object such as "
                                f"{EXAMPLE}.") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object such as {EXAMPLE}; got a {json_type(data)}.")
    unknown = sorted(set(data) - {"inputs", "run"})
    if unknown:
        raise RequestError(422, f"unknown key(s) {', '.join(map(repr, unknown))}: a request takes \"inputs\" and, "
                                "optionally, \"run\".")
    if "inputs" not in data:
        raise RequestError(422, 'missing "inputs": send {"inputs": "a text"}, a list of texts, or '
                                '{"inputs": {"text": "...", "text_pair": "..."}} for a pair.')
    name = data.get("run", default)
    if not isinstance(name, str):
        raise RequestError(422, f'"run" must be a string naming a served run ({", ".join(runs)}); '
                                f"got a {json_type(name)}.")
    if name not in runs:
        raise RequestError(404, f"unknown run {name!r}; this server serves: {', '.join(runs)}.")
    inputs = data["inputs"]
    many = isinstance(inputs, list)
    items = inputs if many else [inputs]
    if not items:
        raise RequestError(422, '"inputs" is an empty list: send at least one text.')
    if len(items) > max_texts:
        raise RequestError(413, f'"inputs" holds {len(items)} texts, more than this server takes in one request '
                                f"({max_texts}, --max-texts-per-request): split them over several requests.")
    texts, pairs = [], []
    for i, item in enumerate(items):
        where = f'"inputs"[{i}]' if many else '"inputs"'
        if isinstance(item, str):
            text, pair = item, None
        elif isinstance(item, dict):
            keys = set(item)
            if "text" not in keys or keys - {"text", "text_pair"}:
                raise RequestError(422, f'{where} must be a text, or {{"text": "...", "text_pair": "..."}} for a '
                                        f"pair; got an object with keys {sorted(keys)}.")
            text, pair = item["text"], item.get("text_pair")
            for key, value in (("text", text), ("text_pair", pair)):
                if value is not None and not isinstance(value, str):
                    raise RequestError(422, f'{where}["{key}"] must be a string; got a {json_type(value)}.')
        else:
            what = "a list of texts (no nested lists)" if many else "a text, a list of texts"
            raise RequestError(422, f'{where} must be {what}, or {{"text": "...", "text_pair": "..."}}; got a '
                                    f"{json_type(item)}.")
        for key, value in (("", text), ('["text_pair"]', pair)):
            if value is not None and len(value) > max_chars:
                raise RequestError(413, f"{where}{key} has {len(value)} characters, more than this server takes "
                                        f"({max_chars}, --max-chars): shorten it.")
        texts.append(text)
        pairs.append(pair)
    if len({p is None for p in pairs}) > 1:
        raise RequestError(422, '"inputs" mixes single texts and pairs: send one kind per request.')
    is_pair = pairs[0] is not None
    run = runs[name]
    if run.pairs is True and not is_pair:
        raise RequestError(422, f"run {name!r} ({run.task}) classifies text pairs: send "
                                '{"inputs": {"text": "...", "text_pair": "..."}} or a list of such objects.')
    if run.pairs is False and is_pair:
        raise RequestError(422, f"run {name!r} ({run.task}) classifies single texts: send \"inputs\" as a text or "
                                'a list of texts, without "text_pair".')
    return {"run": name, "texts": texts, "pairs": pairs if is_pair else None, "many": many}


# -- metrics: one set per process, summed over processes at each scrape (the module docstring says how) -----------
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

    def collect(self):
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


# -- the HTTP side: every /predict request checked (and counted) before LitServe queues it for a worker -----------
async def send_json(send, status: int, content, headers: list | None = None) -> None:
    body = json.dumps(content, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServeMiddleware:
    """ASGI middleware on ``POST /predict``: reads and checks the body (`parse_request`; a bad one is answered
    here, 4xx), hands LitServe the checked form, turns the worker's envelope back into the Hugging Face answer with
    the request's ``X-Request-Id``, and counts the request and its latency."""

    def __init__(self, app, runs: dict[str, ServedRun], default: str, max_texts: int, max_chars: int):
        self.app, self.runs, self.default = app, runs, default
        self.max_texts, self.max_chars = max_texts, max_chars
        self.max_bytes = max_texts * (2 * 6 * max_chars + 64) + 4096  # every character as a \uXXXX escape, and room

    async def read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client disconnected before sending the whole body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestError(413, f"the request body is over {self.max_bytes} bytes: send at most "
                                        f"{self.max_texts} texts (--max-texts-per-request) of at most "
                                        f"{self.max_chars} characters (--max-chars) per request.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        try:
            request_id = dict(scope["headers"]).get(REQUEST_ID_HEADER)
            try:
                request = parse_request(await self.read_body(receive), self.runs, self.default, self.max_texts,
                                        self.max_chars)
            except RequestError as err:
                status[0] = err.status
                await send_json(send, err.status, {"detail": err.message})
                return
            request["id"] = request_id.decode("latin-1") if request_id is not None else None
            await self.forward(scope, receive, send, request, status)
        finally:
            metrics = process_metrics()
            label = status_class(status[0])
            metrics.requests.labels(label).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def forward(self, scope, receive, send, request: dict, status: list) -> None:
        payload = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length",
                                                                    b"transfer-encoding")]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json"),
                                      (b"content-length", str(len(payload)).encode())]}
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        start, chunks = {}, []

        async def answer(message):
            if message["type"] == "http.response.start":
                start.update(message)
                status[0] = message["status"]
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            envelope = None
            if start["status"] == 200:
                try:
                    envelope = json.loads(body)
                except ValueError:
                    envelope = None
            if isinstance(envelope, dict) and "answers" in envelope and "many" in envelope:
                extra = [(b"x-request-id", envelope["id"].encode("latin-1"))] if envelope.get("id") else []
                await send_json(send, 200, envelope["answers"] if envelope["many"] else envelope["answers"][0], extra)
                return
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, replay, answer)


# -- the inference workers ----------------------------------------------------------------------------------------
def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent dies, so a killed server leaves no
    workers behind; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def forked_child() -> None:
    """In each process the main process forks (LitServe's API servers and manager): default SIGTERM (stop), no
    SIGINT (uvicorn catches it while serving and raises it again after its clean stop; the main process stops the
    rest), and SIGTERM when the main process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def worker_memory(device) -> dict[str, int]:
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


class ExitAPI(ls.LitAPI if ls is not None else object):
    """The LitServe API of the served runs: each worker loads every run (``setup``); ``predict`` gets a batch of
    checked requests (from `parse_request`), groups their texts by run and classifies each run's texts in one
    `EarlyExitClassifier.predict` call, then splits the answers back per request."""

    def __init__(self, runs: list[dict], full: bool, threads, workers: int, url: str, max_batch_size: int,
                 batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.runs, self.full, self.threads, self.workers, self.url = runs, full, threads, workers, url
        self.batch_rows = max_batch_size  # rows per forward pass, whatever the requests hold

    def setup(self, device) -> None:
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
            classifier = EarlyExitClassifier.from_run(run["dir"], str(device))
            if self.full:
                classifier = EarlyExitClassifier(classifier.model, classifier.tokenizer,
                                                 StaticPolicy(classifier.model.num_layers), classifier.label_names,
                                                 classifier.max_length, classifier.device)
            self.warm_up(classifier, run["pairs"], str(device).startswith("cuda"))
            self.classifiers[run["name"]] = classifier
        self.torch_device = torch.device(str(device))
        process_metrics()
        names = ", ".join(f"{r['name']} ({r['policy']})" for r in self.runs)
        print(f"exitrl: worker {os.environ.get('LITSERVE_WORKER_ID', '0')} ready on {device} "
              f"({torch.get_num_threads()} threads): {names}; {self.url}", flush=True)

    def warm_up(self, classifier, pairs: bool | None, cuda: bool) -> None:
        """First-call costs before the worker says it is ready: on CUDA, the fast path's graphs for short texts at
        every power-of-two batch size up to the largest (other shapes are captured when they first come)."""
        sizes = [1]
        while cuda and sizes[-1] < self.batch_rows:
            sizes.append(min(2 * sizes[-1], self.batch_rows))
        for size in sizes:
            classifier.predict([("warm up", "warm up") if pairs else "warm up"] * size, batch_size=self.batch_rows)

    def decode_request(self, request, **kwargs):
        return request  # checked and normalised by ServeMiddleware in the HTTP process

    def predict(self, batch, **kwargs):
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

    def encode_response(self, output, **kwargs):
        return output  # ServeMiddleware unwraps it into the Hugging Face answer


# -- the command line ---------------------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    runs: list[ServedRun]
    host: str
    port: int
    device: str  # cpu | cuda
    max_batch_size: int
    batch_timeout: float
    max_texts: int
    max_chars: int
    full: bool
    workers_per_device: int
    threads: int | str
    timeout: float
    log_level: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err}); pick a free "
                             "port with --port.") from None


def check_config(args: argparse.Namespace) -> ServeConfig:
    """Every command-line value checked, and every run folder, before any model loads (ValueError: one line)."""
    missing = [name for name in ("litserve", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing or ls is None:
        raise ValueError(f"exitrl serve needs {' and '.join(missing or ['litserve'])}: "
                         "pip install 'exitrl[serve]' (LitServe 0.2.19 and prometheus-client).")
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1),
                             ("--max-texts-per-request", args.max_texts_per_request, 1),
                             ("--max-chars", args.max_chars, 1), ("--workers-per-device", args.workers_per_device, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}.")
    if not 0 < args.timeout:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}.")
    if not 0 <= args.batch_timeout < args.timeout:
        raise ValueError(f"--batch-timeout must be >= 0 and below --timeout ({args.timeout} s), got "
                         f"{args.batch_timeout}.")
    host = "127.0.0.1" if args.host == "localhost" else args.host
    if host not in HOSTS:
        raise ValueError(f"--host must be one of {', '.join(HOSTS)} or localhost (LitServe binds to these); got "
                         f"{args.host!r}.")
    if not 1024 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1024 and 65535, got {args.port}.")
    if args.device not in DEVICES:
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r} (choose GPUs with "
                         "CUDA_VISIBLE_DEVICES).")
    from exitrl.core.device import pick_device

    device = pick_device(args.device).type
    runs = [served_run(run_dir, args.full) for run_dir in args.run_dirs]
    seen: dict[str, str] = {}
    for run in runs:
        if run.name in seen:
            raise ValueError(f"two runs are named {run.name!r} ({seen[run.name]} and {run.dir}); a run is named by "
                             "its folder: serve runs from folders with different names.")
        seen[run.name] = run.dir
    check_port(host, args.port)
    return ServeConfig(runs, host, args.port, device, args.max_batch_size, args.batch_timeout,
                       args.max_texts_per_request, args.max_chars, args.full, args.workers_per_device, args.threads,
                       args.timeout, args.log_level)


_main_pid: list[int] = []
_stopped: list[int] = []


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C or SIGTERM in the main process: LitServe's shutdown stops every process."""
    if not _main_pid or os.getpid() != _main_pid[0]:
        return
    _stopped.append(signum)
    raise KeyboardInterrupt


def stop_processes(server) -> None:
    """After a failed or interrupted start: stop the workers LitServe started and its manager process."""
    for process in getattr(server, "inference_workers", []) or []:
        if process.is_alive():
            process.terminate()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    manager = getattr(getattr(server, "transport_config", None), "manager", None)
    if manager is not None:
        try:
            manager.shutdown()
        except Exception:  # noqa: BLE001 - already gone
            pass


def serve(config: ServeConfig) -> int:
    """Start LitServe with the checked ``config`` and block until it stops; returns the signal that stopped it
    (0 when it stopped on its own)."""
    metrics_dir = tempfile.mkdtemp(prefix="exitrl-serve-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        return _serve(config, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(config: ServeConfig, metrics_dir: str) -> int:
    from fastapi import Response

    runs = {run.name: run for run in config.runs}
    api = ExitAPI([asdict(run) for run in config.runs], config.full, config.threads, config.workers_per_device,
                  f"{config.url}{PREDICT_PATH}", config.max_batch_size, config.batch_timeout)
    middleware = (ServeMiddleware, {"runs": runs, "default": config.runs[0].name, "max_texts": config.max_texts,
                                    "max_chars": config.max_chars})
    server = ls.LitServer(api, accelerator=config.device, devices="auto" if config.device == "cuda" else 1,
                          workers_per_device=config.workers_per_device, timeout=config.timeout,
                          middlewares=[middleware], model_metadata={"runs": [asdict(r) for r in config.runs]})

    async def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics_text(metrics_dir, config.runs), media_type=CONTENT_TYPE_LATEST)

    server.app.add_api_route("/metrics", metrics_route, methods=["GET"])
    _main_pid[:] = [os.getpid()]
    # the workers stop by SIGTERM, so multiprocessing's resource tracker (which inherits this environment) removes
    # what they held and would say so in a warning at each stop: nothing is left behind, so no warning
    quiet = "ignore:resource_tracker:UserWarning"
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)
    os.register_at_fork(after_in_child=forked_child)  # the API servers and LitServe's manager
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    names = ", ".join(f"{r.name} ({r.task}, {r.inputs}, {r.policy}, {r.num_layers} layers)" for r in config.runs)
    print(f"exitrl: loading {names} on {config.device} ({config.workers_per_device} worker(s) per device); "
          f"POST {config.url}{PREDICT_PATH} answers once GET {config.url}/health says ok "
          f"(metrics: {config.url}/metrics)", flush=True)
    try:
        server.run(host=config.host, port=config.port, log_level=config.log_level, generate_client_file=False)
    except KeyboardInterrupt:  # while the workers were loading, before LitServe's own shutdown covers them
        stop_processes(server)
        _stopped.append(_stopped[-1] if _stopped else signal.SIGINT)
    except RuntimeError as err:
        stop_processes(server)
        if "workers failed to start" in str(err):
            raise ValueError("a worker could not load the runs (its error is above); the server did not "
                             "start.") from None
        raise
    return _stopped[0] if _stopped else 0


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(prog="python -m exitrl.serve", description=__doc__.split("\n\n")[0])
    parse.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                       help="folders written by exitrl.train, each named by its folder name (the first is the default)")
    parse.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parse.add_argument("--port", type=int, default=8000, help="1024..65535 (default 8000)")
    parse.add_argument("--device", default="auto", help="auto | cpu | cuda (every visible GPU)")
    parse.add_argument("--max-batch-size", type=int, default=64,
                       help="requests batched into one model call, and rows per forward pass (default 64)")
    parse.add_argument("--batch-timeout", type=float, default=0.005,
                       help="seconds a worker waits for more requests to fill a batch (default 0.005)")
    parse.add_argument("--max-texts-per-request", type=int, default=64, help="texts in one request (default 64)")
    parse.add_argument("--max-chars", type=int, default=10000, help="characters per text (default 10000)")
    parse.add_argument("--full", action="store_true",
                       help="serve the full model: every row runs every layer (the runs' policies are not used)")
    parse.add_argument("--workers-per-device", type=int, default=1,
                       help="inference processes per GPU (or on the CPU), each with every run loaded")
    parse.add_argument("--timeout", type=float, default=30.0,
                       help="seconds a request may wait for a worker before it is answered 504 (default 30)")
    parse.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="LitServe's and uvicorn's logs")
    add_threads_option(parse, "backbone")
    args = parse.parse_args(sys.argv[1:] if argv is None else argv)
    warn_if_busy(args.threads)
    try:
        config = check_config(args)
    except USER_ERRORS as err:
        fail(err, "exitrl.serve")
    except KeyboardInterrupt:
        interrupted("nothing was started", "exitrl.serve")
    try:
        stopped = serve(config)
    except USER_ERRORS as err:
        fail(err, "exitrl.serve")
    if stopped == signal.SIGTERM:
        print("exitrl: stopped (SIGTERM)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)
    if stopped:
        interrupted("the server stopped", "exitrl.serve")


if __name__ == "__main__":
    from exitrl.serve import main as serve_main  # the importable module's classes, which the workers unpickle

    serve_main()
