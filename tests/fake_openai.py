"""A strict fake OpenAI-compatible chat server for tests (what llama.cpp's ``llama-server``, vLLM or
OpenAI's own API answer to ``GET /v1/models`` and ``POST /v1/chat/completions``).

It is written from the public API, not from our client, so the two can disagree. ``FakeOpenAI``
runs a ``ThreadingHTTPServer`` (``tests.fake_ollama``'s, which counts and can cut connections) on
127.0.0.1 with an ephemeral port; ``url`` is the base URL, ending in ``/v1``. It refuses what real
servers refuse, with OpenAI's error shape ``{"error": {"message", "type", "code"}}``: a wrong or
missing ``Authorization: Bearer`` when ``api_key`` is set (401), a body that is not a JSON object,
no ``model``, ``messages`` that are not a non-empty list of ``{"role", "content"}`` objects with a
known role, a ``temperature`` or ``seed`` of the wrong type, a ``response_format`` that is not
``text`` / ``json_object`` / a named ``json_schema`` with a ``schema`` object (400; like some real
servers, its 400 messages repeat what they refuse), an unknown model (404, ``model_not_found``) and
an unknown path (404). Other keys are accepted.

LoRA adapters, as the two servers that serve them expose them: ``lora_adapters`` (a list of
``{"id", "path", "scale"}``) makes it a llama.cpp server started with ``--lora``: ``GET /lora-adapters``
at its root lists them and a chat's ``"lora"`` must be a list of ``{"id", "scale"}`` naming loaded ids
(400 otherwise); without it ``/lora-adapters`` is a 404, as on vLLM. ``lora_modules`` (name ->
``(folder, parent)``) are vLLM's ``--lora-modules``: more ``GET /models`` entries with ``root`` and
``parent``, served by name; ``runtime_lora`` allows ``POST /v1/load_lora_adapter`` (vLLM's answer is
plain text), else that path is a 404.

A chat's answer is ``responder(model, messages, body)`` when set, else JSON made from the request's
JSON Schema (the first enum value, fixed text), else a fixed text, held to ``max_tokens`` tokens (then
``finish_reason`` ``length``). ``script(path, Reply(...), ...)``
queues scripted replies for the next requests to a path, in order: a status, headers (``Retry-After``),
a body (bytes, or JSON), or ``close="before"`` (the connection is closed without an answer) /
``close="midway"`` (the headers and half of the announced body, then the connection closes).
``requests`` records every request (method, path, headers, raw body, parsed JSON, arrival time);
``delay_s`` holds each chat answer that long; ``peak_in_flight`` is the most chats that were being
answered at once, and with ``gate`` set no chat is answered before that many were in flight together
(or ``gate_timeout_s`` passed), which makes concurrency measurable without timing. The ``fake_openai``
fixture yields a started server serving ``served-model`` and
``llama3.2:1b`` and stops it afterwards.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.fake_logprobs import cut, token_logprobs

from tests.fake_ollama import _schema_sample, _Server

ROLES = ("system", "developer", "user", "assistant", "tool")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
DEFAULT_CONTENT = "a scripted answer from the fake OpenAI-compatible server"


@dataclass
class Reply:
    """One scripted reply: ``status``, ``headers``, ``body`` (bytes, or anything JSON); ``close``:
    None, "before" (close without answering) or "midway" (half of the body, then close)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = b""
    close: str | None = None


@dataclass
class Request:
    method: str
    path: str  # without the /v1 prefix: "/chat/completions", "/models"
    headers: dict[str, str]
    raw: bytes
    body: Any  # the parsed JSON, or None
    at: float  # time.monotonic() when it was received


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


class FakeOpenAI:
    """The fake server's state and lifecycle; see the module docstring."""

    def __init__(self, models: tuple[str, ...] = ("served-model",), api_key: str | None = None) -> None:
        self.models = list(models)
        self.api_key = api_key
        self.lora_adapters: list[dict] | None = None
        self.lora_modules: dict[str, tuple[str, str]] = {}
        self.runtime_lora = False
        self.requests: list[Request] = []
        self.responder: Callable[[str, list, dict], str | None] | None = None
        # each allowed rating's probability for a chat that asks for logprobs (None: all certain)
        self.probs_responder: Callable[[str, list], dict | None] | None = None
        # rewrites the answer-token log-probabilities before they are sent (a misbehaving server)
        self.logprobs_edit: Callable[[list], list] | None = None
        self.delay_s = 0.0
        # a chat is answered only once this many chats were in flight at once (or after gate_timeout_s)
        self.gate: int | None = None
        self.gate_timeout_s = 10.0
        self.in_flight = self.peak_in_flight = 0
        self.changed = threading.Condition(threading.RLock())
        self.accepted = 0  # TCP connections accepted (``_Server`` counts them)
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.port = 0
        self._scripts: dict[str, collections.deque[Reply]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.fake = self  # type: ignore[assignment]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-openai-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()  # releases chats waiting at the gate
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None

    def config(self, **overrides: Any):
        """An ``OpenAIConfig`` for this server with short timeouts and quick retries."""
        from daemon.config import OpenAIConfig

        values = dict(base_url=self.url, connect_timeout_s=2.0, read_timeout_s=5.0, retries=2, backoff_s=0.01,
                      backoff_max_s=0.05)
        values.update(overrides)
        return OpenAIConfig(**values)

    def script(self, path: str, *replies: Reply) -> None:
        """Answer the next requests to ``path`` (without /v1) with ``replies``, in order."""
        with self.lock:
            self._scripts.setdefault(path, collections.deque()).extend(replies)

    def next_scripted(self, path: str) -> Reply | None:
        with self.lock:
            queue = self._scripts.get(path)
            return queue.popleft() if queue else None

    def requests_to(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def open_connections(self) -> int:
        if self._server is None:
            return 0
        with self._server.connections_lock:
            return len(self._server.connections)

    # --- what a real server checks ---------------------------------------------------------------

    def check_key(self, headers: dict[str, str]) -> None:
        if self.api_key is None:
            return
        given = headers.get("Authorization")
        if given is None:
            raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if given != f"Bearer {self.api_key}":
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def chat_content(self, body: Any) -> tuple[str, str | None]:
        """(the model, the answer's content) for a valid chat body; ``ApiError`` otherwise."""
        if not isinstance(body, dict):
            raise ApiError(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array", code="invalid_type")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and message.get("role") in ROLES
                    and isinstance(message.get("content"), str)):
                raise ApiError(400, f"Invalid 'messages[{i}]': {json.dumps(message)[:2000]} is not a message with a "
                                    f"role and a text content", code="invalid_value")
        temperature = body.get("temperature", 1)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, "'temperature' must be a number from 0 to 2", code="invalid_value")
        limit = body.get("max_tokens")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ApiError(400, "'max_tokens' must be a positive integer", code="invalid_value")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", code="invalid_type")
        if "logprobs" in body and not isinstance(body["logprobs"], bool):
            raise ApiError(400, "'logprobs' must be a boolean", code="invalid_type")
        top = body.get("top_logprobs")
        if top is not None and (type(top) is not int or not 0 <= top <= 20):
            raise ApiError(400, "'top_logprobs' must be an integer from 0 to 20", code="invalid_value")
        if top is not None and body.get("logprobs") is not True:
            raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true", code="invalid_value")
        schema = self._response_schema(body.get("response_format"))
        self._check_lora(body.get("lora"))
        if model not in self.models and model not in self.lora_modules:
            raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           code="model_not_found")
        if self.responder is not None:
            return model, self.responder(model, messages, body)
        if schema is not None:
            return model, json.dumps(_schema_sample(schema))
        return model, DEFAULT_CONTENT

    def _check_lora(self, lora: Any) -> None:
        """llama.cpp's per-request adapter scales: only on a server with adapters, naming loaded ids."""
        if lora is None:
            return
        known = {a["id"] for a in self.lora_adapters or []}
        if not (isinstance(lora, list) and all(isinstance(e, dict) and type(e.get("id")) is int
                                               and isinstance(e.get("scale"), (int, float)) for e in lora)):
            raise ApiError(400, "'lora' must be a list of {id, scale} objects", code="invalid_type")
        if any(e["id"] not in known for e in lora):
            raise ApiError(400, "invalid adapter id", code="invalid_value")

    def model_entries(self) -> list[dict]:
        entries = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in self.models]
        return entries + [{"id": name, "object": "model", "created": 1700000000, "owned_by": "fake", "root": root,
                           "parent": parent} for name, (root, parent) in self.lora_modules.items()]

    @staticmethod
    def _response_schema(fmt: Any) -> dict | None:
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
            raise ApiError(400, "Invalid 'response_format.type': expected one of text, json_object, json_schema",
                           code="invalid_value")
        if fmt["type"] != "json_schema":
            return None
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema.name'",
                           code="missing_required_parameter")
        if not isinstance(spec.get("schema"), dict) or not isinstance(spec.get("strict", False), bool):
            raise ApiError(400, "Invalid 'response_format.json_schema': 'schema' must be an object and 'strict' "
                                "a boolean", code="invalid_value")
        return spec["schema"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def fake(self) -> FakeOpenAI:
        return self.server.fake  # type: ignore[attr-defined]

    def _send(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _scripted(self, reply: Reply) -> None:
        if reply.close == "before":
            self.close_connection = True
            return
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        if reply.close == "midway":
            self.close_connection = True
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            return
        self._send(reply.status, body, reply.headers)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        full = self.path.split("?", 1)[0]
        path = full.removeprefix("/v1") if full.startswith("/v1/") else full
        headers = dict(self.headers)
        with self.fake.lock:
            self.fake.requests.append(Request(self.command, path, headers, raw, body, time.monotonic()))
        reply = self.fake.next_scripted(path)
        if reply is not None:
            self._scripted(reply)
            return
        try:
            if (self.command, full) == ("GET", "/lora-adapters") and self.fake.lora_adapters is not None:
                self.fake.check_key(headers)
                self._send(200, self.fake.lora_adapters)
                return
            if (self.command, full) == ("POST", "/v1/load_lora_adapter") and self.fake.runtime_lora:
                self.fake.check_key(headers)
                if not (isinstance(body, dict) and isinstance(body.get("lora_name"), str)
                        and isinstance(body.get("lora_path"), str)):
                    raise ApiError(400, "lora_name and lora_path are required")
                self.fake.lora_modules[body["lora_name"]] = (body["lora_path"], self.fake.models[0])
                data = f"Success: LoRA adapter '{body['lora_name']}' added successfully.".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if not full.startswith("/v1/") or (self.command, path) not in (("GET", "/models"),
                                                                            ("POST", "/chat/completions")):
                raise ApiError(404, f"Invalid URL ({self.command} {full})")
            self.fake.check_key(headers)
            if path == "/models":
                self._send(200, {"object": "list", "data": self.fake.model_entries()})
                return
            if raw and body is None:
                raise ApiError(400, "We could not parse the JSON body of your request.")
            self._chat(body)
        except ApiError as exc:
            self._send(exc.status, exc.body())

    def _chat(self, body: Any) -> None:
        fake = self.fake
        with fake.changed:
            fake.in_flight += 1
            fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
            fake.changed.notify_all()
            if fake.gate is not None:
                fake.changed.wait_for(lambda: fake.peak_in_flight >= fake.gate or fake.stopping.is_set(),
                                      fake.gate_timeout_s)
        try:
            if fake.delay_s:
                fake.stopping.wait(fake.delay_s)
            model, content = fake.chat_content(body)
        finally:
            with fake.changed:
                fake.in_flight -= 1
        scores = None
        finish = "stop"
        if isinstance(content, str):  # held to max_tokens, as a server does
            content, was_cut = cut(content, body.get("max_tokens"))
            finish = "length" if was_cut else finish
        if body.get("logprobs") is True and isinstance(content, str):
            probs = fake.probs_responder(model, body["messages"]) if fake.probs_responder else None
            tokens = token_logprobs(content, probs, int(body.get("top_logprobs") or 0))
            scores = {"content": fake.logprobs_edit(tokens) if fake.logprobs_edit else tokens, "refusal": None}
        self._send(200, {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                         "created": int(time.time()), "model": model, "system_fingerprint": "fp_fake",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "logprobs": scores, "finish_reason": finish}],
                         "usage": {"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59}})

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@pytest.fixture
def fake_openai():
    """A started fake OpenAI-compatible server serving ``served-model`` and ``llama3.2:1b``."""
    fake = FakeOpenAI(models=("served-model", "llama3.2:1b"))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
