"""Load test of ``exitrl serve``: Poisson arrivals, open loop, a run's early exits against the full model.

    python benchmarks/serve_load.py runs/sst2/reinforce/<time> --texts ../shared/data/glue/SST-2/dev.tsv \
        --device cuda --loads 50 100 200 400 800 --seconds 20 \
        --out benchmarks/reference/serve_load_h200_<date>.json
    python benchmarks/serve_load.py RUN_DIR --texts ... --device cuda --soak 600 --soak-load 200   # leaks, losses
    python benchmarks/serve_load.py RUN_DIR --texts ... --device cpu --loads 5 10 --seconds 5      # a short check

For each mode (``early_exit``: the run's policy; ``full``: ``exitrl serve --full``, every row through every layer)
it starts ``python -m exitrl serve RUN_DIR`` as a subprocess with the same settings (``--max-batch-size``,
``--batch-timeout``, ``--workers-per-device``, ``--threads``), waits for ``/health``, warms it up with bursts of
concurrent requests, then, for each offered load (``--loads``, requests/s, each for ``--seconds``), sends one
request per row of ``--texts`` (a sentence, or a pair for a pair task; the columns are the run's task's, read by
`exitrl.predict.read_inputs`) at Poisson times: exponential gaps, open loop (a request leaves at its time whether or
not earlier ones were answered), its latency counted from that time. Each request carries an ``X-Request-Id``,
which the server carries through its inference worker and returns on the answer: every id must come back exactly
once (``lost``: never answered; ``duplicated``: answered more than once; ``mismatched``: an answer carrying
another request's id).

Per mode and load: p50/p99 latency, achieved throughput, errors, lost/duplicated/mismatched ids, accuracy against the
file's labels, mean exit layer, the server's mean requests and texts per batch (from its ``/metrics``) and the share
of answers equal to `EarlyExitClassifier.predict` on the same rows in this process (labels and exit layers; on a GPU
in bf16, a row batched with other rows may round differently). Then ``L*``, the highest offered load at which the
full model keeps p99 <= ``--slo-ms`` (100) without errors; early exit's p99 at ``L*`` over the full model's; and the
highest load early exit sustains the same way, over ``L*``. ``--soak SECONDS`` instead runs one mode at
``--soak-load`` and samples the server's memory over time: the RSS of its whole process tree (from /proc) and, on
CUDA, its workers' torch memory (``/metrics``) and ``nvidia-smi``'s per-process memory, start against end.

Prints a table, writes JSON (``--out``; date, machine, torch version, settings, every number) and, when matplotlib
is installed, a PNG of p50/p99 latency against offered load for both modes beside it.

Dependencies: the client is the standard library (asyncio, HTTP/1.1 keep-alive connections); the server needs
exitrl's ``serve`` extra on top of torch and transformers. Wheels, as resolved for ``pip install
litserve==0.2.19 prometheus-client`` on Python 3.11 (2026-12-06); on a machine without internet, ``pip download``
them elsewhere for its Python and platform and ``pip install --no-index --find-links <folder> litserve==0.2.19
prometheus-client``:
litserve 0.2.19, fastapi 0.165.0, starlette 1.10.0, uvicorn 0.55.0 (``uvicorn[standard]``: uvloop 0.23.0,
httptools 0.9.0, websockets 17.4, watchfiles 1.3.0, python-dotenv 1.2.2, pyyaml 6.0.3), pyzmq 27.3.0,
pydantic 2.13.4, pydantic-core 2.46.4, annotated-types 0.7.0, typing-inspection 0.4.2, annotated-doc 0.0.7,
opentelemetry-api 1.45.3, anyio 4.16.0, idna 3.21, h11 0.16.0, click 8.5.1, typing-extensions 4.16.0,
prometheus-client 0.26.0 (several are often present already: pyyaml, idna, typing-extensions, click).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import date
from pathlib import Path

import torch

MODES = ("early_exit", "full")


# -- an HTTP/1.1 client on asyncio streams --------------------------------------------------------------------------
class HttpClient:
    """Keep-alive HTTP/1.1 connections to one server; one request in flight per connection (no pipelining)."""

    def __init__(self, host: str, port: int, max_connections: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections)
        self.open = self.most_open = 0

    async def connect(self):
        connection = await asyncio.open_connection(self.host, self.port)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        return connection

    def close(self, connection) -> None:
        self.open -= 1
        connection[1].close()

    def close_idle(self) -> None:
        while self.idle:
            self.close(self.idle.pop())

    async def exchange(self, connection, method: str, path: str, body: bytes, headers: dict):
        reader, writer = connection
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        head = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            head[key.strip().lower()] = value.strip()
        if "content-length" in head:
            data = await reader.readexactly(int(head["content-length"]))
        elif head.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            data = b"".join(parts)
        else:
            data, head["connection"] = await reader.read(), "close"
        return status, head, data

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                      timeout: float = 60.0):
        """(status, headers, body); a kept-alive connection the server had closed is replaced once."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.slots:
            fresh = not self.idle
            connection = self.idle.pop() if self.idle else await self.connect()
            try:
                result = await asyncio.wait_for(self.exchange(connection, method, path, body, headers), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close(connection)
                if fresh:
                    raise
                connection = await self.connect()
                try:
                    result = await asyncio.wait_for(self.exchange(connection, method, path, body, headers), timeout)
                except BaseException:
                    self.close(connection)
                    raise
            except BaseException:
                self.close(connection)
                raise
            if result[1].get("connection", "").lower() == "close":
                self.close(connection)
            else:
                self.idle.append(connection)
            return result


# -- the server ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    """``python -m exitrl serve`` in its own process group, ready once ``/health`` answers 200."""

    def __init__(self, run_dir: str, mode: str, args, logs: Path):
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "exitrl", "serve", run_dir, "--port", str(self.port),
                        "--device", args.device, "--max-batch-size", str(args.max_batch_size),
                        "--batch-timeout", str(args.batch_timeout), "--workers-per-device",
                        str(args.workers_per_device), "--threads", str(args.threads),
                        "--timeout", str(args.request_timeout), "--api-servers", str(args.api_servers),
                        *(["--full"] if mode == "full" else []), *(["--compile"] if args.compile else []),
                        *(["--late-reads"] if args.late_reads else []),
                        *(["--device-walk"] if args.device_walk else [])]
        self.log = logs / f"server_{mode}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        started = time.time()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            try:
                if get(f"{self.url}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() - started > args.start_timeout:
                self.stop()
                raise RuntimeError(f"no /health after {args.start_timeout} s: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.start_seconds = time.time() - started

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples summed over processes, keyed by name and labels (pid aside)."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(get(f"{self.url}/metrics")[1].decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "pid")
                key = f"{sample.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + sample.value
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def memory_sample(server: Server, started: float) -> dict:
    """The server's process tree's RSS (MiB), and on CUDA its workers' torch memory and nvidia-smi's (MiB)."""
    pids = process_tree(server.process.pid)
    page = os.sysconf("SC_PAGE_SIZE")
    rss = {}
    for pid in pids:
        try:
            rss[pid] = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page / 2**20
        except (OSError, IndexError, ValueError):
            pass
    sample = {"seconds": round(time.time() - started, 1), "rss_mib": round(sum(rss.values()), 1),
              "processes": len(rss)}
    metrics = server.metrics()
    for kind in ("cuda_allocated", "cuda_reserved"):
        found = [v for k, v in metrics.items() if k.startswith("exitrl_worker_memory_bytes") and f"kind={kind}" in k]
        if found:
            sample[f"{kind}_mib"] = round(sum(found) / 2**20, 1)
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        used = [float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                if int(p) in rss]
        if used:
            sample["nvidia_smi_mib"] = sum(used)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return sample


# -- the load -----------------------------------------------------------------------------------------------------
def payload(text) -> bytes:
    inputs = {"text": text[0], "text_pair": text[1]} if isinstance(text, tuple) else text
    return json.dumps({"inputs": inputs}).encode()


async def one_request(client: HttpClient, request_id: str, row: int, body: bytes, due: float, timeout: float) -> dict:
    record = {"id": request_id, "row": row, "due": due}
    record["sent"] = time.perf_counter()
    try:
        status, head, data = await client.request("POST", "/predict", body, {"X-Request-Id": request_id}, timeout)
        record.update(status=status, echo=head.get("x-request-id"))
        if status == 200:
            record["answer"] = json.loads(data)
        else:
            record["error"] = data.decode(errors="replace")[:300]
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as err:
        record.update(status=None, error=f"{type(err).__name__}: {err}")
    record["done"] = time.perf_counter()
    return record


async def open_loop(client: HttpClient, texts: list, order: list[int], load: float, seconds: float, tag: str,
                    rng: random.Random, timeout: float) -> tuple[list[dict], float]:
    """Requests at Poisson times for ``seconds`` at ``load``/s, each sent at its time (open loop)."""
    times, t = [], rng.expovariate(load)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(load)
    tasks = []
    start = time.perf_counter()
    for i, offset in enumerate(times):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        row = order[i % len(order)]
        tasks.append(asyncio.create_task(one_request(client, f"{tag}-{i}", row, payload(texts[row]), start + offset,
                                                     timeout)))
    records = list(await asyncio.gather(*tasks))
    return records, start


async def warm_up(client: HttpClient, texts: list, rounds: int, max_batch: int, timeout: float) -> None:
    """Bursts of 1, 2, 4, ... max_batch concurrent requests (the batch shapes, and CUDA graphs, the load will use)."""
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(2 * sizes[-1], max_batch))
    for _ in range(rounds):
        for size in sizes:
            rows = random.sample(range(len(texts)), min(size, len(texts)))
            await asyncio.gather(*(one_request(client, f"warm-{r}", r, payload(texts[r]), time.perf_counter(),
                                               timeout) for r in rows))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values), max(1, math.ceil(q / 100 * len(values)))) - 1]  # nearest rank


def summarize(records: list[dict], start: float, load: float, seconds: float, gold: list | None, reference: list,
              before: dict, after: dict) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    latencies = [1000 * (r["done"] - r["due"]) for r in ok]
    service = [1000 * (r["done"] - r["sent"]) for r in ok]
    echoes = Counter(r.get("echo") for r in ok)
    sent_ids = [r["id"] for r in records]
    row = {"offered_rps": load, "seconds": seconds, "sent": len(records), "answered": len(ok),
           "errors": len(records) - len(ok),
           "lost": len(set(sent_ids) - set(echoes)),
           "duplicated": sum(count - 1 for echo, count in echoes.items() if echo is not None and count > 1),
           "mismatched": sum(r.get("echo") != r["id"] for r in ok),
           "sent_rps": len(records) / seconds,
           "achieved_rps": len(ok) / max(max((r["done"] for r in ok), default=start) - start, seconds),
           "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
           "max_ms": max(latencies, default=None), "service_p50_ms": percentile(service, 50),
           "service_p99_ms": percentile(service, 99),
           "send_lag_p99_ms": percentile([1000 * (r["sent"] - r["due"]) for r in records], 99)}
    if ok:
        row["mean_exit_layer"] = statistics.fmean(r["answer"]["exit_layer"] for r in ok)
        row["equal_to_predict"] = statistics.fmean(
            r["answer"]["label"] == reference[r["row"]]["label"]
            and r["answer"]["exit_layer"] == reference[r["row"]]["exit_layer"] for r in ok)
        if gold is not None:
            row["accuracy"] = statistics.fmean(r["answer"]["label"] == gold[r["row"]] for r in ok)
    errors = Counter(str(r.get("status")) + ": " + r.get("error", "")[:120] for r in records if r.get("status") != 200)
    if errors:
        row["error_kinds"] = dict(errors.most_common(5))

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = grew("exitrl_batch_requests_count{}")
    if batches:
        row["server_batches"] = int(batches)
        row["server_requests_per_batch"] = grew("exitrl_batch_requests_sum{}") / batches
        row["server_texts_per_batch"] = grew("exitrl_batch_size_sum{}") / batches
        row["server_batch_ms"] = 1000 * grew("exitrl_batch_seconds_sum{}") / batches
    return row


def reference_answers(run_dir: str, texts: list, device: str, full: bool, batch_size: int,
                      options: dict | None = None) -> list[dict]:
    """`EarlyExitClassifier.predict` on every row, in this process (the full model: a static exit at the last
    layer, as ``exitrl serve --full``), with the server's walk ``options`` (its device walk's kernels round
    differently from the eager layers, so a row at a threshold may go either way between them)."""
    from exitrl.agents.static import StaticPolicy
    from exitrl.runtime.classifier import EarlyExitClassifier

    options = options or {}
    classifier = EarlyExitClassifier.from_run(run_dir, device, **options)
    if full:
        classifier = EarlyExitClassifier(classifier.model, classifier.tokenizer,
                                         StaticPolicy(classifier.model.num_layers), classifier.label_names,
                                         classifier.max_length, classifier.device, **options)
    answers = classifier.predict(texts, batch_size=batch_size)
    del classifier
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


async def run_mode(server: Server, texts: list, gold, reference: list, args, mode: str) -> list[dict]:
    client = HttpClient("127.0.0.1", server.port, args.max_connections)
    await warm_up(client, texts, args.warmup, args.max_batch_size, args.request_timeout + 30)
    rows = []
    rng = random.Random(args.seed)
    for load in args.loads:
        order = list(range(len(texts)))
        rng.shuffle(order)
        client.close_idle()
        before = server.metrics()
        records, start = await open_loop(client, texts, order, load, args.seconds, f"{mode}-{load:g}", rng,
                                         args.request_timeout + 30)
        row = summarize(records, start, load, args.seconds, gold, reference, before, server.metrics())
        row["mode"] = mode
        rows.append(row)
        print(line(row), flush=True)
        await asyncio.sleep(args.pause)
    client.close_idle()
    return rows


async def soak(server: Server, texts: list, gold, reference: list, args, mode: str) -> dict:
    client = HttpClient("127.0.0.1", server.port, args.max_connections)
    await warm_up(client, texts, args.warmup, args.max_batch_size, args.request_timeout + 30)
    started = time.time()
    samples = [memory_sample(server, started)]
    every = args.sample_seconds or max(1.0, args.soak / 20)

    async def sampler():
        while True:
            await asyncio.sleep(every)
            samples.append(memory_sample(server, started))
            print(f"  {samples[-1]}", flush=True)

    rng = random.Random(args.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    before = server.metrics()
    watch = asyncio.create_task(sampler())
    records, start = await open_loop(client, texts, order, args.soak_load, args.soak, f"soak-{mode}", rng,
                                     args.request_timeout + 30)
    watch.cancel()
    samples.append(memory_sample(server, started))
    client.close_idle()
    row = summarize(records, start, args.soak_load, args.soak, gold, reference, before, server.metrics())
    row["mode"] = mode
    first, last = samples[0], samples[-1]
    row["memory"] = {"samples": samples, "rss_start_mib": first["rss_mib"], "rss_end_mib": last["rss_mib"],
                     "rss_max_mib": max(s["rss_mib"] for s in samples),
                     "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1)}
    for key in ("cuda_allocated_mib", "cuda_reserved_mib", "nvidia_smi_mib"):
        if key in first and key in last:
            row["memory"][key.replace("_mib", "_start_mib")] = first[key]
            row["memory"][key.replace("_mib", "_end_mib")] = last[key]
    return row


# -- the report ---------------------------------------------------------------------------------------------------
HEADER = (f"{'mode':<11}{'load/s':>8}{'sent':>7}{'ok':>7}{'err':>5}{'lost':>5}{'dup':>5}{'ach/s':>8}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'acc':>7}{'exit':>6}{'=pred':>7}{'req/b':>7}{'txt/b':>7}")


def fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def line(row: dict) -> str:
    return (f"{row['mode']:<11}{row['offered_rps']:>8g}{row['sent']:>7}{row['answered']:>7}{row['errors']:>5}"
            f"{row['lost']:>5}{row['duplicated'] + row['mismatched']:>5}{row['achieved_rps']:>8.1f}"
            f"{fmt(row['p50_ms'], '9.1f')}{fmt(row['p99_ms'], '9.1f')}{fmt(row.get('accuracy'), '7.3f')}"
            f"{fmt(row.get('mean_exit_layer'), '6.2f')}{fmt(row.get('equal_to_predict'), '7.3f')}"
            f"{fmt(row.get('server_requests_per_batch'), '7.2f')}{fmt(row.get('server_texts_per_batch'), '7.2f')}")


def sustained(rows: list[dict], slo_ms: float) -> list[float]:
    return [r["offered_rps"] for r in rows if r["p99_ms"] is not None and r["p99_ms"] <= slo_ms
            and r["errors"] == 0 and r["lost"] == 0]


def summary(results: dict, slo_ms: float) -> dict:
    full, early = results.get("full", []), results.get("early_exit", [])
    out = {"slo_p99_ms": slo_ms, "full_sustained_rps": sustained(full, slo_ms),
           "early_exit_sustained_rps": sustained(early, slo_ms)}
    star = max(out["full_sustained_rps"], default=None)
    out["L_star_rps"] = star
    if star is not None:
        at = {r["mode"]: r for r in (*full, *early) if r["offered_rps"] == star}
        if "early_exit" in at and at["early_exit"]["p99_ms"] is not None:
            out["early_over_full_p99_at_L_star"] = at["early_exit"]["p99_ms"] / at["full"]["p99_ms"]
        best = max(out["early_exit_sustained_rps"], default=None)
        out["early_exit_max_sustained_rps"] = best
        out["early_exit_max_over_L_star"] = best / star if best is not None else None
    return out


def machine() -> str:
    """A short machine token for file names: the GPU's model (h100, h200, a100, ...), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    found = re.search(r"\b([a-z]\d{1,4})\b", name)
    return found.group(1) if found else re.sub(r"\W+", "_", name).strip("_")


def plot(record: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = {"early_exit": "tab:green", "full": "tab:blue"}
    for mode, rows in record["results"].items():
        rows = [r for r in rows if r["p99_ms"] is not None]
        loads = [r["offered_rps"] for r in rows]
        axes.plot(loads, [r["p99_ms"] for r in rows], "o-", color=colors.get(mode), label=f"{mode} p99")
        axes.plot(loads, [r["p50_ms"] for r in rows], "s--", color=colors.get(mode), alpha=0.6, label=f"{mode} p50")
    axes.axhline(record["summary"]["slo_p99_ms"], color="gray", lw=0.8, ls=":", label="p99 target")
    axes.set_xlabel("offered load (requests/s, Poisson)")
    axes.set_ylabel("latency (ms, from the scheduled send)")
    axes.set_yscale("log")
    axes.set_title(f"exitrl serve, {record['run']['task']} ({record['machine']}, {record['date']})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a trained run folder (exitrl train)")
    parser.add_argument("--texts", required=True, help="a TSV/CSV/JSONL with the run's task's columns (a dev file)")
    parser.add_argument("--text-columns", nargs="+", help="the --texts columns (default: the run's task's)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N rows")
    parser.add_argument("--loads", nargs="+", type=float, default=[50, 100, 200], help="offered loads, requests/s")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--slo-ms", type=float, default=100.0, help="the p99 latency target")
    parser.add_argument("--device", default="auto", help="the server's --device: auto | cpu | cuda")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--api-servers", type=int, default=1, help="the server's HTTP processes")
    parser.add_argument("--compile", action="store_true", help="the server's --compile (both modes)")
    parser.add_argument("--late-reads", action="store_true", help="the server's --late-reads")
    parser.add_argument("--device-walk", action="store_true", help="the server's --device-walk")
    parser.add_argument("--threads", default="auto", help="the server's --threads")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="the server's --timeout")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds of warm-up bursts before measuring")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between loads")
    parser.add_argument("--max-connections", type=int, default=4096)
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="instead of the loads: one mode (--soak-mode) at --soak-load for SECONDS, memory sampled")
    parser.add_argument("--soak-load", type=float, default=None, help="requests/s (default: the first --loads)")
    parser.add_argument("--soak-mode", choices=MODES, default="early_exit")
    parser.add_argument("--sample-seconds", type=float, default=None, help="memory sample period (soak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/reference/serve_load_<machine>_<date>.json)")
    args = parser.parse_args()
    if any(load <= 0 for load in args.loads) or args.seconds <= 0:
        parser.error("--loads and --seconds must be > 0")
    args.soak_load = args.soak_load or args.loads[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * args.max_connections + 256)), hard))

    from exitrl.core.device import pick_device
    from exitrl.predict import read_inputs, run_task

    run_dir = str(Path(args.run_dir).resolve())
    task = run_task(Path(run_dir))
    inputs = read_inputs(args.texts, task, args.text_columns, limit=args.limit)
    texts = [tuple(t) if isinstance(t, tuple | list) else t for t in inputs.texts]
    device = pick_device(args.device).type
    out = Path(args.out or f"benchmarks/reference/serve_load_{machine() if device == 'cuda' else 'cpu'}_"
                           f"{date.today().isoformat()}.json")
    modes = [args.soak_mode] if args.soak else args.modes
    walk = {"device_walk": args.device_walk, "compile_decisions": args.compile, "compile_layers": args.compile,
            "late_reads": args.late_reads}  # what the server's classifiers take (`exitrl serve`)
    references = {mode: reference_answers(run_dir, texts, device, mode == "full", args.max_batch_size, walk)
                  for mode in modes}
    names = task.label_names
    gold = [names[i] for i in inputs.labels] if inputs.labels is not None and names else None
    print(f"{len(texts)} rows of {args.texts} ({task.name}); device {device}; modes {', '.join(modes)}")
    logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
    record = {"date": date.today().isoformat(), "machine": machine() if device == "cuda" else "cpu",
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(),
              "litserve": _version("litserve"), "device": device,
              "run": {"dir": run_dir, "task": task.name, "rows": len(texts), "texts": str(args.texts)},
              "settings": {k: v for k, v in vars(args).items() if k not in ("run_dir", "out")}, "results": {}}
    if args.soak is None:
        print(HEADER)
    for mode in modes:
        server = Server(run_dir, mode, args, logs)
        try:
            record["settings"].setdefault("server_commands", {})[mode] = " ".join(server.command)
            record.setdefault("server_start_seconds", {})[mode] = round(server.start_seconds, 1)
            reference = references[mode]
            if args.soak is not None:
                row = asyncio.run(soak(server, texts, gold, reference, args, mode))
                record["soak"] = row
                print(HEADER)
                print(line(row))
                memory = row["memory"]
                print(f"soak {args.soak:g} s at {args.soak_load:g}/s: lost {row['lost']}, duplicated "
                      f"{row['duplicated']}, mismatched {row['mismatched']}, errors {row['errors']}; server RSS "
                      f"{memory['rss_start_mib']:.0f} -> {memory['rss_end_mib']:.0f} MiB (max "
                      f"{memory['rss_max_mib']:.0f})"
                      + (f"; CUDA allocated {memory['cuda_allocated_start_mib']:.0f} -> "
                         f"{memory['cuda_allocated_end_mib']:.0f} MiB" if "cuda_allocated_start_mib" in memory
                         else ""))
            else:
                record["results"][mode] = asyncio.run(run_mode(server, texts, gold, reference, args, mode))
        finally:
            server.stop()
    if args.soak is None:
        record["summary"] = summary(record["results"], args.slo_ms)
        s = record["summary"]
        print(f"L* (highest load the full model serves with p99 <= {args.slo_ms:g} ms, no errors): "
              f"{fmt(s['L_star_rps'], 'g')}/s; early exit's p99 at L* over the full model's: "
              f"{fmt(s.get('early_over_full_p99_at_L_star'), '.3f')}; highest load early exit sustains: "
              f"{fmt(s.get('early_exit_max_sustained_rps'), 'g')}/s, over L*: "
              f"{fmt(s.get('early_exit_max_over_L_star'), '.2f')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out} (server logs in {logs})")
    if args.soak is None:
        plot(record, out.with_suffix(".png"))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
