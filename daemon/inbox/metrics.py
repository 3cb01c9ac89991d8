"""Prometheus metrics for the people who run the daemon, derived from the events it already logs.

One source of truth: a ``logging.Handler`` on the ``fine_tuner`` logger reads the structlog event
dicts (``job_finished``, ``training_progress``, ``rating_progress``, ``evaluation_finished``,
``ollama_error`` / ``ollama_unavailable``, ``openai_error``) and updates a private
``CollectorRegistry`` (never the global one, so several daemons or tests in one process do not
collide); the service adds the journal's job counts and its queue (``update_queue``). The metrics
are served on ``metrics.host:metrics.port`` (``GET /metrics``; a thread per connection, at most
``MAX_CONNECTIONS`` of them, each closed after ``CONNECTION_TIMEOUT_S`` without a byte, so idle
connections cannot use up the daemon's threads and descriptors) and written atomically to
``metrics.textfile`` for node exporter's textfile collector. A label holds a job state or status,
an event name, a model key or a job's topics (job-file or config text, escaped and cut to
``MAX_LABEL_CHARS``), never a dataset's cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app

from .. import __version__
from ..config import ConfigError, MetricsConfig
from ..fsutil import atomic_open
from ..logconfig import ROOT_LOGGER, get_logger
from ..text import printable

log = get_logger("metrics")

MAX_LABEL_CHARS = 100  # topics are free text: a label stays one short line
# a model-set job takes a tenth of a second, a fine-tune up to training.timeout_s (6 h by default)
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 36000)
FINISHED_STATUSES = ("succeeded", "failed", "duplicate")  # shown as 0 before the first of each
OLLAMA_ERROR_EVENTS = ("ollama_error", "ollama_unavailable")
SERVER_STOP_S = 5.0
# A scrape sends its request at once and is answered in milliseconds; a connection that sends
# nothing for this long (per read or write) is closed.
CONNECTION_TIMEOUT_S = 5.0
# Connections held at once (a thread and a descriptor each). A new one beyond this replaces the
# oldest that has not sent its request yet, so a scrape gets through any number of idle ones.
MAX_CONNECTIONS = 16


def metrics_for(cfg: MetricsConfig, root: str | Path) -> Metrics | None:
    """The daemon's metrics, or None when neither ``port`` nor ``textfile`` is set; a relative
    ``textfile`` is under ``root``."""
    if cfg.port is None and cfg.textfile is None:
        return None
    if cfg.textfile is not None:
        cfg = dataclasses.replace(cfg, textfile=str(Path(root) / cfg.textfile))
    return Metrics(cfg)


class Metrics:
    """The daemon's metrics: ``start`` attaches the log handler and starts the server, ``stop``
    undoes both and writes the last textfile."""

    def __init__(self, cfg: MetricsConfig, *, connection_timeout_s: float = CONNECTION_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.cfg = cfg
        self.connection_timeout_s = connection_timeout_s
        self.max_connections = max_connections
        self.registry = CollectorRegistry()
        self._define(self.registry)
        self.handler = _EventHandler(self.observe)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._job_finished = threading.Event()  # the textfile is due: a job finished since it was written
        self._next_write = 0.0
        self._write_failed = False

    def _define(self, r: CollectorRegistry) -> None:
        self.jobs_finished = Counter("fine_tuner_jobs_finished", "Jobs finished, by status",
                                     ["status"], registry=r)
        self.job_duration = Histogram("fine_tuner_job_duration_seconds", "How long a finished job took, by status",
                                      ["status"], buckets=DURATION_BUCKETS, registry=r)
        self.jobs = Gauge("fine_tuner_jobs", "Jobs in the journal, by state", ["state"], registry=r)
        self.queue_length = Gauge("fine_tuner_queue_length",
                                  "Claimed jobs waiting for a worker or for the training lane", registry=r)
        self.training_speed = Gauge("fine_tuner_training_tokens_per_second",
                                    "The last training progress report's tokens per second", registry=r)
        self.rating_speed = Gauge("fine_tuner_rating_records_per_second",
                                  "The last rating progress report's records per second", registry=r)
        self.kappa = Gauge("fine_tuner_evaluation_kappa",
                           "Cohen's kappa against the experts at the last evaluation, by topic and model",
                           ["topic", "model"], registry=r)
        self.ollama_errors = Counter("fine_tuner_ollama_errors", "Failed Ollama requests, by event",
                                     ["event"], registry=r)
        self.openai_errors = Counter("fine_tuner_openai_errors",
                                     "Failed requests to the OpenAI-compatible server", registry=r)
        info = Gauge("fine_tuner_info", "The running fine-tuner's version", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        for status in FINISHED_STATUSES:
            self.jobs_finished.labels(status=status)
        for event in OLLAMA_ERROR_EVENTS:
            self.ollama_errors.labels(event=event)

    # --- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Write the first textfile, start the server, attach the handler. ConfigError naming the
        key when the textfile cannot be written or the port cannot be listened on."""
        if self.cfg.textfile is not None:
            try:
                self._write(self.cfg.textfile)
            except OSError as exc:
                raise ConfigError([f"metrics.textfile: cannot write {printable(self.cfg.textfile, 4096)} "
                                   f"({exc.strerror or type(exc).__name__}): its folder must exist and be "
                                   "writable for the service"]) from None
            self._next_write = time.monotonic() + self.cfg.textfile_every_s
        if self.cfg.port is not None:
            self._server, self._thread = _serve(self.cfg, self.registry, timeout_s=self.connection_timeout_s,
                                                max_connections=self.max_connections)
        logging.getLogger(ROOT_LOGGER).addHandler(self.handler)
        log.info("metrics_started", host=self.cfg.host if self.cfg.port is not None else None,
                 port=self.cfg.port, textfile=self.cfg.textfile)

    def stop(self) -> None:
        """Detach the handler, stop the server, write the last textfile. Safe to call twice."""
        logging.getLogger(ROOT_LOGGER).removeHandler(self.handler)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(SERVER_STOP_S)
            self._server = self._thread = None
        self.write_textfile()

    # --- what the service feeds in -------------------------------------------------------------

    def update_queue(self, counts: Mapping[str, int], queued: int) -> None:
        """The journal's jobs by state (``Journal.counts()``) and the claimed jobs waiting to run."""
        for state, n in counts.items():
            self.jobs.labels(state=_label(state)).set(n)
        self.queue_length.set(queued)

    def textfile_due(self) -> bool:
        """Whether ``write_textfile`` has something to do: a job finished since the last write, or
        ``textfile_every_s`` passed."""
        return self.cfg.textfile is not None and (
            self._job_finished.is_set() or time.monotonic() >= self._next_write)

    def write_textfile(self) -> None:
        """Write every metric to ``metrics.textfile`` atomically (0600; 0660 in a folder shared with
        a group). A failure is logged once until a write succeeds again: the daemon goes on."""
        if self.cfg.textfile is None:
            return
        self._job_finished.clear()
        self._next_write = time.monotonic() + self.cfg.textfile_every_s
        try:
            self._write(self.cfg.textfile)
        except OSError as exc:
            if not self._write_failed:
                log.warning("metrics_textfile_failed", path=self.cfg.textfile,
                            error=exc.strerror or type(exc).__name__,
                            hint="make the file's folder writable for the service; it is tried again")
            self._write_failed = True
        else:
            self._write_failed = False

    def _write(self, path: str) -> None:
        # not durable: a lost write is replaced within textfile_every_s, an fsync each time buys nothing
        with atomic_open(path, "wb", durable=False) as fh:
            fh.write(generate_latest(self.registry))

    # --- what the log events say ---------------------------------------------------------------

    def observe(self, event: Mapping[str, Any]) -> None:
        """Update the metrics from one structlog event dict; other events change nothing."""
        name = event.get("event")
        if name == "job_finished":
            self._on_job_finished(event)
        elif name == "training_progress" and (speed := _number(event.get("tokens_per_s"))) is not None:
            self.training_speed.set(speed)
        elif name == "rating_progress" and (speed := _number(event.get("records_per_s"))) is not None:
            self.rating_speed.set(speed)
        elif name == "evaluation_finished":
            self._on_evaluation(event)
        elif name in OLLAMA_ERROR_EVENTS:
            self.ollama_errors.labels(event=name).inc()
        elif name == "openai_error":
            self.openai_errors.inc()

    def _on_job_finished(self, event: Mapping[str, Any]) -> None:
        status = _label(event.get("status"))
        self.jobs_finished.labels(status=status).inc()
        duration = _number(event.get("duration_s"))
        if duration is not None and duration >= 0:
            self.job_duration.labels(status=status).observe(duration)
        self._job_finished.set()

    def _on_evaluation(self, event: Mapping[str, Any]) -> None:
        models = event.get("models")
        topic = _label(event.get("topic"))
        for entry in models if isinstance(models, list) else []:
            kappa = _number(entry.get("kappa")) if isinstance(entry, Mapping) else None
            if kappa is not None:
                self.kappa.labels(topic=topic, model=_label(entry.get("model"))).set(kappa)


class _EventHandler(logging.Handler):
    """Hands each structlog event dict (a record's ``msg``, see ``logconfig``) to ``observe``."""

    def __init__(self, observe: Callable[[Mapping[str, Any]], None]) -> None:
        super().__init__()
        self._observe = observe

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, Mapping):
            return
        try:
            self._observe(record.msg)
        except Exception:  # logging's contract: a handler never breaks the line being logged (a job's)
            self.handleError(record)


class _Handler(WSGIRequestHandler):
    """prometheus_client's request handler (no access log), with the server's timeout on every read
    and write, and marked busy once its request line has come (it is never the one replaced)."""

    server: _BoundedServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_s
        super().setup()

    def parse_request(self) -> bool:
        if self.raw_requestline:
            self.server.mark_busy(self.request)
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's thread-per-connection WSGI server, holding at most ``max_connections``:
    a new connection beyond them replaces the oldest idle one (no request line yet), or is closed
    at once when every one is being answered. ``server_close`` hangs up those still open, so a
    stop never waits for an idle client."""

    request_queue_size = 64  # the listen backlog: a scrape is not refused behind a burst of connects

    def __init__(self, family: int, address: tuple[str, int], *, timeout_s: float,
                 max_connections: int) -> None:
        self.address_family = family
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._lock = threading.Lock()  # guards _open, and closing its sockets
        self._open: dict[socket.socket, bool] = {}  # connection -> request line came; oldest first
        self._workers: list[threading.Thread] = []  # the connections' threads (loop thread only)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.max_connections:
                idle = next((conn for conn, busy in self._open.items() if not busy), None)
                if idle is not None:
                    del self._open[idle]
                    _hang_up(idle)  # its thread sees the end of the stream and closes it
            full = len(self._open) >= self.max_connections
            if not full:
                self._open[request] = False
        if full:
            WSGIServer.shutdown_request(self, request)
            return
        # a daemon thread (never holds the process up), joined by server_close
        worker = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="metrics-connection", daemon=True)
        self._workers = [t for t in self._workers if t.is_alive()] + [worker]
        worker.start()

    def mark_busy(self, request: socket.socket) -> None:
        with self._lock:
            if request in self._open:
                self._open[request] = True

    def shutdown_request(self, request: Any) -> None:
        # under the lock: a socket is never closed while process_request may be hanging it up
        with self._lock:
            self._open.pop(request, None)
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went quiet (timeout) or away: nothing to report
            return
        log.warning("metrics_request_failed", error_type=type(exc).__name__)

    def server_close(self) -> None:
        """Close the listening socket and hang up every connection (after ``shutdown``)."""
        super().server_close()
        with self._lock:
            for conn in self._open:
                _hang_up(conn)
        deadline = time.monotonic() + SERVER_STOP_S
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))


def _hang_up(conn: socket.socket) -> None:
    """End both directions of a connection; the thread reading it gets end-of-stream and closes it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _serve(cfg: MetricsConfig, registry: CollectorRegistry, *, timeout_s: float,
           max_connections: int) -> tuple[_BoundedServer, threading.Thread]:
    """The metrics server on ``cfg.host:cfg.port`` (its own thread), or ConfigError."""
    assert cfg.port is not None
    host = printable(cfg.host)
    try:
        # the address family that cfg.host needs (an IPv6 address needs AF_INET6)
        family, _, _, _, sockaddr = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        server = _BoundedServer(family, (sockaddr[0], cfg.port), timeout_s=timeout_s,
                                max_connections=max_connections)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = (f"port {cfg.port} is in use on {host} (another program, or another fine-tuner, "
                   "listens there): choose another port or stop that program")
        else:
            why = (f"cannot listen on {host} port {cfg.port} ({exc.strerror or type(exc).__name__}): "
                   "metrics.host must be an address of this machine, and ports under 1024 need privileges")
        raise ConfigError([f"metrics.port: {why}"]) from None
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return server, thread


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, a bool, nan, inf or too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _label(value: Any) -> str:
    """A label value: the text escaped (``text.printable``) and cut to ``MAX_LABEL_CHARS``."""
    return "" if value is None else printable(str(value), MAX_LABEL_CHARS)
