"""Metrics: real log events through the logging setup update a private registry, served and written."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest
import requests
import structlog
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__, logconfig
from daemon.config import ConfigError, MetricsConfig
from daemon.inbox.metrics import Metrics, metrics_for
from tests.conftest import leftovers, wait_for

log = logconfig.get_logger("test")


@pytest.fixture
def metrics():
    """Factory: a started ``Metrics`` on logging configured as the daemon does (without a console)."""
    logconfig.configure(level="INFO", stream=None, log_file=None)
    started: list[Metrics] = []

    def make(**settings) -> Metrics:
        m = Metrics(MetricsConfig(**settings))
        m.start()
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()
    logconfig.configure(level="INFO", stream=None, log_file=None, owner=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """The exposition ``text`` as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_job_finished_counts_jobs_and_their_durations_by_status(metrics):
    """job_finished lines add to the counter and the histogram of their status."""
    m = metrics()
    log.info("job_finished", status="succeeded", duration_s=2.5, job_id="a")
    log.info("job_finished", status="succeeded", duration_s=0.25, job_id="b")
    log.info("job_finished", status="failed", duration_s=0.05, job_id="c")
    value = m.registry.get_sample_value
    assert [value("fine_tuner_jobs_finished_total", {"status": s}) for s in ("succeeded", "failed", "duplicate")] == [
        2.0, 1.0, 0.0]
    assert value("fine_tuner_job_duration_seconds_count", {"status": "succeeded"}) == 2.0
    assert value("fine_tuner_job_duration_seconds_sum", {"status": "succeeded"}) == 2.75
    assert [value("fine_tuner_job_duration_seconds_bucket", {"status": "succeeded", "le": le})
            for le in ("0.1", "0.5", "1.0", "5.0", "36000.0", "+Inf")] == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert value("fine_tuner_job_duration_seconds_bucket", {"status": "failed", "le": "0.1"}) == 1.0


def test_progress_lines_set_the_speed_gauges_only_with_a_number(metrics):
    """training_progress and rating_progress set their gauges; a None or non-number speed leaves them."""
    m = metrics()
    log.info("training_progress", step=1, tokens_per_s=1234.5)
    log.info("training_progress", step=2, tokens_per_s=None)
    log.info("rating_progress", done=10, total=20, records_per_s=3.25)
    log.info("rating_progress", done=20, total=20, records_per_s="fast")
    log.info("rating_progress", done=20, total=20, records_per_s=float("nan"))
    value = m.registry.get_sample_value
    assert (value("fine_tuner_training_tokens_per_second"), value("fine_tuner_rating_records_per_second")) == (
        1234.5, 3.25)


def test_evaluation_kappa_by_topic_and_model(metrics):
    """evaluation_finished sets each model's kappa under its topic; a model without a kappa gets none."""
    m = metrics()
    log.info("evaluation_finished", topic="respiratory infections", backend="ollama", rows=30,
             models=[{"model": "new", "kappa": 0.8, "accuracy": 0.9}, {"model": "base", "kappa": None}])
    with structlog.contextvars.bound_contextvars(topic="falls"):  # a topic bound for the job counts too
        log.info("evaluation_finished", models=[{"model": "model_set", "kappa": -0.25}])
    value = m.registry.get_sample_value
    assert value("fine_tuner_evaluation_kappa", {"topic": "respiratory infections", "model": "new"}) == 0.8
    assert value("fine_tuner_evaluation_kappa", {"topic": "respiratory infections", "model": "base"}) is None
    assert value("fine_tuner_evaluation_kappa", {"topic": "falls", "model": "model_set"}) == -0.25


def test_a_topic_label_is_escaped_and_cut(metrics):
    """A long topic with a line break becomes one escaped label of 100 characters and '...'."""
    m = metrics()
    log.info("evaluation_finished", topic="a\nb" + "c" * 200, models=[{"model": "new", "kappa": 0.5}])
    [sample] = [s for s in m.registry.collect() if s.name == "fine_tuner_evaluation_kappa"][0].samples
    assert sample.labels == {"topic": "a\\x0ab" + "c" * 94 + "...", "model": "new"}


def test_malformed_evaluation_lines_change_nothing(metrics):
    """models that is not a list of mappings sets no kappa and breaks no log call."""
    m = metrics()
    log.info("evaluation_finished", topic="t", models="new")
    log.info("evaluation_finished", topic="t", models=["new", {"model": "new", "kappa": 10 ** 400}])
    assert [s for s in m.registry.collect() if s.name == "fine_tuner_evaluation_kappa"][0].samples == []


def test_server_errors_are_counted(metrics):
    """ollama_error and ollama_unavailable count by event, openai_error on its own counter."""
    m = metrics()
    log.warning("ollama_unavailable", method="GET", path="/api/tags", error_class="ConnectionError")
    log.warning("ollama_unavailable", method="GET", path="/api/tags", error_class="ConnectionError")
    log.warning("ollama_error", method="POST", path="/api/chat", status=500)
    log.warning("openai_error", method="POST", path="/chat/completions", status=429, reason="rate_limited", attempts=4)
    value = m.registry.get_sample_value
    assert (value("fine_tuner_ollama_errors_total", {"event": "ollama_unavailable"}),
            value("fine_tuner_ollama_errors_total", {"event": "ollama_error"}),
            value("fine_tuner_openai_errors_total")) == (2.0, 1.0, 1.0)


def test_queue_counts_and_version(metrics):
    """update_queue sets the jobs gauge by state and the queue length; the info gauge names the version."""
    m = metrics()
    m.update_queue({"queued": 2, "running": 1, "succeeded": 5, "failed": 0, "duplicate": 1}, 2)
    value = m.registry.get_sample_value
    assert [value("fine_tuner_jobs", {"state": s})
            for s in ("queued", "running", "succeeded", "failed", "duplicate")] == [2.0, 1.0, 5.0, 0.0, 1.0]
    assert (value("fine_tuner_queue_length"), value("fine_tuner_info", {"version": __version__})) == (2.0, 1.0)


def test_stop_detaches_the_handler_and_two_instances_do_not_collide(metrics):
    """Each Metrics has its own registry; after stop its counters no longer move."""
    first, second = metrics(), metrics()
    log.info("job_finished", status="succeeded", duration_s=1.0)
    first.stop()
    log.info("job_finished", status="succeeded", duration_s=1.0)
    assert [m.registry.get_sample_value("fine_tuner_jobs_finished_total", {"status": "succeeded"})
            for m in (first, second)] == [1.0, 2.0]


def test_textfile_is_written_at_start_after_a_job_and_at_stop(metrics, tmp_path):
    """The .prom file is private, parses, and is due again as soon as a job finished; no temp files stay."""
    path = tmp_path / "fine_tuner.prom"
    m = metrics(textfile=str(path), textfile_every_s=3600.0)
    assert (oct(path.stat().st_mode & 0o777), m.textfile_due()) == ("0o600", False)
    assert samples(path.read_text())[("fine_tuner_jobs_finished_total", (("status", "succeeded"),))] == 0.0
    log.info("job_finished", status="succeeded", duration_s=1.0)
    assert m.textfile_due() is True
    m.write_textfile()
    assert m.textfile_due() is False
    assert samples(path.read_text())[("fine_tuner_jobs_finished_total", (("status", "succeeded"),))] == 1.0
    m.update_queue({"queued": 0}, 0)
    log.info("job_finished", status="failed", duration_s=1.0)
    m.stop()
    assert samples(path.read_text())[("fine_tuner_jobs_finished_total", (("status", "failed"),))] == 1.0
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["fine_tuner.prom"]


def test_a_textfile_that_cannot_be_written_is_a_config_error(metrics, tmp_path):
    """A textfile in a folder that does not exist stops the start with the key named."""
    path = tmp_path / "missing" / "fine_tuner.prom"
    with pytest.raises(ConfigError) as info:
        metrics(textfile=str(path))
    assert info.value.problems == [f"metrics.textfile: cannot write {path} (No such file or directory): its "
                                   "folder must exist and be writable for the service"]


def test_metrics_for_is_none_unless_asked_and_puts_a_relative_textfile_under_the_root(tmp_path):
    """Neither port nor textfile: no metrics; a relative textfile is under the daemon's root."""
    made = metrics_for(MetricsConfig(textfile="state/fine_tuner.prom"), tmp_path)
    assert (metrics_for(MetricsConfig(), tmp_path), made.cfg.textfile) == (
        None, str(tmp_path / "state" / "fine_tuner.prom"))
    assert metrics_for(MetricsConfig(textfile="/var/lib/x.prom"), tmp_path).cfg.textfile == "/var/lib/x.prom"


def test_metrics_are_served_on_the_port_until_stop(metrics):
    """GET /metrics answers the exposition text; after stop the port is closed."""
    port = free_port()
    m = metrics(port=port)
    log.info("job_finished", status="duplicate", duration_s=0.5)
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert resp.status_code == 200
    assert samples(resp.text)[("fine_tuner_jobs_finished_total", (("status", "duplicate"),))] == 1.0
    m.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_port_in_use_is_a_config_error(metrics):
    """A port another program listens on stops the start with one line that says what to do."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            metrics(port=port)
    assert info.value.problems == [
        f"metrics.port: port {port} is in use on 127.0.0.1 (another program, or another fine-tuner, listens "
        "there): choose another port or stop that program"]


def idle_connection(port: int) -> socket.socket:
    """A connection to the metrics port that never sends anything (blocking, for ``closed_by_server``)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.settimeout(None)
    return conn


def closed_by_server(conn: socket.socket) -> bool:
    """Whether the server closed this client connection (end of stream or reset), without waiting."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _socket_fds() -> set[int]:
    """The inodes of this process's open sockets (``/proc/self/fd``)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                out.add(int(target[len("socket:["):-1]))
    return out


def _connection_threads() -> int:
    return sum(t.name == "metrics-connection" for t in threading.enumerate())


def test_idle_connections_are_bounded_replaced_and_timed_out_while_scrapes_answer():
    """200 idle connections hold at most max_connections threads and sockets (each new one past
    the bound replaces the oldest idle one at once), a scrape still answers among them, and the
    idle ones are closed after the connection timeout."""
    logconfig.configure(level="INFO", stream=None, log_file=None)
    port = free_port()
    m = Metrics(MetricsConfig(port=port), connection_timeout_s=2.0, max_connections=8)
    m.start()
    conns: list[socket.socket] = []
    try:
        sockets_before = _socket_fds()
        conns += [idle_connection(port) for _ in range(200)]
        clients = {os.fstat(c.fileno()).st_ino for c in conns}
        wait_for(lambda: [closed_by_server(c) for c in conns] == [True] * 192 + [False] * 8,
                 message="all but the newest 8 idle connections closed")
        # a 9th connection is accepted before the oldest is closed: the bound holds once that settles
        wait_for(lambda: (len(_socket_fds() - sockets_before - clients), _connection_threads()) == (8, 8),
                 message="8 connections and their threads held")
        resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert (resp.status_code, samples(resp.text)[("fine_tuner_info", (("version", __version__),))]) == (200, 1.0)
        wait_for(lambda: [closed_by_server(c) for c in conns] == [True] * 193 + [False] * 7,
                 message="the scrape replaced the oldest idle connection")
        wait_for(lambda: all(closed_by_server(c) for c in conns), timeout=15,
                 message="the idle connections closed after the timeout")
        wait_for(lambda: _connection_threads() == 0, message="no connection threads left")
        assert _socket_fds() - sockets_before - clients == set()
    finally:
        for c in conns:
            c.close()
        m.stop()
        logconfig.configure(level="INFO", stream=None, log_file=None, owner=None)


def test_stop_hangs_up_idle_connections_at_once():
    """Stopping the metrics server closes its idle connections instead of waiting for them."""
    port = free_port()
    m = Metrics(MetricsConfig(port=port), connection_timeout_s=60.0)
    m.start()
    conns = [idle_connection(port) for _ in range(3)]
    try:
        wait_for(lambda: _connection_threads() == 3, message="three connection threads")
        m.stop()
        assert ([closed_by_server(c) for c in conns], _connection_threads()) == ([True] * 3, 0)
    finally:
        for c in conns:
            c.close()
