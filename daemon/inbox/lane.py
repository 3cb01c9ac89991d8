"""The training lane: one thread that runs one long job at a time, in arrival order.

A pool worker that has planned a fine-tune hands it over with ``submit`` and is free again; the
lane's thread (``loop``, started and watched by the service) takes the items one by one and runs
each through the callback it was given (the job runner, which knows what the item is; the lane does
not). Across processes, one fine-tune at a time holds too: ``machine_lock`` is an ``flock`` on a
file in the state directory shared by every daemon on the same root. ``close`` stops the lane taking
items and returns the ones still waiting, for the service to give back at shutdown; ``remove`` takes
waiting items out (a cancelled job).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..logconfig import get_logger

log = get_logger("lane")

LOCK_POLL_S = 0.5


class TrainingLane:
    def __init__(self, run_item: Callable[[Any], None]) -> None:
        self._run_item = run_item
        self._cv = threading.Condition()  # guards the three fields below
        self._queue: collections.deque = collections.deque()
        self._current: Any = None
        self._closed = False

    def submit(self, item: Any) -> int | None:
        """Queue ``item``; returns how many jobs are ahead of it, or None when the lane is closed
        (the service is stopping: the caller gives the job back)."""
        with self._cv:
            if self._closed:
                return None
            self._queue.append(item)
            self._cv.notify()
            return len(self._queue) - 1 + (self._current is not None)

    def loop(self) -> None:
        """The lane thread: run queued items one at a time until ``close``."""
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:  # the queue was handed back by close()
                    return
                item = self._queue.popleft()
                self._current = item
            try:
                self._run_item(item)
            finally:
                with self._cv:
                    self._current = None

    def remove(self, which: Callable[[Any], bool]) -> list:
        """Take the waiting items ``which`` picks out of the queue (a cancelled job); the running
        one is not among them."""
        with self._cv:
            taken = [item for item in self._queue if which(item)]
            for item in taken:
                self._queue.remove(item)
        return taken

    def close(self) -> list:
        """Stop taking items; returns those that were waiting."""
        with self._cv:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        return waiting

    def counts(self) -> tuple[int, int]:
        """(running now, waiting)."""
        with self._cv:
            return int(self._current is not None), len(self._queue)


@contextlib.contextmanager
def machine_lock(path: Path, stop: threading.Event) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (one fine-tune at a time across every daemon sharing
    the state directory), waiting for it while listening for ``stop``. Yields False when ``stop``
    was set first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    log.info("training_lock_wait", hint="another daemon sharing this state directory is "
                                                        "training; one fine-tune runs at a time")
                if stop.wait(LOCK_POLL_S):
                    yield False
                    return
        yield True
    finally:
        os.close(fd)  # closing drops the lock
