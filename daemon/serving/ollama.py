"""The Ollama HTTP client: base URL resolution, typed errors, a total deadline per call, bounded
retries, and a short memory of servers that did not answer.

Built on ``requests`` only. Failures become ``OllamaError`` (HTTP status, the server's ``error`` text
truncated, and a hint) or ``OllamaUnavailableError`` (no usable answer: refused, reset, timed out).

Deadline: a call (one method of the client: one request, its retries and backoff sleeps, and the
reading of its whole answer, a create's status stream included) ends within
``connect_timeout_s + read_timeout_s`` of its start, ``connect_timeout_s + create_timeout_s`` for
``create`` and the blob upload. requests' own read timeout bounds each socket read only, so a server
trickling a byte now and then would hold a call forever; at the deadline the call's connection is
shut down, which ends a blocked read at once, and every answer is read in bounded pieces with the
deadline checked between them, which ends a server sending without pause; the call then raises the
usual timed-out ``OllamaUnavailableError``. Each attempt's connect and read timeouts are capped by
the time left. (The pieces live in ``serving.http``, for every model server client.)

What a server can send: an answer larger than ``max_response_bytes`` (announced, or read so far; for
the create stream, one status line) is an ``OllamaError`` naming the call and the setting, never
retried; a redirect (3xx) is never followed (it would send the request, records included, to another
server) and is an ``OllamaError`` naming the status and the configured host; every JSON answer is
checked for the shape the caller uses (JSON nested too deeply, or an answer of the wrong shape, is
an ``OllamaError`` naming the call), so callers may index what they are given.

Retry policy: calls without side effects (version, tags, show, HEAD blob, delete, chat with the
caller's options) retry connection errors, timeouts and 5xx with capped exponential backoff,
``retries`` extra attempts at most. ``create`` and the blob POST are retried only when the
connection was refused, i.e. the request provably never reached the server, because a create that
timed out may still be running there. The blob POST is content-addressed, so a retry is harmless, but
it is large, so it follows the same rule. Retries live inside the call's deadline: a retry is made
only when its backoff sleep ends before the deadline, so more retries never make a call longer.

Unreachable memory: clients that share an ``UnreachableMemory`` remember, per base URL, a call that
ended in ``OllamaUnavailableError``; for ``ttl_s`` seconds (``UNREACHABLE_TTL_S``) after it, their
calls to that server raise ``OllamaUnavailableError`` at once, without a connection, instead of
waiting again. A client without one (the default) remembers nothing. Request and response bodies
are never logged: chat messages and few-shot examples hold patient text. This module knows nothing
about jobs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from ..config import OllamaConfig
from ..errors import OllamaError, OllamaUnavailableError
from ..fsutil import HASH_CHUNK, sha256_file
from ..logconfig import get_logger
from .http import (
    ERROR_BODY_MAX_BYTES,
    AnswerTimedOut,
    AnswerTooLarge,
    Deadline,
    DeadlineAdapter,
    NotJSON,
    is_redirect,
    items_problem,
    iter_lines,
    parse_json,
    read_body,
    read_prefix,
    refuse_redirects,
    shape_problem,
    under,
)

log = get_logger("ollama")

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
SERVER_ERROR_MAX_CHARS = 300
USER_AGENT = "fine-tuner (requests)"
UNREACHABLE_TTL_S = 30.0

# the shapes of the answers read (see http.shape_problem): the keys callers use, with their JSON types
VERSION_FIELDS = {"version": str}
TAGS_FIELDS = {"models": (list, type(None))}
TAG_FIELDS = {"name": str, "model": str, "digest": str}
SHOW_FIELDS = {"modelfile": str, "details": dict, "model_info": dict}
CHAT_FIELDS = {"message": dict}
CHAT_MESSAGE_FIELDS = {"content": str}
CREATE_STATUS_FIELDS = {"status": str}


# --- base URL ----------------------------------------------------------------------------------

def parse_host(value: str | None) -> str:
    """Normalise a host the way the official Python client's ``_parse_host`` does (reference §1):
    default scheme http, default port 11434 (80 for ``http://``, 443 for ``https://``), empty host
    127.0.0.1, path kept without its trailing slash, IPv6 in brackets."""
    value = (value or "").strip()
    port = DEFAULT_PORT
    scheme, _, hostport = value.partition("://")
    if not hostport:
        scheme, hostport = "http", value
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
    host = split.hostname or "127.0.0.1"
    try:
        port = split.port or port
    except ValueError:
        raise OllamaError(f"ollama host {value!r} has an invalid port",
                          hint="set ollama.host or OLLAMA_HOST to host[:port], e.g. 127.0.0.1:11434") from None
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}/{path}" if path else f"{scheme}://{host}:{port}"


def resolve_base_url(cfg_host: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The configured ``ollama.host`` wins, then ``OLLAMA_HOST``, then the default server."""
    return parse_host(cfg_host or env.get("OLLAMA_HOST"))


# --- errors ------------------------------------------------------------------------------------

def _truncate(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text if len(text) <= SERVER_ERROR_MAX_CHARS else text[:SERVER_ERROR_MAX_CHARS] + "..."


def _server_error_text(body: bytes) -> str:
    """The ``error`` field of an error body, else the raw body (gin's plain-text 404/405)."""
    try:
        data = parse_json(body)
    except NotJSON:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return body.decode("utf-8", errors="replace")


def _hint_for_status(status: int, what: str) -> str:
    if status == 404:
        return f"{what} is not on the server: pull or create it first (ollama pull <model>), or fix the name"
    if status == 400:
        return "the server rejected the request; read the server's error text"
    if status in (401, 403):
        return "the server refused access; check OLLAMA_API_KEY or the host setting"
    if status >= 500:
        return "the Ollama server failed; read its log (journalctl -u ollama) and retry"
    return "read the server's error text"


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection could not be opened, so the server never saw the request."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    text = repr(exc)
    return "NewConnectionError" in text or "Connection refused" in text


class _FileChunks:
    """An upload body read from disk in ``HASH_CHUNK`` pieces; ``__len__`` lets requests send a
    Content-Length instead of chunked encoding."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                yield chunk


# --- the unreachable memory ----------------------------------------------------------------------

class UnreachableMemory:
    """Servers (by base URL) whose last call got no usable answer, each kept for ``ttl_s`` seconds
    from that failure. Thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, ttl_s: float = UNREACHABLE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[float, OllamaUnavailableError]] = {}

    def remember(self, base_url: str, error: OllamaUnavailableError) -> None:
        with self._lock:
            self._failed[base_url] = (self._clock(), error)

    def recall(self, base_url: str) -> tuple[OllamaUnavailableError, float] | None:
        """(the failure, its age in seconds) while it is remembered, else None."""
        with self._lock:
            hit = self._failed.get(base_url)
            if hit is None:
                return None
            age = self._clock() - hit[0]
            if age >= self.ttl_s:
                del self._failed[base_url]
                return None
            return hit[1], age


class _Call:
    """One call in progress: what it asks for (for messages and logs) and its deadline."""

    def __init__(self, method: str, path: str, deadline: Deadline, long: bool) -> None:
        self.method, self.path, self.deadline, self.long = method, path, deadline, long


# --- the client --------------------------------------------------------------------------------

class OllamaClient:
    """One Ollama server. Use as a context manager, or call ``close()``, to release connections.
    ``memory``: an ``UnreachableMemory`` shared with other clients (one job's), or None."""

    def __init__(self, cfg: OllamaConfig, *, env: Mapping[str, str] = os.environ,
                 session: requests.Session | None = None, memory: UnreachableMemory | None = None) -> None:
        self.cfg = cfg
        self.base_url = resolve_base_url(cfg.host, env)
        self.memory = memory
        self._own_session = session is None
        self.session = refuse_redirects(session if session is not None else requests.Session())
        self.session.mount(self.base_url + "/", DeadlineAdapter())
        self.session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        api_key = env.get("OLLAMA_API_KEY")
        if api_key and "Authorization" not in self.session.headers:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> OllamaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.backoff_s * (2 ** attempt), self.cfg.backoff_max_s)

    @contextlib.contextmanager
    def _call(self, method: str, path: str, *, long: bool = False) -> Iterator[_Call]:
        """Run one call under its deadline (see the module docstring); a server remembered as
        unreachable fails at once, and an ``OllamaUnavailableError`` is remembered."""
        if self.memory is not None:
            hit = self.memory.recall(self.base_url)
            if hit is not None:
                raise self._remembered(method, path, *hit)
        deadline = Deadline(self.cfg.connect_timeout_s,
                            self.cfg.create_timeout_s if long else self.cfg.read_timeout_s)
        call = _Call(method, path, deadline, long)
        with under(deadline):
            try:
                try:
                    yield call
                except OllamaUnavailableError:
                    raise
                except OllamaError:
                    # an answer cut at the deadline can look malformed (not JSON, a stream ended early)
                    if deadline.expired.is_set():
                        raise self._timed_out(call, "deadline") from None
                    raise
            except OllamaUnavailableError as exc:
                if self.memory is not None:
                    self.memory.remember(self.base_url, exc)
                raise

    def _request(self, call: _Call, *, json_body: Any = None, data: Callable[[], Any] | None = None,
                 what: str = "the request", idempotent: bool = True,
                 retries: int | None = None) -> requests.Response:
        """Send one request with retries as the module docstring describes; a redirect or a response
        with status >= 400 raises ``OllamaError``. ``data`` is a factory so that a retry sends a
        fresh body. The answer is not read yet: read it with ``_read``, ``_answer`` or ``_lines``."""
        url = self.base_url + call.path
        deadline = call.deadline
        attempts = 1 + max(0, self.cfg.retries if retries is None else retries)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            if deadline.left_s() <= 0:
                raise self._timed_out(call, "deadline")
            try:
                resp = self.session.request(call.method, url, json=json_body,
                                            data=data() if data is not None else None,
                                            timeout=deadline.timeouts(), stream=True,
                                            allow_redirects=False)
            except requests.RequestException as exc:
                if deadline.expired.is_set():
                    raise self._timed_out(call, "deadline") from None
                if not last and (idempotent or _never_sent(exc)) and self._retry(call, attempt,
                                                                                 type(exc).__name__, None):
                    continue
                raise self._unavailable(call, exc) from None
            if (resp.status_code >= 500 and idempotent and not last
                    and self._retry(call, attempt, "server_error", resp.status_code, resp)):
                continue
            if is_redirect(resp.status_code):
                raise self._redirected(call, resp)
            if resp.status_code >= 400:
                raise self._status_error(call, resp, what)
            return resp
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _retry(self, call: _Call, attempt: int, reason: str, status: int | None,
               resp: requests.Response | None = None) -> bool:
        """Sleep the backoff and say True, or say False when the sleep would not end before the
        call's deadline (then the last error stands)."""
        delay = self._backoff(attempt)
        if delay >= call.deadline.left_s():
            return False
        if resp is not None:
            resp.close()
        log.info("ollama_retry", method=call.method, path=call.path, attempt=attempt + 1, reason=reason,
                 status=status, delay_s=delay)
        time.sleep(delay)
        return True

    def _timed_out(self, call: _Call, error_class: str) -> OllamaUnavailableError:
        setting = "create_timeout_s" if call.long else "read_timeout_s"
        log.warning("ollama_unavailable", method=call.method, path=call.path, error_class=error_class,
                    deadline_s=call.deadline.total_s)
        return OllamaUnavailableError(
            f"Ollama at {self.base_url} timed out ({call.method} {call.path})",
            hint=f"Ollama did not answer completely within {call.deadline.total_s:g} s "
                 f"(ollama.connect_timeout_s + ollama.{setting}): check the server's load, or raise "
                 f"ollama.read_timeout_s / ollama.create_timeout_s")

    def _unavailable(self, call: _Call, exc: requests.RequestException) -> OllamaUnavailableError:
        if call.deadline.expired.is_set() or isinstance(exc, requests.exceptions.Timeout):
            return self._timed_out(call, type(exc).__name__)
        why = ("refused the connection" if _never_sent(exc)
               else "closed or reset the connection before a complete answer")
        log.warning("ollama_unavailable", method=call.method, path=call.path, error_class=type(exc).__name__)
        return OllamaUnavailableError(
            f"Ollama at {self.base_url} {why} ({call.method} {call.path})",
            hint=f"start Ollama (ollama serve / systemctl start ollama) and check that it listens on "
                 f"{self.base_url} (ollama.host or OLLAMA_HOST)")

    def _remembered(self, method: str, path: str, first: OllamaUnavailableError,
                    age_s: float) -> OllamaUnavailableError:
        ttl = self.memory.ttl_s if self.memory is not None else UNREACHABLE_TTL_S
        log.warning("ollama_unavailable_remembered", method=method, path=path, age_s=round(age_s, 3),
                    ttl_s=ttl)
        return OllamaUnavailableError(
            f"{first.message}; {method} {path} was not sent: a server that did not answer is not asked "
            f"again for {ttl:g} s", hint=first.hint)

    def _redirected(self, call: _Call, resp: requests.Response) -> OllamaError:
        """A 3xx: never followed, and its Location (another server, maybe with a query) not repeated."""
        resp.close()
        log.warning("ollama_error", method=call.method, path=call.path, status=resp.status_code)
        return OllamaError(
            f"Ollama at {self.base_url} answered {resp.status_code} (a redirect) to {call.method} {call.path}; "
            f"redirects are never followed", status=resp.status_code,
            hint="set ollama.host (or OLLAMA_HOST) to the address of the Ollama server itself: following a "
                 "redirect would send the request, records included, to another server")

    def _status_error(self, call: _Call, resp: requests.Response, what: str) -> OllamaError:
        """An error status; of its body only the first ``ERROR_BODY_MAX_BYTES`` are read, within
        the deadline, for the server's error text."""
        try:
            body = read_prefix(resp, limit=ERROR_BODY_MAX_BYTES, deadline=call.deadline)
        except (AnswerTimedOut, requests.RequestException):
            body = b""
        finally:
            resp.close()
        server_error = _truncate(_server_error_text(body))
        log.warning("ollama_error", method=call.method, path=call.path, status=resp.status_code)
        return OllamaError(f"Ollama answered {resp.status_code} to {call.method} {call.path}: {server_error}",
                           status=resp.status_code, server_error=server_error,
                           hint=_hint_for_status(resp.status_code, what))

    def _too_large(self, call: _Call, exc: AnswerTooLarge, status: int, line: bool = False) -> OllamaError:
        limit = self.cfg.max_response_bytes
        log.warning("ollama_error", method=call.method, path=call.path, status=status, size_bytes=exc.size,
                    max_response_bytes=limit)
        if exc.announced:
            message = (f"Ollama's answer to {call.method} {call.path} announces {exc.size} bytes, more than "
                       f"ollama.max_response_bytes ({limit}); it was not read")
        else:
            what = f"a line of Ollama's {call.method} {call.path} stream" if line else \
                f"Ollama's answer to {call.method} {call.path}"
            message = f"{what} is larger than ollama.max_response_bytes ({limit}); reading stopped there"
        return OllamaError(message, status=status,
                           hint=f"check that {self.base_url} is an Ollama server (its answers are a few KB), "
                                f"or raise ollama.max_response_bytes")

    @contextlib.contextmanager
    def _reading(self, call: _Call, resp: requests.Response, line: bool = False) -> Iterator[None]:
        """Turn what can go wrong while an answer is read into the client's errors; the response is
        closed afterwards."""
        try:
            yield
        except AnswerTooLarge as exc:
            raise self._too_large(call, exc, resp.status_code, line) from None
        except AnswerTimedOut:
            raise self._timed_out(call, "deadline") from None
        except requests.RequestException as exc:
            raise self._unavailable(call, exc) from None
        finally:
            resp.close()

    def _read(self, call: _Call, resp: requests.Response) -> bytes:
        """The whole answer, within the cap and the call's deadline."""
        with self._reading(call, resp):
            return read_body(resp, limit=self.cfg.max_response_bytes, deadline=call.deadline)

    def _not_json(self, message: str, status: int) -> OllamaError:
        return OllamaError(message, status=status,
                           hint=f"check that {self.base_url} is an Ollama server (ollama.host / OLLAMA_HOST)")

    def _wrong_shape(self, message: str, status: int) -> OllamaError:
        return OllamaError(message, status=status,
                           hint=f"check that {self.base_url} is an Ollama server of a supported version")

    def _answer(self, call: _Call, resp: requests.Response, fields: Mapping[str, Any] | None = None,
                required: tuple[str, ...] = ()) -> dict:
        """The answer as a JSON object whose ``fields`` have the expected types (see
        ``http.shape_problem``); ``OllamaError`` naming the call otherwise."""
        raw = self._read(call, resp)
        try:
            data = parse_json(raw)
        except NotJSON as exc:
            raise self._not_json(f"Ollama answered {call.method} {call.path} with a body that {exc.reason}",
                                 resp.status_code) from None
        problem = shape_problem(data, fields or {}, required)
        if problem is not None:
            raise self._wrong_shape(f"Ollama answered {call.method} {call.path} with unexpected JSON ({problem})",
                                    resp.status_code)
        return data

    def _lines(self, call: _Call, resp: requests.Response,
               fields: Mapping[str, Any] | None = None) -> Iterator[dict]:
        """The JSON objects of an NDJSON stream, each line within the cap, the whole stream within
        the call's deadline."""
        with self._reading(call, resp, line=True):
            for line in iter_lines(resp, limit=self.cfg.max_response_bytes, deadline=call.deadline):
                if not line.strip():
                    continue
                try:
                    item = parse_json(line)
                except NotJSON as exc:
                    raise self._not_json(f"Ollama sent a line that {exc.reason} in the {call.method} {call.path} "
                                         f"stream", resp.status_code) from None
                problem = shape_problem(item, fields or {}, what="the line")
                if problem is not None:
                    raise self._wrong_shape(f"Ollama sent unexpected JSON in the {call.method} {call.path} stream "
                                            f"({problem})", resp.status_code)
                yield item

    # --- calls ---------------------------------------------------------------------------------

    def version(self) -> str:
        with self._call("GET", "/api/version") as call:
            return self._answer(call, self._request(call), VERSION_FIELDS, required=("version",))["version"]

    def is_reachable(self) -> bool:
        """One quick ``/api/version`` probe without retries, under the same deadline; never raises."""
        try:
            with self._call("GET", "/api/version") as call:
                self._answer(call, self._request(call, retries=0), VERSION_FIELDS, required=("version",))
        except OllamaError:
            return False
        return True

    def list_models(self) -> list[dict]:
        """The ``/api/tags`` entries, each an object whose ``name``, ``model`` and ``digest`` are
        strings when present."""
        with self._call("GET", "/api/tags") as call:
            resp = self._request(call)
            models = self._answer(call, resp, TAGS_FIELDS, required=("models",))["models"] or []
            problem = items_problem(models, TAG_FIELDS, "models")
            if problem is not None:
                raise self._wrong_shape(f"Ollama answered GET /api/tags with unexpected JSON ({problem})",
                                        resp.status_code)
        return list(models)

    def show(self, model: str) -> dict:
        """Model details; an unknown model raises ``OllamaError`` with ``status == 404``."""
        with self._call("POST", "/api/show") as call:
            resp = self._request(call, json_body={"model": model}, what=f"model {model!r}")
            return self._answer(call, resp, SHOW_FIELDS)

    def blob_exists(self, digest: str) -> bool:
        with self._call("HEAD", f"/api/blobs/{digest}") as call:
            try:
                self._read(call, self._request(call, what="the blob"))
            except OllamaError as exc:
                if exc.status == 404:
                    return False
                raise
        return True

    def upload_blob(self, path: str | os.PathLike) -> str:
        """Upload a file as a blob, streamed from disk; returns ``"sha256:<hex>"``. A file the server
        already holds is not sent again. The HEAD and the POST are two calls, each with its deadline."""
        path = Path(path)
        digest = "sha256:" + sha256_file(path)
        if self.blob_exists(digest):
            log.info("ollama_blob_present", digest=digest, size_bytes=path.stat().st_size)
            return digest
        started = time.monotonic()
        body = (lambda: _FileChunks(path)) if path.stat().st_size else (lambda: b"")
        with self._call("POST", f"/api/blobs/{digest}", long=True) as call:
            self._read(call, self._request(call, data=body, what="the blob", idempotent=False))
        log.info("ollama_blob_uploaded", digest=digest, size_bytes=path.stat().st_size,
                 duration_s=round(time.monotonic() - started, 3))
        return digest

    def create(self, model: str, *, from_: str | None = None, files: Mapping[str, str] | None = None,
               adapters: Mapping[str, str] | None = None, system: str | None = None,
               messages: list[dict] | None = None, parameters: Mapping[str, Any] | None = None,
               template: str | None = None,
               on_status: Callable[[dict], None] | None = None) -> dict:
        """Create (or replace) ``model``; streams the NDJSON status lines to ``on_status`` and returns
        the final one. An ``{"error": ...}`` line inside the 200 stream raises ``OllamaError``. The
        whole stream is read within the create deadline (connect + create timeout)."""
        body: dict[str, Any] = {"model": model, "stream": True}
        for key, value in (("from", from_), ("files", files), ("adapters", adapters), ("system", system),
                           ("messages", messages), ("parameters", parameters), ("template", template)):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        with self._call("POST", "/api/create", long=True) as call:
            resp = self._request(call, json_body=body, what=f"the base model {from_!r}", idempotent=False)
            final: dict | None = None
            try:
                for status in self._lines(call, resp, CREATE_STATUS_FIELDS):
                    if "error" in status:
                        server_error = _truncate(str(status["error"]))
                        log.warning("ollama_create_failed", model=model, status=resp.status_code)
                        raise OllamaError(f"Ollama could not create {model!r}: {server_error}",
                                          status=resp.status_code, server_error=server_error,
                                          hint="read the server's error text; "
                                               "check the base model and the uploaded files")
                    final = status
                    if on_status is not None:
                        on_status(status)
            finally:
                resp.close()
            if final is None or final.get("status") != "success":
                raise OllamaUnavailableError(f"Ollama's create stream for {model!r} ended before success",
                                             hint="the server may have stopped; check its log and retry")
        return final

    def chat(self, model: str, messages: list[dict], *, format: str | dict | None = None,
             options: Mapping[str, Any] | None = None, logprobs: int | None = None) -> dict:
        """One non-streaming chat; the response object (answer in ``["message"]["content"]``).
        Retried like the read-only calls: a chat has no side effect on the server. ``logprobs``:
        ask for each answer token's log-probability and this many alternatives (0-20), returned
        in ``["logprobs"]`` by servers that have them."""
        body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": False}
        if format is not None:
            body["format"] = format
        if options is not None:
            body["options"] = dict(options)
        if logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = int(logprobs)
        with self._call("POST", "/api/chat") as call:
            resp = self._request(call, json_body=body, what=f"model {model!r}")
            data = self._answer(call, resp, CHAT_FIELDS, required=("message",))
            problem = shape_problem(data["message"], CHAT_MESSAGE_FIELDS, path="message")
            if problem is not None:
                raise self._wrong_shape(f"Ollama answered POST /api/chat with unexpected JSON ({problem})",
                                        resp.status_code)
        return data

    def delete(self, model: str) -> None:
        """Delete ``model``; unknown raises ``OllamaError`` with ``status == 404``."""
        with self._call("DELETE", "/api/delete") as call:
            self._read(call, self._request(call, json_body={"model": model}, what=f"model {model!r}"))

    def copy(self, source: str, destination: str) -> None:
        """Copy ``source`` to the name ``destination`` (an alias; replaces what had that name); an
        unknown source raises ``OllamaError`` with ``status == 404``."""
        with self._call("POST", "/api/copy") as call:
            self._read(call, self._request(call, json_body={"source": source, "destination": destination},
                                           what=f"model {source!r}"))
