"""The single structlog configuration: JSON lines with ISO-8601 UTC timestamps.

Everything goes through the standard ``logging`` module so that one event can reach several sinks:
stdout (journald keeps it), ``fine_tuner.log`` in the log directory, and a per-job ``job.log``
(see ``job_log``), which receives only the lines bound to that job's ``job_id``.
Never log a cell value: log counts, column names, hashes and row numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import structlog

_ROOT = "fine_tuner"
ROOT_LOGGER = _ROOT  # the logger every line of ours goes through: handlers that observe events attach here

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def _formatter(roots: Mapping[str, str] | None = None) -> logging.Formatter:
    """JSON lines; with ``roots`` (folder → label, see ``portable``) every value naming one of
    those folders is written with the label instead (the copy of a job's lines in its folder)."""
    rewrite = []
    if roots:
        from .portable import scrub_value

        rewrite = [lambda _logger, _name, event: scrub_value(event, roots)]
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *rewrite,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
        foreign_pre_chain=_SHARED,
    )


_owner: str | None = None


def configure(*, level: int | str = logging.INFO, stream: IO[str] | None = sys.stdout,
              log_file: str | Path | None = None, owner: str | None = "app") -> None:
    """(Re)configure logging. ``stream`` None means no console output (library use).

    ``owner`` is "app" for the CLI and daemon, "library" when ``FineTuner`` set it up on its own;
    a library instance never overrides an application's configuration."""
    global _owner
    _owner = owner
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        if getattr(handler, "_fine_tuner_owned", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    root.propagate = False
    if stream is not None:
        _add(root, logging.StreamHandler(stream))
    if log_file is not None:
        Path(log_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # delay: a command that logs nothing (validate on a good file) leaves no empty log behind
        _add(root, _PrivateFileHandler(log_file, encoding="utf-8", delay=True))


class _PrivateFileHandler(logging.FileHandler):
    """A log file created 0600 whatever the umask: a library caller's process keeps its own
    umask, and the lines name the caller's files and models."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=lambda path, flags: os.open(path, flags, 0o600))


def _add(root: logging.Logger, handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(_formatter())
    handler._fine_tuner_owned = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    return handler


PACKAGE_DIR = Path(__file__).resolve().parent


def from_this_package(filename: str) -> bool:
    """True for a source file of fine-tuner's own package (any room): only our own warning texts
    may be shown or logged, a library's could quote data."""
    return Path(filename).resolve().is_relative_to(PACKAGE_DIR)


def get_logger(name: str = "") -> structlog.stdlib.BoundLogger:
    """A logger under the ``fine_tuner`` hierarchy (``name`` is the module, e.g. ``service``)."""
    return structlog.get_logger(f"{_ROOT}.{name}" if name else _ROOT)


class _JobFilter(logging.Filter):
    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return isinstance(msg, dict) and msg.get("job_id") == self.job_id


@contextlib.contextmanager
def job_log(path: str | Path, job_id: str, roots: Mapping[str, str] | None = None) -> Iterator[None]:
    """Copy every log line bound to ``job_id`` into ``path`` while the block runs (appending to an
    existing file); ``roots`` keeps the folders of this machine out of it (``portable.scrub``)."""
    _end_partial_line(Path(path))
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter(roots))
    handler.addFilter(_JobFilter(job_id))
    with attached(handler):
        yield


@contextlib.contextmanager
def attached(handler: logging.Handler) -> Iterator[None]:
    """``handler`` receives every line of ours while the block runs; closed afterwards."""
    root = logging.getLogger(_ROOT)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _end_partial_line(path: Path) -> None:
    """A log cut off mid-line (its process was killed) gets a newline, so that lines appended
    after it stay lines of their own."""
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
    except FileNotFoundError:
        pass


def configured_by() -> str | None:
    """Who configured logging in this process: "app", "library" or None."""
    return _owner
