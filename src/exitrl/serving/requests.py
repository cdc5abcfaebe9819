"""Every ``POST /predict`` request checked, and answered 4xx when bad, in the HTTP process before LitServe queues it,
so one bad request never fails a batch of other clients' requests.

Request: ``{"inputs": "a text"}``, ``{"inputs": ["a", "b"]}``, a pair ``{"inputs": {"text": "...", "text_pair":
"..."}}`` or a list of pairs; optional ``"run": "<name>"`` (a run is named by its folder's name; the first run is the
default). Answer: ``{"label": ..., "score": <probability of that label>, "exit_layer": <1..L>}`` per input, a list
when the inputs were a list. An ``X-Request-Id`` header comes back on its answer, carried through the inference
worker with the answer, so a client can check that each answer is its own. Bad input answers 4xx with
``{"detail": "<what to fix>"}`` and the server goes on: 400 (not JSON, not an object), 404 (unknown run: the detail
names the served runs), 413 (more than ``--max-texts-per-request`` texts, a text over ``--max-chars`` characters),
422 (no ``"inputs"``, a wrong type, an empty list, single texts for a pair run or pairs for a single-text run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from exitrl.serving.metrics import process_metrics, status_class
from exitrl.serving.runs import ServedRun

PREDICT_PATH = "/predict"
REQUEST_ID_HEADER = b"x-request-id"
EXAMPLE = '{"inputs": "a text"}'

# ASGI's callables
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestError(Exception):
    """A request the server refuses: its HTTP status and what the client should fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def json_type(value: object) -> str:
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


# -- the HTTP side: every /predict request checked (and counted) before LitServe queues it for a worker -----------
async def send_json(send: Send, status: int, content: object, headers: list | None = None) -> None:
    """Answer with ``content`` as JSON (and any extra ``headers``)."""
    body = json.dumps(content, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServeMiddleware:
    """ASGI middleware on ``POST /predict``: reads and checks the body (`parse_request`; a bad one is answered
    here, 4xx), hands LitServe the checked form, turns the worker's envelope back into the Hugging Face answer with
    the request's ``X-Request-Id``, and counts the request and its latency."""

    def __init__(self, app: ASGIApp, runs: dict[str, ServedRun], default: str, max_texts: int, max_chars: int):
        self.app, self.runs, self.default = app, runs, default
        self.max_texts, self.max_chars = max_texts, max_chars
        self.max_bytes = max_texts * (2 * 6 * max_chars + 64) + 4096  # every character as a \uXXXX escape, and room

    async def read_body(self, receive: Receive) -> bytes:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def forward(self, scope: Scope, receive: Receive, send: Send, request: dict, status: list) -> None:
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

