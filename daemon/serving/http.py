"""HTTP to a model server that may be broken or hostile, for every client in ``serving``: a total
deadline per call, answers read in bounded pieces under a size cap, no redirects, and JSON whose
shape is checked before it is used.

* ``Deadline`` and ``DeadlineAdapter``: the end of one call. Every connection the call borrows from
  the pool (inside ``under(deadline)``) is watched (by one watchdog thread for all calls), and shut
  down once the deadline passes, which wakes a read blocked on a silent or trickling server. A
  server that keeps sending without pause is not stopped that way (on Linux a read goes on
  returning what still arrives after ``shutdown()``), so every answer is also read in
  ``CHUNK_BYTES`` pieces with the deadline checked between them.
* ``read_body``, ``read_prefix``, ``iter_lines``: an answer read with ``stream=True``; an announced
  ``Content-Length`` above the cap is refused before reading, and reading stops once the cap is
  passed (for a line stream: once one line passes it). ``AnswerTooLarge`` and ``AnswerTimedOut`` say
  why; the caller turns them into its own errors, naming the endpoint and its setting.
* ``refuse_redirects``: a session that never follows a redirect, nor reads a redirect's body; callers
  also pass ``allow_redirects=False`` and treat a 3xx as an error, because following one would send
  the whole request (prompts, records) to whatever server the ``Location`` names.
* ``parse_json`` and ``shape_problem``: an answer as JSON (``NotJSON`` for a body that is not JSON,
  is nested deeper than the parser can go, or holds so many objects and lists that parsing it would
  take many times its size in memory), and why it is not of the expected shape. Problem texts name
  keys and JSON types, never a value.

Nothing here logs or knows about a particular server's API.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import json
import socket
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3 import poolmanager

CHUNK_BYTES = 64 * 1024  # one read of an answer; the deadline is checked between reads
ERROR_BODY_MAX_BYTES = 64 * 1024  # of an error answer only this much is read (its text is truncated anyway)
# a JSON object or list costs ~25 times its two bytes once parsed: more than this many "{" and "["
# in an answer (legitimate ones hold hundreds) is refused before parsing
MAX_JSON_CONTAINERS = 100_000
DEADLINE_POLL_S = 0.05  # after the deadline, how often a connection still connecting is looked at again


# --- the total deadline -------------------------------------------------------------------------

class Deadline:
    """The end of one call. Every connection the call borrows from the pool is watched; once the
    deadline passes they are shut down (again every ``DEADLINE_POLL_S`` while the call still runs,
    for a connection that was still connecting), which wakes a blocked send or read at once. One
    watchdog thread serves every open deadline (``_Watchdog``)."""

    def __init__(self, connect_s: float, read_s: float) -> None:
        self.connect_s, self.read_s = connect_s, read_s
        self.total_s = connect_s + read_s
        self.at = time.monotonic() + self.total_s
        self.expired = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        _WATCHDOG.add(self)

    def left_s(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.expired.is_set() or self.left_s() <= 0

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) for the next attempt: the configured ones, capped by the time left."""
        left = max(self.left_s(), 0.001)
        return (min(self.connect_s, left), min(self.read_s, left))

    def watch(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)
            if self.expired.is_set():
                self._cut_locked()

    def _expire(self) -> bool:
        """Called by the watchdog once the deadline has passed (and again every poll): cut the
        call's connections; False once the call has closed (nothing more to watch)."""
        with self._lock:
            if self._closed:
                return False
            self.expired.set()
            self._cut_locked()
            return True

    def _cut_locked(self) -> None:
        for conn in self._conns:
            sock = getattr(conn, "sock", None)
            if isinstance(sock, socket.socket):
                try:
                    # the plain socket's shutdown, also for TLS: it wakes the reader without touching
                    # the TLS state another thread is using
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conns.clear()
        _WATCHDOG.closed()


class _Watchdog:
    """The one daemon thread that watches every open ``Deadline``: it sleeps until the earliest
    one passes, cuts that call's connections, and looks at it again every ``DEADLINE_POLL_S``
    until the call closes. (A thread per call cost two thread switches per request: a quarter of
    a request's time against a server on the same machine.) Closed deadlines leave the queue when
    their time comes, or all at once when they are most of it."""

    COMPACT_AT = 64  # closed entries before the queue is rebuilt without them (when they are most of it)

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._closed = 0  # about how many queued deadlines have closed
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._queue, (deadline.at, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():  # the first call, or after a fork
                self._thread = threading.Thread(target=self._run, name="http-deadline", daemon=True)
                self._thread.start()
            elif self._queue[0][2] is deadline:
                self._cond.notify()

    def closed(self) -> None:
        with self._cond:
            self._closed += 1
            if self._closed > self.COMPACT_AT and 2 * self._closed > len(self._queue):
                self._queue = [entry for entry in self._queue if not entry[2]._closed]
                heapq.heapify(self._queue)
                self._closed = 0

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._queue:
                    self._cond.wait()
                    continue
                at, _, deadline = self._queue[0]
                if deadline._closed:
                    heapq.heappop(self._queue)
                    self._closed = max(0, self._closed - 1)
                    continue
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._queue)
                if deadline._expire():
                    heapq.heappush(self._queue, (time.monotonic() + DEADLINE_POLL_S, next(self._seq), deadline))


_WATCHDOG = _Watchdog()


_CURRENT_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("http_deadline",
                                                                                     default=None)


@contextlib.contextmanager
def under(deadline: Deadline) -> Iterator[Deadline]:
    """Run a block under ``deadline``: connections borrowed in it (in this thread) are watched, and
    the deadline is closed (no longer watched) with the block."""
    token = _CURRENT_DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT_DEADLINE.reset(token)
        deadline.close()


class _WatchedPoolMixin:
    """Hands each connection the pool lends to the deadline of the call running in this thread."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        deadline = _CURRENT_DEADLINE.get()
        if deadline is not None:
            deadline.watch(conn)
        return conn


class _WatchedHTTPConnectionPool(_WatchedPoolMixin, urllib3.HTTPConnectionPool):
    pass


class _WatchedHTTPSConnectionPool(_WatchedPoolMixin, urllib3.HTTPSConnectionPool):
    pass


_WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter with pools whose connections a call's deadline can cut (a SOCKS proxy keeps
    its own pools: there only each attempt's timeouts and the checks between reads apply)."""

    @staticmethod
    def _watched(manager: Any) -> Any:
        if manager.pool_classes_by_scheme is poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._watched(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return self._watched(super().proxy_manager_for(proxy, **proxy_kwargs))


def _drop_redirect_target(resp: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """Response hook: a 3xx keeps its status and loses its Location. requests then has no target: it
    neither follows one nor, with ``allow_redirects=False``, reads the 3xx body whole to prepare the
    next request (which it does to fill ``Response.next``)."""
    if is_redirect(resp.status_code):
        resp.headers.pop("Location", None)
    return resp


def refuse_redirects(session: requests.Session) -> requests.Session:
    """``session``, made to never follow a redirect (``max_redirects`` 0 too, should a hook be removed);
    callers still pass ``allow_redirects=False`` and treat a 3xx as an error."""
    session.max_redirects = 0
    if _drop_redirect_target not in session.hooks["response"]:
        session.hooks["response"].append(_drop_redirect_target)
    return session


def is_redirect(status: int) -> bool:
    return 300 <= status < 400


# --- reading an answer --------------------------------------------------------------------------

class AnswerTooLarge(Exception):
    """An answer (or one line of a stream) longer than the cap: ``size`` bytes announced by its
    Content-Length (``announced``) or read before reading stopped."""

    def __init__(self, size: int, limit: int, announced: bool) -> None:
        super().__init__(f"{size} bytes > {limit}")
        self.size, self.limit, self.announced = size, limit, announced


class AnswerTimedOut(Exception):
    """The call's deadline passed while its answer was still being read."""


def _announced(resp: requests.Response, limit: int) -> None:
    try:
        size = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return
    if size > limit:
        raise AnswerTooLarge(size, limit, announced=True)


def _chunks(resp: requests.Response, deadline: Deadline) -> Iterator[bytes]:
    """The answer's bytes in pieces of at most ``CHUNK_BYTES``, until the deadline passes."""
    if deadline.passed():
        raise AnswerTimedOut()
    for chunk in resp.iter_content(CHUNK_BYTES):
        if deadline.passed():
            raise AnswerTimedOut()
        yield chunk


def read_body(resp: requests.Response, *, limit: int, deadline: Deadline) -> bytes:
    """The whole answer of a ``stream=True`` request: at most ``limit`` bytes, within ``deadline``."""
    if resp.request is not None and resp.request.method == "HEAD":
        return b""  # no body, whatever size its Content-Length gives for a GET
    _announced(resp, limit)
    body = bytearray()
    for chunk in _chunks(resp, deadline):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(len(body), limit, announced=False)
    return bytes(body)


def read_prefix(resp: requests.Response, *, limit: int, deadline: Deadline) -> bytes:
    """The first ``limit`` bytes of an answer at most (an error answer: the rest is not read)."""
    body = bytearray()
    for chunk in _chunks(resp, deadline):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def iter_lines(resp: requests.Response, *, limit: int, deadline: Deadline) -> Iterator[bytes]:
    """The lines of a streamed answer (NDJSON), each as it arrives; a line (or an unfinished one)
    longer than ``limit`` raises ``AnswerTooLarge``. The whole stream is bounded by the deadline."""
    pending = bytearray()
    for chunk in _chunks(resp, deadline):
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            if end - start > limit:
                raise AnswerTooLarge(end - start, limit, announced=False)
            yield bytes(pending[start:end])
            start = end + 1
        del pending[:start]
        if len(pending) > limit:
            raise AnswerTooLarge(len(pending), limit, announced=False)
    if pending:
        yield bytes(pending)


# --- JSON and its shape -------------------------------------------------------------------------

class NotJSON(ValueError):
    """An answer that cannot be used as JSON; ``reason`` completes "the body ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or ``NotJSON`` saying why not (never quoting the body)."""
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_CONTAINERS:
        raise NotJSON(f"holds more than {MAX_JSON_CONTAINERS:,} '{{' and '[' (JSON objects and lists)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise NotJSON("is JSON nested too deeply to read") from None
    except ValueError:
        raise NotJSON("is not JSON") from None


_JSON_NAMES = {bool: "true or false", dict: "an object", list: "a list", str: "a string", int: "a number",
               float: "a number", type(None): "null"}  # bool first: it is an int too


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type ("an object", "a list", ...)."""
    return next((name for kind, name in _JSON_NAMES.items() if isinstance(value, kind)), type(value).__name__)


def _type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_JSON_NAMES.get(kind, kind.__name__) for kind in kinds))


def shape_problem(data: Any, fields: Mapping[str, type | tuple[type, ...]], required: Collection[str] = (),
                  *, what: str = "the answer", path: str = "") -> str | None:
    """Why ``data`` is not an object whose ``fields`` are of these types, or None. A key in
    ``required`` must be present (null only where ``type(None)`` is one of its types); the others
    may be missing or null. ``what`` names ``data`` when it is not an object; ``path`` prefixes
    the keys named (``models[0]['name']``)."""
    if not isinstance(data, dict):
        return f"{what} is {json_type(data)}, not an object"
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        where = f"{path}[{key!r}]" if path else repr(key)
        if key not in data:
            if key in required:
                return f"no {where}"
            continue
        value = data[key]
        if value is None and (key not in required or type(None) in kinds):
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"{where} is {json_type(value)}, not {_type_names(kinds)}"
    return None


def items_problem(items: list, fields: Mapping[str, type | tuple[type, ...]], name: str) -> str | None:
    """Why an item of the list ``name`` is not an object of ``fields`` (see ``shape_problem``), or None."""
    for i, item in enumerate(items):
        problem = shape_problem(item, fields, what=f"{name}[{i}]", path=f"{name}[{i}]")
        if problem is not None:
            return problem
    return None
