"""Prometheus metrics for the people who run the daemon, derived from the events it already logs.

One source of truth: a ``logging.Handler`` on the ``fine_tuner`` logger reads the structlog event
dicts (``job_finished``, ``training_progress``, ``rating_progress``, ``evaluation_finished``,
``ollama_error`` / ``ollama_unavailable``, ``openai_error``) and updates a private
``CollectorRegistry`` (never the global one, so several daemons or tests in one process do not
collide); the service adds the journal's job counts and its queue (``update_queue``). The metrics
are served on ``metrics.host:metrics.port`` (``GET /metrics``) and written atomically to
``metrics.textfile`` for node exporter's textfile collector. A label holds a job state or status,
an event name, a model key or a job's topics (job-file or config text, escaped and cut to
``MAX_LABEL_CHARS``), never a dataset's cell.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from .. import __version__
from ..config import ConfigError, MetricsConfig, printable
from ..fsutil import atomic_open
from ..logconfig import ROOT_LOGGER, get_logger

log = get_logger("metrics")

MAX_LABEL_CHARS = 100  # topics are free text: a label stays one short line
# a model-set job takes a tenth of a second, a fine-tune up to training.timeout_s (6 h by default)
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 36000)
FINISHED_STATUSES = ("succeeded", "failed", "duplicate")  # shown as 0 before the first of each
OLLAMA_ERROR_EVENTS = ("ollama_error", "ollama_unavailable")
SERVER_STOP_S = 5.0


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

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
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
            self._server, self._thread = _serve(self.cfg, self.registry)
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


def _serve(cfg: MetricsConfig, registry: CollectorRegistry) -> tuple[Any, threading.Thread]:
    """prometheus_client's server on ``cfg.host:cfg.port`` (its own thread), or ConfigError."""
    assert cfg.port is not None
    host = printable(cfg.host)
    try:
        return start_http_server(cfg.port, addr=cfg.host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = (f"port {cfg.port} is in use on {host} (another program, or another fine-tuner, "
                   "listens there): choose another port or stop that program")
        else:
            why = (f"cannot listen on {host} port {cfg.port} ({exc.strerror or type(exc).__name__}): "
                   "metrics.host must be an address of this machine, and ports under 1024 need privileges")
        raise ConfigError([f"metrics.port: {why}"]) from None


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
    """A label value: the text escaped (``config.printable``) and cut to ``MAX_LABEL_CHARS``."""
    return "" if value is None else printable(str(value), MAX_LABEL_CHARS)
