"""sd_notify: datagrams to a real AF_UNIX socket, abstract addresses, the watchdog interval."""

from __future__ import annotations

import os
import socket

from daemon.inbox.notify import Notifier, watchdog_interval_s


def test_messages_arrive_on_a_real_datagram_socket(tmp_path):
    """READY/STATUS/WATCHDOG/STOPPING arrive as datagrams on $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.ready("queued 0") and n.status("queued 1") and n.watchdog() and n.stopping()
        n.close()
        got = [server.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=queued 0", "STATUS=queued 1", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_namespace_address():
    """An @name address is sent to the abstract namespace (leading NUL)."""
    name = f"fine-tuner-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready() is True
        n.close()
        assert server.recv(4096) == b"READY=1"


def test_without_socket_everything_is_a_no_op():
    """Outside systemd nothing is sent and nothing fails."""
    n = Notifier({})
    assert (n.enabled, n.ready(), n.watchdog(), n.watchdog_interval_s) == (False, False, False, None)


def test_watchdog_interval_is_half_of_usec_for_this_pid():
    """The ping interval is half WATCHDOG_USEC, and none when WATCHDOG_PID names another process."""
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
