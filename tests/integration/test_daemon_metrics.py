"""The daemon's Prometheus metrics as a real process: the loopback server, the textfile, a taken port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest
import requests

from daemon import __version__
from tests.conftest import leftovers, wait_for
from tests.inbox.test_metrics import closed_by_server, idle_connection, free_port, samples
from tests.integration.conftest import MARKER, REPO


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert resp.status_code == 200
    return samples(resp.text)


def after_one_success(values: dict[tuple[str, tuple], float]) -> list[float | None]:
    """The values a daemon that ran one successful job shows, in a fixed order."""
    keys = [("fine_tuner_jobs_finished_total", (("status", "succeeded"),)),
            ("fine_tuner_jobs_finished_total", (("status", "failed"),)),
            ("fine_tuner_job_duration_seconds_count", (("status", "succeeded"),)),
            ("fine_tuner_jobs", (("state", "succeeded"),)), ("fine_tuner_jobs", (("state", "queued"),)),
            ("fine_tuner_jobs", (("state", "running"),)), ("fine_tuner_queue_length", ()),
            ("fine_tuner_info", (("version", __version__),))]
    return [values.get(key) for key in keys]


def test_a_job_shows_on_the_loopback_metrics_server(root, start_daemon):
    """After one job, GET /metrics on 127.0.0.1 counts it and shows the journal; nothing else listens."""
    port = free_port()
    root.write_config(metrics={"port": port})
    d = start_daemon()
    d.wait_event("daemon_ready")
    [started] = d.events("metrics_started")
    assert (started["host"], started["port"], started["textfile"]) == ("127.0.0.1", port, None)
    root.drop_dataset("visits")
    d.wait_event("job_finished", timeout=30)
    values = wait_for(lambda: (v := scrape(port)).get(("fine_tuner_jobs", (("state", "succeeded"),))) == 1 and v,
                      timeout=10, message="the journal's counts in the metrics")
    assert after_one_success(values) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(requests.ConnectionError):  # bound to 127.0.0.1 only, not to every address
        requests.get(f"http://127.0.0.2:{port}/metrics", timeout=5)
    assert MARKER not in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_watch_once_leaves_a_private_textfile(root):
    """watch --once with metrics.textfile writes the file atomically, 0600 under the daemon's umask."""
    (root.path / "metrics").mkdir()
    root.write_config(metrics={"textfile": "metrics/fine_tuner.prom"})
    root.drop_dataset("visits")
    proc = subprocess.run([sys.executable, "-m", "daemon", "watch", "--once", "--config", str(root.config),
                           "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")
    path = root.path / "metrics" / "fine_tuner.prom"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    text = path.read_text(encoding="utf-8")
    assert after_one_success(samples(text)) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert MARKER not in text
    assert os.listdir(root.path / "metrics") == ["fine_tuner.prom"]
    assert leftovers(root.path) == []


def test_a_taken_port_stops_the_start_with_exit_78(root):
    """A metrics port another program listens on: one line naming the key and exit 78, no traceback."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        root.write_config(metrics={"port": port})
        proc = subprocess.run([sys.executable, "-m", "daemon", "watch", "--once", "--config", str(root.config),
                               "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.splitlines()) == (78, [
        f"fine-tuner: error: invalid configuration: metrics.port: port {port} is in use on "
        "127.0.0.1 (another program, or another fine-tuner, listens there): choose another port or stop that "
        "program (fix the configuration file or the FINE_TUNER_* variables and start again)"])


def _sockets_of(pid: int) -> int:
    """How many sockets the process holds open (``/proc/<pid>/fd``)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_to_the_metrics_port_do_not_starve_the_daemon(root, start_daemon):
    """200 idle connections to the metrics port hold at most MAX_CONNECTIONS threads and sockets
    of the daemon, /metrics answers and a drop is processed meanwhile, and the idle connections
    are closed after CONNECTION_TIMEOUT_S."""
    port = free_port()
    root.write_config(metrics={"port": port})
    d = start_daemon()
    d.wait_event("warm_up_done")
    sockets, threads = _sockets_of(d.proc.pid), _threads_of(d.proc.pid)
    conns = [idle_connection(port) for _ in range(200)]
    try:
        # the oldest go as newer ones come; on a busy machine the newest 16 may also reach the idle
        # timeout (5 s) before this sees them, so the bound is what is exact
        wait_for(lambda: all(closed_by_server(c) for c in conns[:184]),
                 message="all but the newest 16 idle connections closed")
        # a 17th connection is accepted before the oldest is closed: the bound holds once that settles
        wait_for(lambda: _sockets_of(d.proc.pid) - sockets <= 16, message="at most 16 idle connections held")
        assert _threads_of(d.proc.pid) - threads <= 16  # (<: the warm-up thread may have been ending)
        assert after_one_success(scrape(port))[-1] == 1.0  # the scrape replaced the oldest idle one
        root.drop_dataset("visits")
        [finished] = d.wait_event("job_finished", timeout=30)
        assert finished["status"] == "succeeded"
        wait_for(lambda: all(closed_by_server(c) for c in conns), timeout=30,
                 message="the idle connections closed after the timeout")
        wait_for(lambda: _sockets_of(d.proc.pid) == sockets, message="the daemon's sockets back to before")
    finally:
        for c in conns:
            c.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
