"""What a running job is doing, for ``status``: a logging handler that turns the job's own progress
events into the journal's progress row.

The events are the ones the job already logs (``job_started``, ``stage_started``,
``training_progress``, ``evaluation_estimated``, ``evaluation_progress``, ``rating_progress``), so
the log and ``status`` never disagree. A row is written when the stage changes and otherwise at most
once per ``every_s``; a journal that cannot take it (busy, full) costs the job nothing: progress is
best effort.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from ..errors import JournalError
from ..logconfig import attached
from .journal import Journal

STAGE_NAMES = {"load": "loading", "capability": "checking the model", "training_data": "writing training data",
               "model_set": "building the model set", "training": "training", "registration": "registering",
               "evaluation": "evaluation", "reload": "loading", "head": "fitting the head"}


def progress_row(event: dict) -> dict[str, Any] | None:
    """The progress row an event means, or None for an event that says nothing about progress."""
    name = event.get("event")
    if name == "job_started":
        return {"stage": "rating" if event.get("task") == "rate" else "starting"}
    if name == "stage_started":
        return {"stage": STAGE_NAMES.get(str(event.get("stage")), str(event.get("stage")))}
    if name == "training_lane_started":
        return {"stage": "training"}
    if name == "training_progress":
        return {"stage": "training", "percent": _number(event.get("percent")), "done": event.get("step"),
                "total": event.get("total_steps"), "rate": _number(event.get("tokens_per_s")),
                "rate_unit": "tokens", "eta_s": _number(event.get("eta_s"))}
    if name == "evaluation_estimated":  # shown until the first model's own progress replaces it
        return {"stage": f"evaluation (estimated: {event.get('models')} model(s) x {event.get('rows')} records)",
                "rate": _number(event.get("records_per_s")), "rate_unit": "records",
                "eta_s": _number(event.get("seconds"))}
    if name in ("evaluation_progress", "rating_progress"):
        done, total = event.get("done"), event.get("total")
        percent = 100.0 * done / total if isinstance(done, int) and isinstance(total, int) and total else None
        stage = f"evaluation ({event.get('model')})" if name == "evaluation_progress" else "rating"
        # an evaluation's time left is the whole evaluation's: the models after this one too
        eta = _number(event.get("evaluation_eta_s"))
        return {"stage": stage, "percent": percent, "done": done, "total": total,
                "rate": _number(event.get("records_per_s")), "rate_unit": "records",
                "eta_s": eta if eta is not None else _number(event.get("eta_s"))}
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class ProgressRecorder(logging.Handler):
    """Writes the progress of one job (the log lines bound to its ``job_id``) into the journal."""

    def __init__(self, journal: Journal, job_id: str, every_s: float = 1.0) -> None:
        super().__init__()
        self.journal, self.job_id, self.every_s = journal, job_id, every_s
        self._stage: str | None = None
        self._written_at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg
        if not isinstance(event, dict) or event.get("job_id") != self.job_id:
            return
        row = progress_row(event)
        if row is None:
            return
        now = time.monotonic()
        finished = row.get("done") is not None and row.get("done") == row.get("total")
        if row["stage"] == self._stage and not finished and now - self._written_at < self.every_s:
            return
        self._stage, self._written_at = row["stage"], now
        with contextlib.suppress(JournalError):
            self.journal.set_progress(self.job_id, **row)


@contextlib.contextmanager
def recording(journal: Journal, job_id: str) -> Iterator[None]:
    """Record the job's progress while the block runs."""
    with attached(ProgressRecorder(journal, job_id)):
        yield
