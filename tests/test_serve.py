"""``python -m exitrl.serve`` as a real server process (on the CPU, a free localhost port) on runs of a tiny backbone,
answering real HTTP requests: answers equal `EarlyExitClassifier.predict` on the same rows, concurrent requests are
batched (the batch metrics say so), every bad request gets its 4xx and the server goes on, ``/health`` and
``/metrics`` work, Ctrl-C stops every process with one line; and the command line's errors, before any model loads.

The single-text run is the pair run's folder copied with its task set to SST-2: the same backbone and policy, so no
second training, and a run the server must treat as one that classifies single texts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import TESTS, run_cli

from exitrl.data import read_texts
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.serve import arguments, check_config, main

pytestmark = pytest.mark.xdist_group("serve")  # one server for the module: its tests stay on one worker

MAX_TEXTS, MAX_CHARS = 8, 2000


@pytest.fixture(scope="module")
def runs(tiny_bert, glue_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    out = run_cli(folder, "agent=confidence", "agent.threshold=0.55", f"backbone.name={tiny_bert}",
                  "backbone.package=null", "env=rte", f"data.dir={glue_dir}", "data.limit.train=64",
                  "data.limit.dev=40", "backbone.finetune.epochs=1", run_name="rte_run")
    assert out.returncode == 0, out.stderr[-3000:]
    single = folder / "sst2_run"
    shutil.copytree(folder / "rte_run", single)
    record = json.loads((single / "metrics.json").read_text())
    record["task"] = "sst2"
    (single / "metrics.json").write_text(json.dumps(record))
    return folder / "rte_run", single


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, body=None, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes, dict]:
    """(status, body, headers) of a GET (no body) or a POST of ``body`` (bytes as they are, else JSON)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """The server, started once for the module, with a long batch timeout so that concurrent requests batch."""
    logs = tmp_path_factory.mktemp("serve_logs")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "exitrl.serve", *map(str, runs), "--port", str(port), "--device", "cpu",
               "--threads", "1", "--batch-timeout", "0.25", "--max-texts-per-request", str(MAX_TEXTS),
               "--max-chars", str(MAX_CHARS), "--api-servers", "2"]  # two HTTP processes, one worker
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True, cwd=logs)
    url = f"http://127.0.0.1:{port}"
    server = type("Server", (), {"process": process, "url": url, "logs": logs})
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, f"the server exited: {(logs / 'err.txt').read_text()[-3000:]}"
            try:
                if call(f"{url}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"no /health after 180 s: {(logs / 'err.txt').read_text()[-3000:]}"
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything of its group that outlived it
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def rows(glue_dir):
    first, second = read_texts(glue_dir / "RTE" / "dev.tsv", ["sentence1", "sentence2"])
    pairs = [(a, b) for a, b in zip(first, second) if len(a) <= MAX_CHARS][:24]
    singles = read_texts(glue_dir / "SST-2" / "dev.tsv", ["sentence"])[0][:24]
    return pairs, singles


@pytest.fixture(scope="module")
def expected(runs, rows):
    """What the classifier answers on the same rows, in this process."""
    pairs, singles = rows
    return (EarlyExitClassifier.from_run(runs[0], "cpu").predict(pairs),
            EarlyExitClassifier.from_run(runs[1], "cpu").predict(singles))


def same(answer: dict, reference: dict) -> bool:
    return (answer["label"] == reference["label"] and answer["exit_layer"] == reference["exit_layer"]
            and abs(answer["score"] - reference["probs"][reference["label"]]) < 1e-4)


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics, keyed ``name{label="value",...}`` (labels sorted)."""
    status, body, headers = call(f"{server.url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "pid")
            out[f"{sample.name}{{{labels}}}"] = out.get(f"{sample.name}{{{labels}}}", 0) + sample.value
    return out


def test_answers_equal_predict(server, rows, expected):
    pairs, singles = rows
    status, body, _ = call(f"{server.url}/health")
    assert (status, body) == (200, b"ok")
    status, body, headers = call(f"{server.url}/predict", {"inputs": {"text": pairs[0][0], "text_pair": pairs[0][1]}},
                                 {"X-Request-Id": "first"})
    answer = json.loads(body)
    assert status == 200 and headers["x-request-id"] == "first", body
    assert set(answer) == {"label", "score", "exit_layer"} and same(answer, expected[0][0])
    status, body, _ = call(f"{server.url}/predict",
                           {"inputs": [{"text": a, "text_pair": b} for a, b in pairs[1:MAX_TEXTS + 1]]})
    answers = json.loads(body)
    assert status == 200 and len(answers) == MAX_TEXTS
    assert all(same(a, r) for a, r in zip(answers, expected[0][1:MAX_TEXTS + 1]))
    status, body, _ = call(f"{server.url}/predict", {"inputs": singles[:5], "run": "sst2_run"})
    assert status == 200 and all(same(a, r) for a, r in zip(json.loads(body), expected[1][:5]))
    status, body, _ = call(f"{server.url}/predict", {"inputs": {"text": singles[5]}, "run": "sst2_run"})
    assert status == 200 and same(json.loads(body), expected[1][5])


def test_concurrent_requests_are_batched(server, rows, expected):
    pairs, singles = rows
    before = metrics(server)

    def ask(i: int):
        status, body, headers = call(f"{server.url}/predict", {"inputs": singles[i], "run": "sst2_run"},
                                     {"X-Request-Id": f"r{i}"})
        return i, status, json.loads(body), headers.get("x-request-id")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, status, answer, request_id in answers:
        assert status == 200 and request_id == f"r{i}" and same(answer, expected[1][i]), answer
    after = metrics(server)

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    deadline = time.time() + 10  # the HTTP process counts a request once its answer is sent: a moment later
    while grew('exitrl_requests_total{status="2xx"}') < 16 and time.time() < deadline:
        time.sleep(0.1)
        after = metrics(server)

    assert grew('exitrl_requests_total{status="2xx"}') == 16
    assert grew('exitrl_examples_total{run="sst2_run"}') == 16
    batches = grew("exitrl_batch_requests_count{}")
    assert grew("exitrl_batch_requests_sum{}") == 16 and batches < 16  # some model call took several requests
    assert grew('exitrl_batch_requests_bucket{le="1.0"}') < batches
    assert grew('exitrl_exit_layers_total{run="sst2_run"}') == sum(r["exit_layer"] for r in expected[1][:16])
    examples = after['exitrl_examples_total{run="sst2_run"}']
    mean = after['exitrl_exit_layers_total{run="sst2_run"}'] / examples
    assert after['exitrl_mean_exit_layer{run="sst2_run"}'] == pytest.approx(mean)
    assert after['exitrl_saved_layers_fraction{run="sst2_run"}'] == pytest.approx(1 - mean / 3)
    assert after['exitrl_layers_total{run="sst2_run"}'] == 3 * examples
    assert sum(v for k, v in after.items() if k.startswith("exitrl_exits_total") and "sst2_run" in k) == examples


BAD_REQUESTS = [
    (b'{"inputs": "a text"', 400, "the request body is not JSON"),
    (b"\xff\xfe", 400, "the request body is not JSON"),
    (b'["a", "b"]', 400, "must be a JSON object such as"),
    (b'{"text": "a"}', 422, "unknown key(s) 'text'"),
    (b'{"run": "sst2_run"}', 422, 'missing "inputs"'),
    (b'{"inputs": 3, "run": "sst2_run"}', 422, '"inputs" must be a text, a list of texts, or'),
    (b'{"inputs": null, "run": "sst2_run"}', 422, "got a null"),
    (b'{"inputs": [["a", "b"]], "run": "sst2_run"}', 422, '"inputs"[0] must be a list of texts (no nested lists)'),
    (b'{"inputs": [], "run": "sst2_run"}', 422, '"inputs" is an empty list'),
    (b'{"inputs": {"txt": "a"}}', 422, 'must be a text, or {"text": "...", "text_pair": "..."}'),
    (b'{"inputs": {"text": "a", "text_pair": 5}}', 422, '"inputs"["text_pair"] must be a string; got a number'),
    (b'{"inputs": ["a", {"text": "a", "text_pair": "b"}]}', 422, "mixes single texts and pairs"),
    (b'{"inputs": "a text"}', 422, "run 'rte_run' (rte) classifies text pairs"),
    (b'{"inputs": {"text": "a", "text_pair": "b"}, "run": "sst2_run"}', 422, "classifies single texts"),
    (b'{"inputs": "a", "run": "nope"}', 404, "unknown run 'nope'; this server serves: rte_run, sst2_run."),
    (b'{"inputs": "a", "run": 1}', 422, '"run" must be a string naming a served run (rte_run, sst2_run)'),
    (json.dumps({"inputs": ["a"] * (MAX_TEXTS + 1), "run": "sst2_run"}).encode(), 413,
     f'"inputs" holds {MAX_TEXTS + 1} texts, more than this server takes in one request ({MAX_TEXTS}'),
    (json.dumps({"inputs": ["a", "b" * (MAX_CHARS + 1)], "run": "sst2_run"}).encode(), 413,
     f'"inputs"[1] has {MAX_CHARS + 1} characters, more than this server takes ({MAX_CHARS}, --max-chars)'),
    (json.dumps({"inputs": "b" * 200_000, "run": "sst2_run"}).encode(), 413, "the request body is over"),
]


def test_bad_requests_get_4xx_and_the_server_goes_on(server, rows, expected):
    before = metrics(server)
    for body, status, detail in BAD_REQUESTS:
        got, answer, _ = call(f"{server.url}/predict", body)
        assert (got, detail) == (status, detail) and detail in json.loads(answer)["detail"], answer
    got, answer, _ = call(f"{server.url}/predict", {"inputs": [rows[1][0]], "run": "sst2_run"})
    assert got == 200 and same(json.loads(answer)[0], expected[1][0])
    after = metrics(server)
    assert after['exitrl_requests_total{status="4xx"}'] - before.get('exitrl_requests_total{status="4xx"}', 0) == len(
        BAD_REQUESTS)
    assert server.process.poll() is None


def test_metrics_name_every_series(server):
    _, body, _ = call(f"{server.url}/metrics")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    for name in ("exitrl_requests", "exitrl_request_latency_seconds", "exitrl_examples", "exitrl_exits",
                 "exitrl_exit_layers", "exitrl_layers", "exitrl_mean_exit_layer", "exitrl_saved_layers_fraction",
                 "exitrl_batch_size", "exitrl_batch_requests", "exitrl_batch_seconds", "exitrl_worker_memory_bytes",
                 "exitrl_run_info"):
        assert name in families, name
    assert families["exitrl_request_latency_seconds"].type == "histogram"
    info = {s.labels["run"]: s.labels for s in families["exitrl_run_info"].samples}
    assert info["rte_run"]["inputs"] == "text pairs" and info["sst2_run"]["inputs"] == "single texts"
    assert info["rte_run"]["policy"] == "confidence" and info["rte_run"]["layers"] == "3"
    rss = [s.value for s in families["exitrl_worker_memory_bytes"].samples if s.labels["kind"] == "rss"]
    assert rss and all(value > 10_000_000 for value in rss)


def test_ctrl_c_stops_every_process_with_one_line(server):
    """Last: Ctrl-C reaches the server's whole process group, as from a terminal."""
    os.killpg(server.process.pid, signal.SIGINT)
    assert server.process.wait(timeout=60) == 130
    err = (server.logs / "err.txt").read_text()
    assert err.strip().splitlines()[-1] == "exitrl: interrupted; the server stopped" and "Traceback" not in err, err
    deadline = time.time() + 30
    while True:  # the API server, the inference worker and LitServe's manager are gone too
        try:
            os.killpg(server.process.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "processes of the server outlived it"
        time.sleep(0.5)


def serve_cli(capsys, *args) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_command_line_errors_come_before_any_model_loads(runs, tmp_path, capsys):
    rte, single = runs
    for args, message in [
        ([tmp_path / "absent"], "absent: no such folder; give the folder of a trained run"),
        ([tmp_path], "is not an exitrl run folder (no metrics.json)"),
        ([rte / "metrics.json"], "metrics.json is a file, not a run folder"),
        ([rte, "--max-batch-size", 0], "--max-batch-size must be >= 1, got 0."),
        ([rte, "--max-texts-per-request", 0], "--max-texts-per-request must be >= 1, got 0."),
        ([rte, "--max-chars", -5], "--max-chars must be >= 1, got -5."),
        ([rte, "--workers-per-device", 0], "--workers-per-device must be >= 1, got 0."),
        ([rte, "--api-servers", 0], "--api-servers must be >= 1, got 0."),
        ([rte, "--batch-timeout", -1], "--batch-timeout must be >= 0 and below --timeout (30.0 s), got -1.0."),
        ([rte, "--host", "10.1.2.3"], "--host must be one of 127.0.0.1, 0.0.0.0, :: or localhost"),
        ([rte, "--port", 80], "--port must be between 1024 and 65535, got 80."),
        ([rte, "--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
        ([rte, single, rte], "two runs are named 'rte_run'"),
    ]:
        code, err = serve_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("exitrl: error: ") and message in lines[0], err

    broken = tmp_path / "broken"
    shutil.copytree(rte, broken)
    record = json.loads((broken / "metrics.json").read_text())
    record["backbone"]["path"] = str(tmp_path / "gone")
    (broken / "metrics.json").write_text(json.dumps(record))
    code, err = serve_cli(capsys, broken)
    assert code == 2 and "The backbone of" in err and "is gone" in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve_cli(capsys, rte, "--port", port)
    assert code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "pick a free port" in err

    code, err = serve_cli(capsys, rte, "--threads", "0")
    assert code == 2 and "--threads must be a whole number >= 1 or auto" in err


def test_compile_and_late_reads_reach_the_classifiers_options(runs):
    """``--compile`` and ``--late-reads`` become the fast path's options of every served classifier (the full
    model's too); without them, none is set."""
    rte, _ = runs
    port = str(free_port())
    config = check_config(arguments().parse_args([str(rte), "--port", port, "--compile", "--late-reads",
                                                  "--device-walk"]))
    assert config.runtime == {"compile_decisions": True, "compile_layers": True, "late_reads": True,
                              "device_walk": True}
    plain = check_config(arguments().parse_args([str(rte), "--port", port]))
    assert not any(plain.runtime.values())
