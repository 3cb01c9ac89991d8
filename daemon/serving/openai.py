"""The client of an OpenAI-compatible chat server (llama.cpp's ``llama-server``, vLLM, a hosted
API) at ``openai.base_url``: ``POST /chat/completions`` and ``GET /models``, with the defences of
``serving.http`` that the Ollama client has too.

``chat(model, messages, schema=..., seed=..., extra=...)`` sends the model name per request,
temperature 0, the seed and the answer's JSON Schema as ``response_format`` (``json_schema``,
strict), plus the caller's ``extra`` keys (llama.cpp's per-request ``"lora"`` list, for
instance), and returns ``choices[0].message.content``. The API key is read from the environment
variable that ``openai.api_key_env`` names and sent as ``Authorization: Bearer``; it is never part of
a message or a log line.

Deadline: a call (its attempts, the waits between them and the reading of the whole answer) ends
within ``connect_timeout_s + read_timeout_s`` of its start; answers are read in bounded pieces under
``max_response_bytes``, a redirect is never followed, and JSON is checked for the shape used.

Retries (at most ``retries`` more attempts, each only when its wait ends before the deadline): a 429
waits what its ``Retry-After`` (seconds or an HTTP date; OpenAI's ``retry-after-ms`` too) asks, at
most ``backoff_max_s``; a 5xx, a refused connection, a connect timeout and a server that closed the
connection before a complete answer wait ``backoff_s`` doubled each time, at most ``backoff_max_s``
(or the 5xx's own ``Retry-After``). A chat has no side effect on the server, so asking again is
safe. Everything else fails at once with one ``OpenAIError`` line saying what to do: 401/403 (the
key refused, or none sent), 404 (the model is not served), any other 4xx (the status only: a
server's error text may repeat the request, records included, so it is never shown), an answer
over the cap, a redirect, a body that is not JSON or of the wrong shape. Request and answer bodies
are never logged. A client holds one connection pool; use one client per thread.

Fine-tunes (``served_adapter``): a llama.cpp server started with the job's ``adapter.gguf``
(``GET /lora-adapters`` at the server's root names it) serves both the fine-tune and its base, each
request setting the adapter's scale (1 or 0) in its ``lora`` list; vLLM serves an adapter as a model
of its own (a ``GET /models`` entry whose ``root`` is the adapter's folder), or loads it on request
(``POST /load_lora_adapter``) when started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. A server
that has not loaded the adapter and cannot load it is a reason, never a silent rating with the base.
"""

from __future__ import annotations

import email.utils
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from ..config import OpenAIConfig
from ..errors import OpenAIError
from ..logconfig import get_logger
from ..outputs.names import ADAPTER_GGUF as GGUF_ADAPTER
from ..text import printable
from .http import (
    AnswerTimedOut,
    AnswerTooLarge,
    Deadline,
    DeadlineAdapter,
    NotJSON,
    is_redirect,
    items_problem,
    parse_json,
    read_body,
    refuse_redirects,
    shape_problem,
    under,
)

log = get_logger("openai")

CHAT_PATH = "/chat/completions"
MODELS_PATH = "/models"
LORA_ADAPTERS_PATH = "/lora-adapters"  # llama.cpp's, at the server's root (not under /v1)
LOAD_LORA_PATH = "/load_lora_adapter"  # vLLM's, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
ROOT_PATHS = (LORA_ADAPTERS_PATH,)
API_PREFIX = "/v1"
USER_AGENT = "fine-tuner (requests)"
SCHEMA_NAME = "rating"  # response_format.json_schema.name
MODELS_NAMED = 5  # served models named in a message, at most

# the shapes of the answers read (see http.shape_problem): the keys used, with their JSON types
CHAT_FIELDS = {"choices": list}
CHOICE_FIELDS = {"message": dict}
MESSAGE_FIELDS = {"content": (str, type(None))}
MODELS_FIELDS = {"data": list}
MODEL_FIELDS = {"id": str}
NOT_THE_API = "check that openai.base_url is the address of an OpenAI-compatible API (usually ending in /v1)"

_NEVER_SENT = ("NewConnectionError", "Connection refused")


def retry_after_s(headers: Mapping[str, str], cap: float, now: datetime | None = None) -> float | None:
    """How long an answer asks to wait before the next request, at most ``cap`` seconds: OpenAI's
    ``retry-after-ms``, else ``Retry-After`` as seconds or an HTTP date; None when it says nothing
    usable."""
    seconds: float | None = None
    with_ms = headers.get("retry-after-ms")
    if with_ms is not None:
        try:
            seconds = float(with_ms) / 1000
        except ValueError:
            seconds = None
    value = headers.get("Retry-After")
    if seconds is None and value is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection could not be opened, so the server never saw the request."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    return isinstance(exc, requests.exceptions.ConnectionError) and any(t in repr(exc) for t in _NEVER_SENT)


class _Retry(Exception):
    """An attempt that failed in a way that may pass: what happened (``what``, ``status``, ``hint``
    for the error that stands when no attempt is left), ``reason`` for the log, and the wait the
    server asked for (None: the backoff)."""

    def __init__(self, what: str, status: int | None, hint: str, reason: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.what, self.status, self.hint, self.reason, self.wait_s = what, status, hint, reason, wait_s


LORA_FIELDS = {"id": int, "path": str}


@dataclass(frozen=True)
class ServedAdapter:
    """How to ask a server for a fine-tune and for its base: the model names and the extra request
    keys (llama.cpp's per-request ``lora`` scales), and how it was found, in words."""

    how: str
    model: str
    extra: dict | None
    base_model: str
    base_extra: dict | None


def _same_file(path: str, ours: Path) -> bool:
    """``path`` (as the server names it) is ``ours``: the same file or folder on this machine, or a
    file with the same bytes (a server that copied the adapter)."""
    import hashlib

    theirs = Path(path)
    try:
        if theirs.exists() and os.path.samefile(theirs, ours):
            return True
        if theirs.is_file() and ours.is_file() and theirs.stat().st_size == ours.stat().st_size:
            digest = [hashlib.sha256(p.read_bytes()).digest() for p in (theirs, ours)]
            return digest[0] == digest[1]
    except OSError:
        return False
    return False


class OpenAIClient:
    """One OpenAI-compatible server. Use as a context manager, or call ``close()``, to release its
    connections. ``OpenAIError`` when ``openai.base_url`` is unset or ``openai.api_key_env`` names
    a variable that ``env`` does not hold."""

    def __init__(self, cfg: OpenAIConfig, *, env: Mapping[str, str] = os.environ,
                 session: requests.Session | None = None) -> None:
        self.cfg = cfg
        self.base_url = (cfg.base_url or "").strip().rstrip("/")
        if not self.base_url:
            raise OpenAIError("openai.base_url is not set",
                              hint="set openai.base_url (or FINE_TUNER_OPENAI__BASE_URL) to the server's API "
                                   "address, e.g. http://127.0.0.1:8080/v1")
        self.key_env = cfg.api_key_env or None
        key = env.get(self.key_env) if self.key_env else None
        if self.key_env and not key:
            raise OpenAIError(f"openai.api_key_env names the environment variable {self.key_env}, which is not set "
                              f"or empty",
                              hint=f"set {self.key_env} to the server's API key in the daemon's environment (the "
                                   f"unit's fine-tuner.env), or remove openai.api_key_env for a server without a key")
        self._own_session = session is None
        self.session = refuse_redirects(session if session is not None else requests.Session())
        self.session.mount(self.base_url + "/", DeadlineAdapter())
        self.session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ---------------------------------------------------------------------------------

    def chat(self, model: str, messages: list[dict], *, schema: Mapping | None = None, seed: int = 42,
             extra: Mapping[str, Any] | None = None) -> str | None:
        """One chat completion at temperature 0 with ``seed``; the answer's text
        (``choices[0].message.content``, None when the server sent none). ``schema``: the answer's
        JSON Schema, sent as a strict ``json_schema`` response format; ``extra``: more keys for the
        request body (they win over the ones above)."""
        return self.chat_scored(model, messages, schema=schema, seed=seed, extra=extra)[0]

    def chat_scored(self, model: str, messages: list[dict], *, schema: Mapping | None = None, seed: int = 42,
                    extra: Mapping[str, Any] | None = None, logprobs: int | None = None,
                    max_tokens: int | None = None) -> tuple[str | None, Any]:
        """``chat``, and with ``logprobs`` (the alternatives per token, 0-20) the answer tokens'
        log-probabilities as the server sent them (``choices[0].logprobs.content``, None if absent).
        ``max_tokens``: the longest answer (one that never closes is cut there, and is invalid)."""
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0, "seed": seed}
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        if logprobs is not None:
            body.update(logprobs=True, top_logprobs=int(logprobs))
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema}}
        if extra:
            body.update(extra)
        data, status = self._call("POST", CHAT_PATH, body, model)
        problem = shape_problem(data, CHAT_FIELDS, required=("choices",))
        choices = data.get("choices") if problem is None else None
        if problem is None and not choices:
            problem = "'choices' is an empty list"
        if problem is None:
            problem = (shape_problem(choices[0], CHOICE_FIELDS, required=("message",), what="choices[0]",
                                     path="choices[0]")
                       or shape_problem(choices[0]["message"], MESSAGE_FIELDS, path="choices[0]['message']"))
        if problem is not None:
            raise self._error("POST", CHAT_PATH, f"answered with unexpected JSON ({problem})", status, NOT_THE_API,
                              "wrong_shape")
        scores = choices[0].get("logprobs")
        return choices[0]["message"].get("content"), scores.get("content") if isinstance(scores, dict) else None

    def list_models(self) -> list[str]:
        """The ids of the models the server serves (``GET /models``)."""
        return [item["id"] for item in self.model_entries()]

    def model_entries(self) -> list[dict]:
        """``GET /models``'s entries (each has an ``id``; vLLM's LoRA modules also a ``root``, the
        adapter's folder, and a ``parent``, the base model's id)."""
        data, status = self._call("GET", MODELS_PATH)
        problem = shape_problem(data, MODELS_FIELDS, required=("data",))
        if problem is None:
            problem = items_problem(data["data"], MODEL_FIELDS, "data")
        if problem is None and any(not isinstance(item.get("id"), str) for item in data["data"]):
            problem = "an entry of 'data' has no 'id'"
        if problem is not None:
            raise self._error("GET", MODELS_PATH, f"answered with unexpected JSON ({problem})", status, NOT_THE_API,
                              "wrong_shape")
        return list(data["data"])

    def served_name(self, wanted: str | None, base: str) -> tuple[str | None, str | None]:
        """(the name to ask for, why there is none): ``wanted`` (``openai.model``) or ``base`` when the
        server lists it, else the one model a server like ``fine-tuner serve`` lists."""
        try:
            served = self.list_models()
        except OpenAIError as exc:
            return None, str(exc)
        for name in (wanted, None if wanted else base):
            if name and name in served:
                return name, None
        if not wanted and len(served) == 1:
            return served[0], None
        listed = ", ".join(repr(printable(name, 80)) for name in served[:MODELS_NAMED])
        more = f" and {len(served) - MODELS_NAMED} more" if len(served) > MODELS_NAMED else ""
        return None, (f"the server at {self.base_url} does not list the model {wanted or base!r} (it lists "
                      f"{listed + more if served else 'none'}); set openai.model to the name it serves the model under")

    def served_adapter(self, adapter_dir: Path, served: str, load_as: str) -> ServedAdapter | str:
        """How to ask this server for a fine-tune whose PEFT adapter is ``adapter_dir`` (with
        ``adapter.gguf`` inside) and for its base, or why it cannot serve it. llama.cpp: the server
        was started with the adapter (``--lora``, as ``fine-tuner serve`` does) and each request
        sets its scale (1 for the fine-tune, 0 for the base). vLLM: a LoRA module whose folder is
        ``adapter_dir`` (``--lora-modules NAME=DIR``), else loaded now as ``load_as`` through
        ``/load_lora_adapter`` when the server allows it."""
        gguf = adapter_dir / GGUF_ADAPTER
        try:
            data, status = self._call("GET", LORA_ADAPTERS_PATH)
        except OpenAIError as exc:
            if exc.status != 404:
                return str(exc)
        else:
            problem = (items_problem(data, LORA_FIELDS, "the adapter list") if isinstance(data, list)
                       else "it is not a list")
            if problem is not None:
                raise self._error("GET", LORA_ADAPTERS_PATH, f"answered with unexpected JSON ({problem})", status,
                                  NOT_THE_API, "wrong_shape")
            ids = [item["id"] for item in data]
            for item in data:
                if _same_file(item["path"], gguf):
                    return ServedAdapter(
                        f"llama.cpp LoRA adapter {item['id']}", served,
                        {"lora": [{"id": i, "scale": 1.0 if i == item["id"] else 0.0} for i in ids]},
                        served, {"lora": [{"id": i, "scale": 0.0} for i in ids]})
            return (f"the llama.cpp server at {self.base_url} was not started with this fine-tune's adapter "
                    f"({len(data)} adapter(s) loaded, none of them {GGUF_ADAPTER} of this folder); start it "
                    f"with `fine-tuner serve OUTPUT_DIR`, or llama-server --lora OUTPUT_DIR/adapter/{GGUF_ADAPTER}")
        try:
            entries = self.model_entries()
        except OpenAIError as exc:
            return str(exc)
        for item in entries:
            if isinstance(item.get("root"), str) and isinstance(item.get("parent"), str) \
                    and _same_file(item["root"], adapter_dir):
                return ServedAdapter(f"vLLM LoRA module {item['id']}", item["id"], None, item["parent"], None)
        try:
            # vLLM answers in plain text ("Success: LoRA adapter ... added successfully.")
            self._call("POST", LOAD_LORA_PATH, {"lora_name": load_as, "lora_path": str(adapter_dir.resolve())},
                       json_answer=False)
        except OpenAIError as exc:
            if exc.status not in (400, 404, 405):
                return str(exc)
            return (f"the server at {self.base_url} does not serve this fine-tune's adapter and cannot load it "
                    f"({exc.status}); start vLLM with --enable-lora --lora-modules NAME=OUTPUT_DIR/adapter (or "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or llama.cpp with `fine-tuner serve OUTPUT_DIR`")
        return ServedAdapter(f"vLLM LoRA module {load_as} (loaded now)", load_as, None, served, None)

    def serving_problem(self, model: str) -> str | None:
        """Why the server cannot answer for ``model`` (it does not answer, or does not list it), or None."""
        return self.served_name(model, model)[1]

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, model: str | None = None, *,
              json_answer: bool = True) -> tuple[Any, int]:
        """(the answer as JSON, its status) after at most ``1 + retries`` attempts within the call's
        deadline (see the module docstring); ``json_answer=False``: the answer's text is not read
        as JSON (None is returned for it)."""
        deadline = Deadline(self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
        attempts = 1 + max(0, self.cfg.retries)
        with under(deadline):
            for attempt in range(attempts):
                try:
                    return self._attempt(method, path, body, model, deadline, json_answer)
                except _Retry as retry:
                    if attempt == attempts - 1 or not self._wait(retry, attempt, deadline, method, path):
                        raise self._error(method, path, retry.what, retry.status, retry.hint, retry.reason,
                                          attempts=attempt + 1) from None
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _url(self, path: str) -> str:
        """The address of ``path``: under ``base_url``, or at the server's root for llama.cpp's own
        endpoints (``base_url`` without its ``/v1``)."""
        if path in ROOT_PATHS and self.base_url.endswith(API_PREFIX):
            return self.base_url[:-len(API_PREFIX)] + path
        return self.base_url + path

    def _attempt(self, method: str, path: str, body: Any, model: str | None,
                 deadline: Deadline, json_answer: bool = True) -> tuple[Any, int]:
        if deadline.left_s() <= 0:
            raise self._timed_out(method, path, deadline)
        try:
            resp = self.session.request(method, self._url(path), json=body, timeout=deadline.timeouts(),
                                        stream=True, allow_redirects=False)
        except requests.RequestException as exc:
            raise self._no_answer(method, path, exc, deadline) from None
        status = resp.status_code
        try:
            if is_redirect(status):
                raise self._error(method, path, f"answered {status} (a redirect), which is never followed", status,
                                  "set openai.base_url to the server's own address: following a redirect would "
                                  "send the request, records included, to another server", "redirect")
            if status == 429 or status >= 500:
                raise self._busy(status, resp.headers)
            if status >= 400:
                raise self._refused(method, path, status, model)
            raw = read_body(resp, limit=self.cfg.max_response_bytes, deadline=deadline)
        except AnswerTooLarge as exc:
            raise self._too_large(method, path, status, exc) from None
        except AnswerTimedOut:
            raise self._timed_out(method, path, deadline) from None
        except requests.RequestException as exc:
            raise self._no_answer(method, path, exc, deadline) from None
        finally:
            resp.close()
        if not json_answer:
            return None, status
        try:
            return parse_json(raw), status
        except NotJSON as exc:
            raise self._error(method, path, f"answered with a body that {exc.reason}", status, NOT_THE_API,
                              "not_json") from None

    def _wait(self, retry: _Retry, attempt: int, deadline: Deadline, method: str, path: str) -> bool:
        """Sleep before the next attempt and say True, or say False when the sleep would not end
        before the call's deadline (then the last error stands)."""
        delay = retry.wait_s if retry.wait_s is not None else min(self.cfg.backoff_s * 2 ** attempt,
                                                                  self.cfg.backoff_max_s)
        if delay >= deadline.left_s():
            return False
        log.info("openai_retry", method=method, path=path, attempt=attempt + 1, reason=retry.reason,
                 status=retry.status, delay_s=round(delay, 3))
        time.sleep(delay)
        return True

    def _error(self, method: str, path: str, what: str, status: int | None, hint: str, reason: str, *,
               attempts: int = 1) -> OpenAIError:
        """The error that ends a call (``openai_error`` is logged): one line naming the server, what
        it did and the request, never a body."""
        log.warning("openai_error", method=method, path=path, status=status, reason=reason, attempts=attempts)
        tried = f" ({attempts} attempts)" if attempts > 1 else ""
        return OpenAIError(f"{method} {self._url(path)}{tried}: the OpenAI-compatible server {what}",
                           status=status, hint=hint)

    def _timed_out(self, method: str, path: str, deadline: Deadline) -> OpenAIError:
        return self._error(method, path, f"did not answer completely within {deadline.total_s:g} s", None,
                           "the server is busy or stuck: check its load, lower openai.parallel, or raise "
                           "openai.read_timeout_s (the deadline is openai.connect_timeout_s + openai.read_timeout_s)",
                           "timed_out")

    def _no_answer(self, method: str, path: str, exc: requests.RequestException, deadline: Deadline) -> Exception:
        """A request that got no complete answer: timed out for good, or worth another attempt."""
        if deadline.expired.is_set() or (isinstance(exc, requests.exceptions.Timeout)
                                         and not isinstance(exc, requests.exceptions.ConnectTimeout)):
            return self._timed_out(method, path, deadline)
        if _never_sent(exc):
            return _Retry("refused the connection", None,
                          "start the server and check that it listens at openai.base_url", "connection_refused")
        return _Retry("closed the connection before a complete answer", None,
                      "the server may have crashed or restarted: read its log, then run again", "connection_closed")

    def _busy(self, status: int, headers: Mapping[str, str]) -> _Retry:
        wait = retry_after_s(headers, self.cfg.backoff_max_s)
        if status == 429:
            return _Retry("answered 429 (too many requests)", status,
                          "the server is rate-limited or overloaded: lower openai.parallel, or raise openai.retries "
                          "or openai.backoff_max_s", "too_many_requests", wait)
        return _Retry(f"failed ({status})", status, "the server failed: read its log, then run again",
                      "server_error", wait)

    def _refused(self, method: str, path: str, status: int, model: str | None) -> OpenAIError:
        """A 4xx other than 429. Only the status is used: the body may repeat the request."""
        if status in (401, 403) and self.key_env:
            return self._error(method, path, f"refused the API key ({status})", status,
                               f"set the server's API key in ${self.key_env} (the variable openai.api_key_env "
                               f"names)", "key_refused")
        if status in (401, 403):
            return self._error(method, path, f"asks for an API key and none was sent ({status})", status,
                               "set openai.api_key_env to the name of an environment variable that holds the "
                               "server's API key", "no_key")
        if status == 404 and model is not None:
            return self._error(method, path, f"does not serve the model {model!r} (404)", status,
                               f"check openai.model (unset: the base model's name is asked for) against the names "
                               f"GET {self.base_url}{MODELS_PATH} lists, and that openai.base_url ends with the "
                               f"API's prefix (usually /v1)", "model_not_found")
        if status == 404:
            return self._error(method, path, "does not know this address (404)", status, NOT_THE_API, "not_found")
        return self._error(method, path, f"refused the request ({status}; its error text is not shown, as it may "
                                         f"repeat the records)", status,
                           "check that the server supports response_format with a JSON Schema and that the model's "
                           "context holds the system prompt, the examples and a record; the server's log says more",
                           "request_refused")

    def _too_large(self, method: str, path: str, status: int, exc: AnswerTooLarge) -> OpenAIError:
        limit = self.cfg.max_response_bytes
        what = (f"announced an answer of {exc.size} bytes, more than openai.max_response_bytes ({limit}); it was "
                f"not read" if exc.announced else
                f"sent an answer larger than openai.max_response_bytes ({limit}); reading stopped there")
        return self._error(method, path, what, status,
                           "check that openai.base_url is an OpenAI-compatible server (a rating's answer is a few "
                           "KB), or raise openai.max_response_bytes", "too_large")
