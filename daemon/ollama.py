"""The Ollama HTTP client: base URL resolution, typed errors, timeouts and bounded retries.

Built on ``requests`` only. Every call passes a (connect, read) timeout from ``OllamaConfig``; no call
waits or retries forever. Failures become ``OllamaError`` (HTTP status, the server's ``error`` text
truncated, and a hint) or ``OllamaUnavailableError`` (no usable answer: refused, reset, timed out).
Retry policy: calls without side effects (version, tags, show, HEAD blob, delete, chat with the
caller's options) retry connection errors, timeouts and 5xx with capped exponential backoff,
``retries`` extra attempts at most. ``create`` and the blob POST are retried only when the
connection was refused, i.e. the request provably never reached the server, because a create that
timed out may still be running there. The blob POST is content-addressed, so a retry is harmless, but
it is large, so it follows the same rule. Request and response bodies are never logged: chat
messages and few-shot examples hold patient text. This module knows nothing about jobs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from .config import OllamaConfig
from .errors import OllamaError, OllamaUnavailableError
from .fsutil import HASH_CHUNK, sha256_file
from .logconfig import get_logger

log = get_logger("ollama")

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
SERVER_ERROR_MAX_CHARS = 300
USER_AGENT = "fine-tuner (requests)"


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


def _server_error_text(resp: requests.Response) -> str:
    """The ``error`` field of an error body, else the raw body (gin's plain-text 404/405)."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return resp.text


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


# --- the client --------------------------------------------------------------------------------

class OllamaClient:
    """One Ollama server. Use as a context manager, or call ``close()``, to release connections."""

    def __init__(self, cfg: OllamaConfig, *, env: Mapping[str, str] = os.environ,
                 session: requests.Session | None = None) -> None:
        self.cfg = cfg
        self.base_url = resolve_base_url(cfg.host, env)
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()
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

    def _timeout(self, long: bool = False) -> tuple[float, float]:
        read = self.cfg.create_timeout_s if long else self.cfg.read_timeout_s
        return (self.cfg.connect_timeout_s, read)

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.backoff_s * (2 ** attempt), self.cfg.backoff_max_s)

    def _request(self, method: str, path: str, *, json_body: Any = None,
                 data: Callable[[], Any] | None = None, what: str = "the request",
                 idempotent: bool = True, long: bool = False, stream: bool = False) -> requests.Response:
        """Send one request with retries as the module docstring describes; a response with status
        >= 400 raises ``OllamaError``. ``data`` is a factory so that a retry sends a fresh body."""
        url = self.base_url + path
        attempts = 1 + max(0, self.cfg.retries)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self.session.request(method, url, json=json_body,
                                            data=data() if data is not None else None,
                                            timeout=self._timeout(long), stream=stream)
            except requests.RequestException as exc:
                if not last and (idempotent or _never_sent(exc)):
                    self._log_retry(method, path, attempt, type(exc).__name__, None)
                    continue
                raise self._unavailable(method, path, exc) from None
            if resp.status_code >= 500 and idempotent and not last:
                resp.close()
                self._log_retry(method, path, attempt, "server_error", resp.status_code)
                continue
            if resp.status_code >= 400:
                raise self._status_error(method, path, resp, what)
            return resp
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _log_retry(self, method: str, path: str, attempt: int, reason: str, status: int | None) -> None:
        delay = self._backoff(attempt)
        log.info("ollama_retry", method=method, path=path, attempt=attempt + 1, reason=reason,
                 status=status, delay_s=delay)
        time.sleep(delay)

    def _unavailable(self, method: str, path: str, exc: requests.RequestException) -> OllamaUnavailableError:
        if isinstance(exc, requests.exceptions.Timeout):
            why = "timed out"
            hint = ("Ollama did not answer in time: check the server's load, or raise "
                    "ollama.read_timeout_s / ollama.create_timeout_s")
        else:
            why = ("refused the connection" if _never_sent(exc)
                   else "closed or reset the connection before a complete answer")
            hint = (f"start Ollama (ollama serve / systemctl start ollama) and check that it listens on "
                    f"{self.base_url} (ollama.host or OLLAMA_HOST)")
        log.warning("ollama_unavailable", method=method, path=path, error_class=type(exc).__name__)
        return OllamaUnavailableError(f"Ollama at {self.base_url} {why} ({method} {path})", hint=hint)

    def _status_error(self, method: str, path: str, resp: requests.Response, what: str) -> OllamaError:
        server_error = _truncate(_server_error_text(resp))
        resp.close()
        log.warning("ollama_error", method=method, path=path, status=resp.status_code)
        return OllamaError(f"Ollama answered {resp.status_code} to {method} {path}: {server_error}",
                           status=resp.status_code, server_error=server_error,
                           hint=_hint_for_status(resp.status_code, what))

    def _json(self, resp: requests.Response, method: str, path: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise OllamaError(f"Ollama answered {method} {path} with a body that is not JSON",
                              status=resp.status_code,
                              hint=f"check that {self.base_url} is an Ollama server (ollama.host / OLLAMA_HOST)") from None

    def _json_object(self, resp: requests.Response, method: str, path: str, key: str | None = None) -> dict:
        data = self._json(resp, method, path)
        if not isinstance(data, dict) or (key is not None and key not in data):
            raise OllamaError(f"Ollama answered {method} {path} with unexpected JSON"
                              + (f" (no {key!r})" if key else ""), status=resp.status_code,
                              hint=f"check that {self.base_url} is an Ollama server of a supported version")
        return data

    # --- calls ---------------------------------------------------------------------------------

    def version(self) -> str:
        resp = self._request("GET", "/api/version")
        return str(self._json_object(resp, "GET", "/api/version", "version")["version"])

    def is_reachable(self) -> bool:
        """One quick ``/api/version`` probe without retries; never raises."""
        try:
            resp = self.session.get(self.base_url + "/api/version", timeout=self._timeout())
            ok = resp.status_code == 200 and isinstance(resp.json(), dict)
            resp.close()
            return ok
        except (requests.RequestException, ValueError):
            return False

    def list_models(self) -> list[dict]:
        resp = self._request("GET", "/api/tags")
        models = self._json_object(resp, "GET", "/api/tags", "models")["models"]
        return list(models or [])

    def show(self, model: str) -> dict:
        """Model details; an unknown model raises ``OllamaError`` with ``status == 404``."""
        resp = self._request("POST", "/api/show", json_body={"model": model}, what=f"model {model!r}")
        return self._json_object(resp, "POST", "/api/show")

    def blob_exists(self, digest: str) -> bool:
        try:
            self._request("HEAD", f"/api/blobs/{digest}", what="the blob")
        except OllamaError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def upload_blob(self, path: str | os.PathLike) -> str:
        """Upload a file as a blob, streamed from disk; returns ``"sha256:<hex>"``. A file the server
        already holds is not sent again."""
        path = Path(path)
        digest = "sha256:" + sha256_file(path)
        if self.blob_exists(digest):
            log.info("ollama_blob_present", digest=digest, size_bytes=path.stat().st_size)
            return digest
        started = time.monotonic()
        body = (lambda: _FileChunks(path)) if path.stat().st_size else (lambda: b"")
        resp = self._request("POST", f"/api/blobs/{digest}", data=body, what="the blob",
                             idempotent=False, long=True)
        resp.close()
        log.info("ollama_blob_uploaded", digest=digest, size_bytes=path.stat().st_size,
                 duration_s=round(time.monotonic() - started, 3))
        return digest

    def create(self, model: str, *, from_: str | None = None, files: Mapping[str, str] | None = None,
               adapters: Mapping[str, str] | None = None, system: str | None = None,
               messages: list[dict] | None = None, parameters: Mapping[str, Any] | None = None,
               template: str | None = None,
               on_status: Callable[[dict], None] | None = None) -> dict:
        """Create (or replace) ``model``; streams the NDJSON status lines to ``on_status`` and returns
        the final one. An ``{"error": ...}`` line inside the 200 stream raises ``OllamaError``."""
        body: dict[str, Any] = {"model": model, "stream": True}
        for key, value in (("from", from_), ("files", files), ("adapters", adapters), ("system", system),
                           ("messages", messages), ("parameters", parameters), ("template", template)):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        path = "/api/create"
        resp = self._request("POST", path, json_body=body, what=f"the base model {from_!r}",
                             idempotent=False, long=True, stream=True)
        final: dict | None = None
        try:
            for status in self._ndjson(resp, "POST", path):
                if "error" in status:
                    server_error = _truncate(str(status["error"]))
                    log.warning("ollama_create_failed", model=model, status=resp.status_code)
                    raise OllamaError(f"Ollama could not create {model!r}: {server_error}",
                                      status=resp.status_code, server_error=server_error,
                                      hint="read the server's error text; check the base model and the uploaded files")
                final = status
                if on_status is not None:
                    on_status(status)
        finally:
            resp.close()
        if final is None or final.get("status") != "success":
            raise OllamaUnavailableError(f"Ollama's create stream for {model!r} ended before success",
                                         hint="the server may have stopped; check its log and retry")
        return final

    def _ndjson(self, resp: requests.Response, method: str, path: str) -> Iterator[dict]:
        try:
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise OllamaError(f"Ollama sent a line that is not JSON in the {method} {path} stream",
                                      status=resp.status_code,
                                      hint=f"check that {self.base_url} is an Ollama server") from None
                if not isinstance(item, dict):
                    raise OllamaError(f"Ollama sent unexpected JSON in the {method} {path} stream",
                                      status=resp.status_code, hint="check the Ollama server version")
                yield item
        except requests.RequestException as exc:
            raise self._unavailable(method, path, exc) from None

    def chat(self, model: str, messages: list[dict], *, format: str | dict | None = None,
             options: Mapping[str, Any] | None = None) -> dict:
        """One non-streaming chat; the response object (answer in ``["message"]["content"]``).
        Retried like the read-only calls: a chat has no side effect on the server."""
        body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": False}
        if format is not None:
            body["format"] = format
        if options is not None:
            body["options"] = dict(options)
        path = "/api/chat"
        resp = self._request("POST", path, json_body=body, what=f"model {model!r}")
        data = self._json_object(resp, "POST", path, "message")
        if not isinstance(data["message"], dict):
            raise OllamaError("Ollama answered POST /api/chat with unexpected JSON (message is not an object)",
                              status=resp.status_code, hint="check the Ollama server version")
        return data

    def delete(self, model: str) -> None:
        """Delete ``model``; unknown raises ``OllamaError`` with ``status == 404``."""
        resp = self._request("DELETE", "/api/delete", json_body={"model": model}, what=f"model {model!r}")
        resp.close()
