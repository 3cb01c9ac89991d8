"""Tests for daemon/serving/http.py's deadlines: one watchdog thread for every call, a passed
deadline cuts its connections, and closed deadlines do not pile up."""

from __future__ import annotations

import socket
import threading

from daemon.serving import http
from daemon.serving.http import Deadline
from tests.conftest import wait_for


class _Conn:
    """What the pool lends: an object whose ``sock`` is the connection's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


def _watchdogs() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "http-deadline" and t.is_alive())


def test_one_watchdog_thread_serves_every_open_deadline():
    """Twenty calls under way at once are watched by one thread, not one thread each."""
    deadlines = [Deadline(30.0, 30.0) for _ in range(20)]
    try:
        assert _watchdogs() == 1
    finally:
        for deadline in deadlines:
            deadline.close()


def test_a_passed_deadline_cuts_its_connection_and_leaves_the_others():
    """A short deadline added after a long one still passes on time: its connection is shut down
    (a blocked read returns), while the long one's is untouched."""
    long_pair, short_pair = socket.socketpair(), socket.socketpair()
    long_deadline = Deadline(60.0, 60.0)
    short_deadline = Deadline(0.1, 0.1)
    try:
        long_deadline.watch(_Conn(long_pair[0]))
        short_deadline.watch(_Conn(short_pair[0]))
        wait_for(lambda: short_deadline.expired.is_set(), timeout=10, message="the short deadline to pass")
        short_pair[0].settimeout(5)
        assert short_pair[0].recv(1) == b""  # shut down: the read returns at once
        long_pair[1].sendall(b"x")
        long_pair[0].settimeout(5)
        assert (long_deadline.expired.is_set(), long_pair[0].recv(1)) == (False, b"x")
    finally:
        long_deadline.close()
        short_deadline.close()
        for sock in (*long_pair, *short_pair):
            sock.close()


def test_closed_deadlines_do_not_pile_up_in_the_watchdogs_queue():
    """Thousands of calls that ended long before their deadline leave at most a bounded number
    of entries behind (a daemon rating for hours makes millions of calls)."""
    for _ in range(5000):
        Deadline(60.0, 60.0).close()
    assert len(http._WATCHDOG._queue) <= 2 * http._Watchdog.COMPACT_AT + 2
