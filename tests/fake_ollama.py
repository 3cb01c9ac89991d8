"""A faithful fake Ollama server for tests, written from ``shared/reference/ollama-api.md`` (§8).

It is deliberately written from the reference and not from our client, so that the two can
disagree. ``FakeOllama`` runs a ``ThreadingHTTPServer`` on 127.0.0.1 with an ephemeral port in a
thread and keeps its state in memory: ``models`` (canonical name → record), ``blobs``
(``sha256:<hex>`` → bytes) and ``requests`` (every request received: method, path, parsed JSON body
or byte count, headers). ``fault`` switches on a failure mode: ``"down"`` (server stopped, URL
kept), ``"slow"`` (answers after ``slow_s`` seconds), ``"error500"``, ``"reset"`` (connection reset
in the middle of a create or chat response), ``"garbage"`` (200 with a body that is not JSON),
``"hang"`` (reads the request and never answers, until the client closes the connection) and
``"trickle"`` (the normal answer, status line included, one byte every ``trickle_s`` seconds, so that
no single socket read ever waits long). ``accepted`` counts the TCP connections the server accepted
and ``open_connections()`` those still open. A chat's answer (scripted, or JSON made from a
``format`` schema) is held to ``options.num_predict`` tokens (then ``done_reason`` ``length``) and
comes with its tokens' ``logprobs`` when asked.
``hostile`` maps a path to a hostile answer for that path only (the others answer normally):
``"endless"`` (200 without Content-Length, then spaces without end, ``endless_chunk_bytes`` at a
time, ``endless_pause_s`` apart, 0 for no pause),
``"huge"`` / ``"huge_unannounced"`` (the normal answer after ``huge_bytes`` spaces, with or without
a Content-Length), ``"redirect"`` (307 to ``redirect_to``; with ``redirect_endless``, a body of
spaces without end) and ``"body"`` (the bytes in
``hostile_bodies[path]``, with the status in ``hostile_status[path]``, 200 if none).
``hostile_sent`` counts the bytes each hostile answer got out, by path.
``refuse_adapters`` makes it a server that creates no model from base + adapter, as Ollama 0.34.1 and
later (its pull request 14969, "create: add server-side MLX imports and drop GGUF conversion"):
safetensors adapters are refused before any status line with 400 ``supplied file was not in GGUF
format`` (that pull request's ``server/create.go`` at ca0b86d3: the adapter files are detected as
safetensors and ``errOnlyGGUFSupported`` is answered); GGUF adapters with 400 ``ADAPTER_REFUSED``
(the public report says the new Ollama refuses ``ADAPTER`` altogether, its exact text is
unconfirmed). A model created from ``files`` holding one ``.gguf`` shows that blob as its ``FROM``.
The ``fake_ollama`` fixture yields a started server seeded with ``llama3.2:1b`` (llama),
``gemma2:2b`` (gemma2) and ``qwen2.5:0.5b`` (qwen2) and stops it, and its threads, afterwards.
"""

from __future__ import annotations

import hashlib
import json
import io
import posixpath
import re
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.fake_logprobs import cut, token_logprobs

FAULTS = (None, "down", "slow", "error500", "reset", "garbage", "hang", "trickle")
HOSTILE = ("endless", "huge", "huge_unannounced", "redirect", "body")
ADAPTER_ARCHITECTURES = ("llama", "gemma2")  # reference §5: convert.ConvertAdapter
BLOB_DIR = "/usr/share/ollama/.ollama/models/blobs"
DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")
FULL_PRECISION = ("F16", "BF16", "F32")
NOT_GGUF = "supplied file was not in GGUF format"
ADAPTER_REFUSED = "adapters are not supported"  # unconfirmed wording (see the module docstring)


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any  # parsed JSON, or None; for blob uploads the byte count is in ``size_bytes``
    size_bytes: int
    headers: dict[str, str]

    def __getitem__(self, key: str) -> Any:  # dict-style access too: r["path"], r["body"]
        return getattr(self, key)


class BadRequest(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def canonical_name(name: Any) -> tuple[str, str]:
    """(lookup key, display name) per reference §2: tag defaults to latest, lookups ignore case.
    Invalid names raise ``BadRequest(400, "invalid model name")``."""
    if not isinstance(name, str) or not name:
        raise BadRequest(400, "invalid model name")
    parts = name.split("/")
    if len(parts) > 3:
        raise BadRequest(400, "invalid model name")
    last = parts[-1]
    model, sep, tag = last.partition(":")
    if not sep:
        tag = "latest"
    if not PART_RE.match(model) or not PART_RE.match(tag):
        raise BadRequest(400, "invalid model name")
    if len(parts) >= 2:
        namespace = parts[-2]
        if not PART_RE.match(namespace) or "." in namespace:
            raise BadRequest(400, "invalid model name")
    if len(parts) == 3 and not HOST_RE.match(parts[0]):
        raise BadRequest(400, "invalid model name")
    display = "/".join([*parts[:-1], f"{model}:{tag}"])
    return display.lower(), display


def requested_name(body: Any, keys: tuple[str, ...] = ("model", "name")) -> Any:
    """The model a request body names (create, show and delete also take the older "name" key);
    ``BadRequest(400, "model is required")`` when it names none."""
    name = next((body[k] for k in keys if isinstance(body, dict) and body.get(k)), None)
    if not name:
        raise BadRequest(400, "model is required")
    return name


def _schema_sample(schema: Any, key: str = "") -> Any:
    """Deterministic JSON that matches a (simple) JSON Schema: first enum value, fixed text."""
    if not isinstance(schema, dict):
        return None
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: _schema_sample(v, k) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return []
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    if kind == "string":
        return f"scripted {key or 'text'} from the fake Ollama server"
    return None


def _safetensors_ok(data: bytes) -> bool:
    """An 8-byte little-endian header length followed by a JSON object header."""
    if len(data) < 8:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        return False
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        return False
    return isinstance(header, dict)


def _gguf_blob(files: dict | None) -> str | None:
    """The blob path a model created from one ``.gguf`` in ``files`` shows as its ``FROM``."""
    ggufs = [d for k, d in (files or {}).items() if k.endswith(".gguf")]
    return f"{BLOB_DIR}/{ggufs[0].replace(':', '-')}" if len(ggufs) == 1 else None


def _parameters_text(parameters: dict) -> str:
    """The ``show`` ``parameters`` string: name padded to 30 columns, strings quoted, lists repeated."""
    lines = []
    for name, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            shown = f'"{item}"' if isinstance(item, str) else json.dumps(item)
            lines.append(f"{name:<30} {shown}")
    return "\n".join(lines)


@dataclass
class Model:
    name: str  # display name with tag
    architecture: str
    family: str
    quantization: str
    parameter_size: str
    format: str = "gguf"
    capabilities: list[str] = field(default_factory=lambda: ["completion", "tools"])
    parent_model: str = ""
    system: str = ""
    template: str = "{{ .Prompt }}"
    parameters: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    adapters: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    license: Any = None
    modified_at: str = field(default_factory=_now)
    size: int = 1_234_567
    weights_file: str | None = None  # the blob FROM names (a real Ollama's: its models folder's file)

    @property
    def digest(self) -> str:
        manifest = json.dumps([self.name, self.architecture, self.parent_model, self.system,
                               self.parameters, self.messages, self.adapters, self.files,
                               self.template], sort_keys=True)
        return hashlib.sha256(manifest.encode()).hexdigest()

    @property
    def weights_digest(self) -> str:
        name = self.name if not self.parent_model else self.parent_model
        return hashlib.sha256(f"weights:{self.architecture}:{name}".encode()).hexdigest()

    @property
    def adapter_layer_digest(self) -> str | None:
        if not self.adapters:
            return None
        return hashlib.sha256(json.dumps(self.adapters, sort_keys=True).encode()).hexdigest()

    def details(self) -> dict:
        return {"parent_model": self.parent_model, "format": self.format, "family": self.family,
                "families": [self.family], "parameter_size": self.parameter_size,
                "quantization_level": self.quantization}

    def model_info(self) -> dict:
        arch = self.architecture
        info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": 1_235_814_400,
                                "general.file_type": 15, "general.quantization_version": 2,
                                "tokenizer.ggml.tokens": []}
        info[f"{arch}.context_length"] = 131072
        info[f"{arch}.block_count"] = 16
        info[f"{arch}.embedding_length"] = 2048
        return info

    def modelfile(self) -> str:
        lines = ['# Modelfile generated by "ollama show"',
                 "# To build a new Modelfile based on this, replace FROM with:",
                 f"# FROM {self.name}", "",
                 f"FROM {self.weights_file or f'{BLOB_DIR}/sha256-{self.weights_digest}'}"]
        if self.adapter_layer_digest:
            lines.append(f"ADAPTER {BLOB_DIR}/sha256-{self.adapter_layer_digest}")
        lines.append(f'TEMPLATE """{self.template}"""')
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        for name, value in self.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {item}")
        for msg in self.messages:
            lines.append(f'MESSAGE {msg.get("role")} """{msg.get("content")}"""')
        return "\n".join(lines) + "\n"

    def tags_entry(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at,
                "size": self.size, "digest": self.digest, "details": self.details()}

    def show(self) -> dict:
        return {"modelfile": self.modelfile(), "parameters": _parameters_text(self.parameters),
                "template": self.template, "system": self.system, "details": self.details(),
                "model_info": self.model_info(), "capabilities": list(self.capabilities),
                "modified_at": self.modified_at, "messages": list(self.messages)}


class FakeOllama:
    """The fake server's state and lifecycle; see the module docstring."""

    def __init__(self, version: str = "0.12.3") -> None:
        self.version = version
        self.models: dict[str, Model] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.slow_s = 5.0
        self.trickle_s = 0.1
        self.accepted = 0  # TCP connections accepted, over restarts
        self.chat_content: str | None = None  # overrides the scripted chat answer when set
        # a test's own answers: (model name, messages) -> content; overrides chat_content when set
        self.chat_responder: Callable[[str, list], str] | None = None
        # each allowed rating's probability for a chat that asks for logprobs (None: all certain)
        self.probs_responder: Callable[[str, list], dict | None] | None = None
        # rewrites the answer-token log-probabilities before they are sent (a misbehaving server)
        self.logprobs_edit: Callable[[list], list] | None = None
        self.hostile: dict[str, str] = {}  # path -> one of HOSTILE
        self.hostile_bodies: dict[str, bytes] = {}  # path -> the body of a "body" answer
        self.hostile_status: dict[str, int] = {}  # path -> the status of a "body" answer (default 200)
        self.hostile_sent: dict[str, int] = {}  # path -> bytes of hostile answers sent so far
        self.endless_chunk_bytes = 64 * 1024
        self.endless_pause_s = 0.0
        self.huge_bytes = 1 << 30
        self.redirect_to = ""
        self.redirect_endless = False
        self.refuse_adapters = False  # a server that creates no model from base + adapter (0.34.1 and later)
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.port = 0
        self._fault: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-ollama-{self.port}", daemon=True)
        self._thread.start()

    def _stop_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None

    def stop(self) -> None:
        self.stopping.set()  # wakes "slow" handlers
        self._stop_server()

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, mode: str | None) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; one of {FAULTS}")
        previous, self._fault = self._fault, mode
        if mode == "down" and previous != "down":
            self._stop_server()
        elif mode != "down" and previous == "down":
            self.start()  # same port again: ``port`` was kept

    # --- seeding and inspection ----------------------------------------------------------------

    def add_model(self, name: str, architecture: str = "llama", quantization: str = "Q4_K_M",
                  family: str | None = None, parameter_size: str = "1.2B",
                  capabilities: tuple[str, ...] = ("completion", "tools"),
                  parameters: dict | None = None, weights_file: str | None = None) -> Model:
        key, display = canonical_name(name)
        model = Model(name=display, architecture=architecture, family=family or architecture,
                      quantization=quantization, parameter_size=parameter_size,
                      capabilities=list(capabilities),
                      parameters=dict(parameters or {"stop": ["<|eot_id|>"]}), weights_file=weights_file)
        with self.lock:
            self.models[key] = model
        return model

    def require_model(self, name: Any) -> tuple[Model, str]:
        """(the model, its display name): 400 for an invalid name, 404 when no such model exists."""
        _, display = canonical_name(name)
        model = self.get_model(name)
        if model is None:
            raise BadRequest(404, f"model '{display}' not found")
        return model, display

    def get_model(self, name: str) -> Model | None:
        try:
            key, _ = canonical_name(name)
        except BadRequest:
            return None
        with self.lock:
            return self.models.get(key)

    def config(self, **overrides: Any):
        """An ``OllamaConfig`` pointing at this server with short timeouts and one quick retry."""
        from daemon.config import OllamaConfig

        values = dict(host=self.url, connect_timeout_s=2.0, read_timeout_s=2.0, create_timeout_s=2.0,
                      retries=1, backoff_s=0.01, backoff_max_s=0.02)
        values.update(overrides)
        return OllamaConfig(**values)

    def open_connections(self) -> int:
        """Connections accepted and not yet closed (0 while the server is down)."""
        if self._server is None:
            return 0
        with self._server.connections_lock:
            return len(self._server.connections)

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests
                    if r.path == path and (method is None or r.method == method)]

    def record(self, req: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(req)

    # --- endpoint logic (pure: returns status/body or a list of NDJSON lines) --------------------

    def create(self, body: dict) -> tuple[list[dict], BadRequest | None, Model | None]:
        """Validate and build a model. Returns (status lines streamed before any failure, the
        failure if any, the new model). Failures before the first line are raised as BadRequest."""
        name = requested_name(body)
        _, display = canonical_name(name)
        base_name, files, adapters = body.get("from"), body.get("files"), body.get("adapters")
        if not base_name and not files:
            raise BadRequest(400, "neither 'from' or 'files' was specified")
        for mapping in (files, adapters):
            if mapping is None:
                continue
            if not isinstance(mapping, dict):
                raise BadRequest(400, "json: cannot unmarshal into map[string]string")
            for key, digest in mapping.items():
                clean = posixpath.normpath(key)
                if key.startswith("/") or clean != key or clean.startswith("..") or "/../" in f"/{key}/":
                    raise BadRequest(400, "file path must be relative")
                if not digest:
                    raise BadRequest(400, "invalid digest format")
        if adapters and sum(1 for k in adapters if k.endswith(".gguf")) > 1:
            raise BadRequest(400, "only one adapter is currently supported")
        for key in ("system", "template"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise BadRequest(400, f"json: cannot unmarshal {key}")
        template = body.get("template")
        if template is not None and template.count("{{") != template.count("}}"):
            raise BadRequest(400, "template error: unexpected EOF")
        parameters = body.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(400, "json: cannot unmarshal parameters into map[string]any")
        messages = body.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest(400, "json: cannot unmarshal messages into []api.Message")
        for digest in (files or {}).values():
            if digest not in self.blobs:
                raise BadRequest(500, f"open {BLOB_DIR}/{str(digest).replace(':', '-')}: no such file or directory")
        for digest in (adapters or {}).values():
            if digest not in self.blobs:
                raise BadRequest(400, f"open {BLOB_DIR}/{str(digest).replace(':', '-')}: no such file or directory")

        lines: list[dict] = []
        base: Model | None = None
        if base_name:
            base = self.get_model(base_name)
            if base is None:
                lines.append({"status": "pulling manifest"})
                return lines, BadRequest(500, "pull model manifest: file does not exist"), None
        if files:
            lines.append({"status": "parsing GGUF" if any(k.endswith(".gguf") for k in files) else "converting model"})
            base = Model(name=display, architecture="llama", family="llama", quantization="F16",
                         parameter_size="1.2B", files=dict(files))
        assert base is not None
        if body.get("quantize") or body.get("quantization"):
            if base.quantization not in FULL_PRECISION:
                return lines, BadRequest(400, "quantization is only supported for F16, BF16 and F32 models"), None
        if adapters:
            error = self._check_adapters(adapters, base, lines)
            if error is not None:
                return lines, error, None
        model = Model(name=display, architecture=base.architecture, family=base.family,
                      quantization=base.quantization, parameter_size=base.parameter_size,
                      format=base.format, capabilities=list(base.capabilities),
                      parent_model=base.name if base_name else "",
                      system=body["system"] if body.get("system") is not None else base.system,
                      template=template if template is not None else base.template,
                      parameters={**base.parameters, **(parameters or {})},
                      messages=list(messages) if messages is not None else list(base.messages),
                      adapters=dict(adapters or base.adapters), files=dict(files or {}),
                      license=body.get("license", base.license), weights_file=_gguf_blob(files))
        for digest in sorted(set((adapters or {}).values())):
            lines.append({"status": f"creating new layer {digest}"})
        lines.append({"status": f"using existing layer sha256:{base.weights_digest}"})
        lines.append({"status": "writing manifest"})
        lines.append({"status": "success"})
        return lines, None, model

    def _check_adapters(self, adapters: dict, base: Model, lines: list[dict]) -> BadRequest | None:
        if self.refuse_adapters:
            gguf = any(k.endswith(".gguf") or (not k.endswith(".safetensors") and self.blobs[d][:4] == b"GGUF")
                       for k, d in adapters.items())
            return BadRequest(400, ADAPTER_REFUSED if gguf else NOT_GGUF)
        if any(k.endswith(".gguf") for k in adapters):
            # a .gguf key takes the GGUF path, which checks the magic bytes (reference 3.4)
            if any(k.endswith(".gguf") and self.blobs[d][:4] != b"GGUF" for k, d in adapters.items()):
                return BadRequest(400, "supplied file was not in GGUF format")
            return None
        weights = [k for k in adapters if k.endswith(".safetensors")]
        if not weights:
            sniff = [self.blobs[d][:4] for d in adapters.values()]
            if any(s == b"GGUF" for s in sniff):
                return None
            return BadRequest(400, "unknown type")
        lines.append({"status": "converting adapter"})
        if base.architecture not in ADAPTER_ARCHITECTURES:
            return BadRequest(400, "unsupported architecture")
        config_key = next((k for k in adapters if posixpath.basename(k) == "adapter_config.json"), None)
        if config_key is None:
            return BadRequest(400, "open adapter_config.json: no such file or directory")
        try:
            config = json.loads(self.blobs[adapters[config_key]])
        except ValueError:
            return BadRequest(400, "invalid character looking for beginning of value")
        alpha = config.get("lora_alpha") if isinstance(config, dict) else None
        if alpha is None and isinstance(config, dict):
            alpha = (config.get("lora_parameters") or {}).get("alpha")
        if alpha is None:
            return BadRequest(400, "adapter_config.json: lora_alpha not found")
        for key in weights:
            if not _safetensors_ok(self.blobs[adapters[key]]):
                return BadRequest(400, "invalid safetensors header")
        return None

    def chat_response(self, body: dict) -> tuple[Model, str, str]:
        """(model, content, done_reason) for a valid chat body; BadRequest otherwise."""
        model, display = self.require_model(requested_name(body, ("model",)))
        if "completion" not in model.capabilities:
            raise BadRequest(400, f'"{display}" does not support chat')
        fmt = body.get("format")
        if fmt not in (None, "", "json") and not isinstance(fmt, dict):
            raise BadRequest(400, f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object')
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise BadRequest(400, "json: cannot unmarshal messages into []api.Message")
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest(400, "json: cannot unmarshal into Go struct field ChatRequest.options of type "
                                  "map[string]interface {}")
        limit = (options or {}).get("num_predict")
        if "logprobs" in body and not isinstance(body["logprobs"], bool):
            raise BadRequest(400, "json: cannot unmarshal into Go struct field ChatRequest.logprobs of type bool")
        top = body.get("top_logprobs", 0)
        if type(top) is not int:
            raise BadRequest(400, "json: cannot unmarshal into Go struct field ChatRequest.top_logprobs of type int")
        if not 0 <= top <= 20:
            raise BadRequest(400, "top_logprobs must be between 0 and 20")
        if not messages:
            return model, "", "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        if self.chat_responder is not None:
            content = self.chat_responder(model.name, messages)
        elif self.chat_content is not None:
            content = self.chat_content
        elif isinstance(fmt, dict):
            content = json.dumps(_schema_sample(fmt))
        elif fmt == "json":
            content = json.dumps({"answer": "scripted answer from the fake Ollama server"})
        else:
            content = "This is a scripted answer from the fake Ollama server."
        # num_predict holds the answer to that many tokens (-1: no limit), done_reason "length"
        content, was_cut = cut(content, limit if type(limit) is int else None)
        return model, content, "length" if was_cut else "stop"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeOllama

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.connections.add(request)
        with self.fake.lock:
            self.fake.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut open keep-alive connections too, so that "down" really is down."""
        with self.connections_lock:
            live = list(self.connections)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        # Clients that gave up (timeouts, resets) make writes fail; that is the point of the faults.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def fake(self) -> FakeOllama:
        return self.server.fake

    # --- body and response helpers -------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              close: bool = False) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, close: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), close=close)

    def _error(self, status: int, error: str, close: bool = False) -> None:
        self._json(status, {"error": error}, close=close)

    def _stream(self, lines: list[dict], *, reset_after: int | None = None) -> None:
        """NDJSON with chunked transfer encoding, like Go's http server."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, line in enumerate(lines):
            if reset_after is not None and i == reset_after:
                self._reset()
                return
            data = (json.dumps(line) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _hang(self) -> None:
        """Never answer; return once the client closed the connection (or the server stops)."""
        self.close_connection = True
        while not self.fake.stopping.wait(0.02):
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return

    def _trickle(self, answer: bytes) -> None:
        """Send ``answer`` one byte every ``trickle_s``; stop when the client has gone."""
        self.close_connection = True
        for i in range(len(answer)):
            if self.fake.stopping.wait(self.fake.trickle_s):
                return
            try:
                self.connection.sendall(answer[i:i + 1])
            except OSError:
                return

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing server would."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _parse_json(self, raw: bytes) -> Any:
        if not raw:
            raise BadRequest(400, "missing request body")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise BadRequest(400, str(exc)) from None

    # --- dispatch ------------------------------------------------------------------------------

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        is_blob_post = self.command == "POST" and path.startswith("/api/blobs/")
        raw = b"" if is_blob_post else self._read_body()
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if not is_blob_post:
            self.fake.record(RecordedRequest(self.command, path, body, len(raw), dict(self.headers)))
        hostile = self.fake.hostile.get(path)
        if hostile is not None:
            self._hostile(hostile, path, raw, is_blob_post)
            return
        fault = self.fake.fault
        if fault == "slow" and self.fake.stopping.wait(self.fake.slow_s):
            return
        if fault == "hang":
            self._hang()
            return
        if fault == "trickle":
            real, self.wfile = self.wfile, io.BytesIO()
            try:
                self._answer(path, raw, is_blob_post)
            finally:
                answer, self.wfile = self.wfile.getvalue(), real
            self._trickle(answer)
            return
        self._answer(path, raw, is_blob_post)

    def _hostile(self, mode: str, path: str, raw: bytes, is_blob_post: bool) -> None:
        """One of the ``HOSTILE`` answers (see the module docstring); the connection is closed after it."""
        if mode not in HOSTILE:
            raise ValueError(f"unknown hostile mode {mode!r}; one of {HOSTILE}")
        self.close_connection = True
        if mode == "redirect":
            self.send_response(307)
            self.send_header("Location", self.fake.redirect_to)
            if not self.fake.redirect_endless:
                self.send_header("Content-Length", "0")
            self.end_headers()
            self.wfile.flush()
            if self.fake.redirect_endless:
                self._endless(path)
            return
        if mode == "body":
            self._send(self.fake.hostile_status.get(path, 200), self.fake.hostile_bodies[path], close=True)
            return
        real, self.wfile = self.wfile, io.BytesIO()
        try:
            self._answer(path, raw, is_blob_post)  # the normal answer, to come after the padding
        finally:
            normal, self.wfile = self.wfile.getvalue(), real
        body = normal.partition(b"\r\n\r\n")[2]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson" if path == "/api/create" else "application/json")
        if mode == "huge":
            self.send_header("Content-Length", str(self.fake.huge_bytes + len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        if mode == "endless":
            self._endless(path)
            return
        left = self.fake.huge_bytes
        while left > 0 and not self.fake.stopping.is_set():
            piece = min(left, 1 << 16)
            if not self._send_hostile(path, b" " * piece):
                return
            left -= piece
        self._send_hostile(path, body)

    def _endless(self, path: str) -> None:
        """Spaces, ``endless_chunk_bytes`` at a time ``endless_pause_s`` apart, until the client goes."""
        chunk = b" " * self.fake.endless_chunk_bytes
        while not self.fake.stopping.is_set() and self._send_hostile(path, chunk):
            if self.fake.endless_pause_s:
                self.fake.stopping.wait(self.fake.endless_pause_s)

    def _send_hostile(self, path: str, data: bytes) -> bool:
        """Send ``data``; False once the client has gone."""
        try:
            self.connection.sendall(data)
        except OSError:
            return False
        with self.fake.lock:
            self.fake.hostile_sent[path] = self.fake.hostile_sent.get(path, 0) + len(data)
        return True

    def _answer(self, path: str, raw: bytes, is_blob_post: bool) -> None:
        fault = self.fake.fault
        if fault == "error500" and path.startswith("/api/"):
            if is_blob_post:
                self.fake.record(RecordedRequest(self.command, path, None, 0, dict(self.headers)))
            self._error(500, "fake internal server error", close=is_blob_post)
            return
        if fault == "garbage" and path.startswith("/api/"):
            if is_blob_post:
                self.fake.record(RecordedRequest(self.command, path, None, 0, dict(self.headers)))
            self._send(200, b"<html>this is not json", close=is_blob_post)
            return
        try:
            route = self._route(path)
            if route is None:
                return
            route(path, raw)
        except BadRequest as exc:
            self._error(exc.status, exc.error, close=is_blob_post)

    def _route(self, path: str):
        method = self.command
        table = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/create": {"POST": self._create},
            "/api/chat": {"POST": self._chat},
            "/api/delete": {"DELETE": self._delete},
            "/api/copy": {"POST": self._copy},
        }
        if path.startswith("/api/blobs/"):
            handlers = {"HEAD": self._blob_head, "POST": self._blob_post}
        elif path in table:
            handlers = table[path]
        else:
            self._send(404, b"404 page not found", "text/plain")
            return None
        if method not in handlers:
            self._send(405, b"405 method not allowed", "text/plain", close=method == "POST")
            return None
        return handlers[method]

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = _handle

    # --- endpoints -----------------------------------------------------------------------------

    def _root(self, path: str, raw: bytes) -> None:
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self, path: str, raw: bytes) -> None:
        self._json(200, {"version": self.fake.version})

    def _tags(self, path: str, raw: bytes) -> None:
        with self.fake.lock:
            models = [m.tags_entry() for m in self.fake.models.values()]
        self._json(200, {"models": models})

    def _ps(self, path: str, raw: bytes) -> None:
        self._json(200, {"models": []})

    def _show(self, path: str, raw: bytes) -> None:
        model, _ = self.fake.require_model(requested_name(self._parse_json(raw)))
        self._json(200, model.show())

    def _delete(self, path: str, raw: bytes) -> None:
        key, display = canonical_name(requested_name(self._parse_json(raw)))
        with self.fake.lock:
            if key not in self.fake.models:
                raise BadRequest(404, f"model '{display}' not found")
            del self.fake.models[key]
        self._send(200, b"")

    def _copy(self, path: str, raw: bytes) -> None:
        body = self._parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest(400, "missing request body")
        source, destination = body.get("source"), body.get("destination")
        try:
            canonical_name(source)
        except BadRequest:
            raise BadRequest(400, f'source "{source}" is invalid') from None
        try:
            dest_key, dest_display = canonical_name(destination)
        except BadRequest:
            raise BadRequest(400, f'destination "{destination}" is invalid') from None
        model = self.fake.get_model(source)
        if model is None:
            raise BadRequest(404, f'model "{source}" not found')
        with self.fake.lock:
            copy = Model(**{**model.__dict__, "name": dest_display, "modified_at": _now()})
            self.fake.models[dest_key] = copy
        self._send(200, b"")

    def _digest(self, path: str) -> str:
        digest = path[len("/api/blobs/"):]
        if not DIGEST_RE.match(digest):
            raise BadRequest(400, "invalid digest format")
        return "sha256:" + digest[7:]

    def _blob_head(self, path: str, raw: bytes) -> None:
        digest = self._digest(path)
        with self.fake.lock:
            present = digest in self.fake.blobs
        if present:
            self._send(200, b"")
        else:
            self._error(404, f'blob "{digest}" not found')

    def _blob_post(self, path: str, raw: bytes) -> None:
        headers = dict(self.headers)
        try:
            digest = self._digest(path)
        except BadRequest:
            self.fake.record(RecordedRequest("POST", path, None, 0, headers))
            raise
        with self.fake.lock:
            present = digest in self.fake.blobs
        if present:
            # The real server answers without reading the body; the connection cannot be reused.
            self.fake.record(RecordedRequest("POST", path, None, 0, headers))
            self._send(200, b"", close=True)
            return
        data = self._read_body()
        self.fake.record(RecordedRequest("POST", path, None, len(data), headers))
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        with self.fake.lock:
            self.fake.blobs[actual] = data  # the real server keeps the bytes under their real digest
        if actual != digest:
            raise BadRequest(400, f'digest mismatch, expected "{digest}", got "{actual}"')
        self._send(201, b"")

    def _create(self, path: str, raw: bytes) -> None:
        body = self._parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest(400, "json: cannot unmarshal into api.CreateRequest")
        stream = body.get("stream", True) is not False
        lines, error, model = self.fake.create(body)
        if model is not None and self.fake.fault != "reset":
            key, _ = canonical_name(model.name)
            with self.fake.lock:
                self.fake.models[key] = model
        if self.fake.fault == "reset":
            self._stream(lines, reset_after=1)
            return
        if not stream:
            if error is not None:
                raise error
            self._json(200, lines[-1])
            return
        if error is not None and not lines:
            raise error
        if error is not None:
            lines = [*lines, {"error": error.error}]
        self._stream(lines)

    def _chat(self, path: str, raw: bytes) -> None:
        body = self._parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest(400, "json: cannot unmarshal into api.ChatRequest")
        model, content, reason = self.fake.chat_response(body)
        stream = body.get("stream", True) is not False
        created = _now()
        final = {"model": model.name, "created_at": created,
                 "message": {"role": "assistant", "content": "" if stream else content},
                 "done": True, "done_reason": reason}
        if reason in ("stop", "length"):
            final.update(total_duration=812_000_000, load_duration=15_000_000, prompt_eval_count=42,
                         prompt_eval_duration=120_000_000, eval_count=17, eval_duration=600_000_000)
        if self.fake.fault == "reset":
            if stream:
                self._stream([{"model": model.name, "created_at": created,
                               "message": {"role": "assistant", "content": content[:5]}, "done": False},
                              final], reset_after=1)
            else:
                data = json.dumps(final).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self._reset()
            return
        if body.get("logprobs") is True and reason in ("stop", "length"):
            probs = self.fake.probs_responder(model.name, body["messages"]) if self.fake.probs_responder else None
            final["logprobs"] = token_logprobs(content, probs, int(body.get("top_logprobs", 0)))
            if self.fake.logprobs_edit is not None:
                final["logprobs"] = self.fake.logprobs_edit(final["logprobs"])
        if not stream:
            self._json(200, final)
            return
        half = len(content) // 2
        chunks = [{"model": model.name, "created_at": created,
                   "message": {"role": "assistant", "content": part}, "done": False}
                  for part in (content[:half], content[half:]) if part]
        self._stream([*chunks, final])


@pytest.fixture
def fake_ollama():
    """A started fake Ollama server seeded with llama3.2:1b, gemma2:2b and qwen2.5:0.5b."""
    fake = FakeOllama()
    fake.add_model("llama3.2:1b", architecture="llama", quantization="Q4_K_M", parameter_size="1.2B")
    fake.add_model("gemma2:2b", architecture="gemma2", quantization="Q4_0", parameter_size="2.6B",
                   parameters={"stop": ["<end_of_turn>"]})
    fake.add_model("qwen2.5:0.5b", architecture="qwen2", quantization="Q4_K_M", parameter_size="494.03M",
                   parameters={"stop": ["<|im_end|>"]})
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
