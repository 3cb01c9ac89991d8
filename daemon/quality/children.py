"""Following a child process we started to rate or to compute features (the local rater's
``python -m daemon.quality.generate``, the head's ``python -m daemon.training.features``): its
JSON progress lines relayed to the caller, its stop on a stop request or a timeout, and what went
wrong from the last line of its stderr. The child's output is never kept or logged: it could quote
record text.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[int, int], None]  # (done, total)
STDERR_TAIL_BYTES = 2000


def follow_child(proc: subprocess.Popen, on_progress: Progress | None, stop_event: threading.Event | None,
                 timeout_s: float | None, grace_s: float, *, event: str, name: str) -> str:
    """Relay a child's ``event`` progress lines (its stdout) until it exits, is stopped or times
    out, then stop its process group: "done", "interrupted" or "timed_out". The local rater's and
    the head's children are followed this way."""
    from ..training.supervisor import terminate_group

    started = time.monotonic()
    outcome = "done"
    # in the caller's context: its progress lines carry the job's job_id (status, job.log)
    reader = threading.Thread(target=contextvars.copy_context().run, args=(_relay, proc.stdout, on_progress, event),
                              name=name, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if stop_event is not None and stop_event.is_set():
                outcome = "interrupted"
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                outcome = "timed_out"
                break
            time.sleep(0.05)
    finally:
        terminate_group(proc, grace_s if proc.poll() is None else 0)
        reader.join(timeout=5)
        with contextlib.suppress(OSError):
            proc.stdout.close()
    return outcome


def _relay(stream, on_progress: Progress | None, name: str) -> None:
    """Read the child's stdout: JSON progress lines named ``name`` go to ``on_progress``; nothing is kept."""
    for raw in iter(stream.readline, b""):
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if on_progress is not None and isinstance(event, dict) and event.get("event") == name:
            with contextlib.suppress(TypeError, ValueError, KeyError):
                on_progress(int(event["done"]), int(event["total"]))


def last_line(path: Path) -> str:
    """What went wrong in the child, from the last line of its stderr: only the part before the
    first colon (an exception type or our own error prefix), since a library's message could quote
    record text."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - STDERR_TAIL_BYTES))
            lines = fh.read().decode("utf-8", errors="replace").strip().splitlines()
            if lines:
                return lines[-1].split(":", 1)[0][:120]
    return "no error output"
