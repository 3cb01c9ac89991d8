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
"""

from __future__ import annotations

import email.utils
import math
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import requests

from ..config import OpenAIConfig, printable
from ..errors import OpenAIError
from ..logconfig import get_logger
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
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0, "seed": seed}
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
        return choices[0]["message"].get("content")

    def list_models(self) -> list[str]:
        """The ids of the models the server serves (``GET /models``)."""
        data, status = self._call("GET", MODELS_PATH)
        problem = shape_problem(data, MODELS_FIELDS, required=("data",))
        if problem is None:
            problem = items_problem(data["data"], MODEL_FIELDS, "data")
        if problem is None and any(not isinstance(item.get("id"), str) for item in data["data"]):
            problem = "an entry of 'data' has no 'id'"
        if problem is not None:
            raise self._error("GET", MODELS_PATH, f"answered with unexpected JSON ({problem})", status, NOT_THE_API,
                              "wrong_shape")
        return [item["id"] for item in data["data"]]

    def serving_problem(self, model: str) -> str | None:
        """Why the server cannot answer for ``model`` (it does not answer, or does not list it), or None."""
        try:
            served = self.list_models()
        except OpenAIError as exc:
            return str(exc)
        if model in served:
            return None
        listed = ", ".join(repr(printable(name, 80)) for name in served[:MODELS_NAMED])
        more = f" and {len(served) - MODELS_NAMED} more" if len(served) > MODELS_NAMED else ""
        return (f"the server at {self.base_url} does not list the model {model!r} (it lists "
                f"{listed + more if served else 'none'}); set openai.model to the name it serves the model under")

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, model: str | None = None) -> tuple[Any, int]:
        """(the answer as JSON, its status) after at most ``1 + retries`` attempts within the call's
        deadline (see the module docstring)."""
        deadline = Deadline(self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
        attempts = 1 + max(0, self.cfg.retries)
        with under(deadline):
            for attempt in range(attempts):
                try:
                    return self._attempt(method, path, body, model, deadline)
                except _Retry as retry:
                    if attempt == attempts - 1 or not self._wait(retry, attempt, deadline, method, path):
                        raise self._error(method, path, retry.what, retry.status, retry.hint, retry.reason,
                                          attempts=attempt + 1) from None
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _attempt(self, method: str, path: str, body: Any, model: str | None,
                 deadline: Deadline) -> tuple[Any, int]:
        if deadline.left_s() <= 0:
            raise self._timed_out(method, path, deadline)
        try:
            resp = self.session.request(method, self.base_url + path, json=body, timeout=deadline.timeouts(),
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
        return OpenAIError(f"{method} {self.base_url}{path}{tried}: the OpenAI-compatible server {what}",
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
