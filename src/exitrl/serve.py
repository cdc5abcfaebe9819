"""``python -m exitrl.serve RUN_DIR [RUN_DIR ...]``: an HTTP endpoint for trained runs, on LitServe. Each request's
texts walk up the layers with the run's exit policy (`exitrl.runtime.classifier.EarlyExitClassifier`), batched with
the requests of other clients (LitServe's dynamic batching: ``--max-batch-size`` requests, waiting at most
``--batch-timeout`` seconds for them). ``--full`` serves the same runs without exits (every row runs every layer).

Routes: ``POST /predict`` (Hugging Face's text-classification format: `exitrl.serving.requests` says what a request
and its answer hold, and which bad requests get which 4xx), ``GET /health`` (200 ``ok`` once every worker has
loaded its runs, 503 before) and ``GET /metrics`` (Prometheus text format, summed over every process:
`exitrl.serving.metrics` lists the series). Requests are checked in the HTTP process before they reach a worker
(the LitServe API of `exitrl.serving.api`), so one bad request never fails a batch.

The command line is checked (run folders, backbones, policies, the port, the values) before any model loads: a bad
value is one line and status 2; Ctrl-C stops every process with one line and status 130 (SIGTERM: 143). Binds to
127.0.0.1 unless ``--host`` says otherwise. Several GPUs: LitServe starts ``--workers-per-device`` workers on each
visible GPU (choose them with ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exitrl.cli import USER_ERRORS, add_threads_option, fail, interrupted, warn_if_busy
from exitrl.serving.api import ExitAPI, die_with_parent
from exitrl.serving.metrics import METRICS_DIR_ENV, metrics_text
from exitrl.serving.requests import PREDICT_PATH, ServeMiddleware
from exitrl.serving.runs import ServedRun

try:  # `exitrl serve --help` works without the serve extra; serving itself says what to install
    import litserve as ls
except ImportError:  # pragma: no cover - exercised only without the extra
    ls = None

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to; "localhost" means 127.0.0.1
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


# -- the served runs, checked without loading a model ---------------------------------------------------------------
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
    api_servers: int = 1
    runtime: dict = field(default_factory=dict)  # the fast path's options (`EarlyExitClassifier`): compile, reads

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
                             ("--max-chars", args.max_chars, 1), ("--workers-per-device", args.workers_per_device, 1),
                             ("--api-servers", args.api_servers, 1)):
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
                       args.timeout, args.log_level, args.api_servers,
                       {"compile_decisions": args.compile, "compile_layers": args.compile,
                        "late_reads": args.late_reads, "device_walk": args.device_walk})


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


def forked_child() -> None:
    """In each process the main process forks (LitServe's API servers and manager): default SIGTERM (stop), no
    SIGINT (uvicorn catches it while serving and raises it again after its clean stop; the main process stops the
    rest), and SIGTERM when the main process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


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
                  f"{config.url}{PREDICT_PATH}", config.max_batch_size, config.batch_timeout, config.runtime)
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
        server.run(host=config.host, port=config.port, log_level=config.log_level, generate_client_file=False,
                   num_api_servers=config.api_servers)
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


def arguments() -> argparse.ArgumentParser:
    """The command line of ``exitrl serve``."""
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
    parse.add_argument("--api-servers", type=int, default=1,
                       help="HTTP server processes in front of the workers (default 1); more when one process's "
                            "request handling, not the model, bounds throughput")
    parse.add_argument("--timeout", type=float, default=30.0,
                       help="seconds a request may wait for a worker before it is answered 504 (default 30)")
    parse.add_argument("--compile", action="store_true",
                       help="the GPU fast path's layers and decisions through torch.compile (fewer kernels; each "
                            "worker warms up for minutes before it says it is ready); --full compiles its layers")
    parse.add_argument("--late-reads", action="store_true",
                       help="read each layer's alive count once the next layer is queued (one layer runs on rows "
                            "that had already left; measured slower on an H100)")
    # the runtime's DEVICE_WALKS, named here so --help needs no torch (tests/test_counted_layers.py keeps them equal)
    parse.add_argument("--device-walk", nargs="?", const=True, default=False, choices=["counted", "buckets"],
                       help="walk each batch as one CUDA graph, no host read per layer: counted (Triton kernels "
                            "that skip rows that left; BERT-style layers), buckets (conditional launches; torch "
                            "2.13), or with no value the one that runs here")
    parse.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="LitServe's and uvicorn's logs")
    add_threads_option(parse, "backbone")
    return parse


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(sys.argv[1:] if argv is None else argv)
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
    from exitrl.serve import main as serve_main  # the importable module, as `exitrl serve` runs it

    serve_main()
