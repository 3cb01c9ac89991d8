"""Logging: JSON lines with UTC timestamps, job.log receives only its job's lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from daemon import logconfig


def test_json_lines_with_utc_timestamp_and_job_log(tmp_path):
    """Each event is one JSON object; job_log copies only lines bound to its job_id."""
    stream = io.StringIO()
    logconfig.configure(level="INFO", stream=stream, log_file=tmp_path / "fine_tuner.log")
    log = logconfig.get_logger("test")
    try:
        with logconfig.job_log(tmp_path / "job.log", "job-1"):
            with structlog.contextvars.bound_contextvars(job_id="job-1"):
                log.info("job_started", rows=3)
            with structlog.contextvars.bound_contextvars(job_id="job-2"):
                log.info("job_started", rows=4)
            log.debug("hidden_debug")
    finally:
        logconfig.configure(level="INFO", stream=None, log_file=None, owner=None)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["job_id"], e["rows"]) for e in lines] == [("job_started", "job-1", 3),
                                                                    ("job_started", "job-2", 4)]
    assert lines[0]["level"] == "info" and lines[0]["timestamp"].endswith("Z")
    job_lines = [json.loads(line) for line in (tmp_path / "job.log").read_text().splitlines()]
    assert [(e["event"], e["job_id"]) for e in job_lines] == [("job_started", "job-1")]
    file_lines = (tmp_path / "fine_tuner.log").read_text().splitlines()
    assert len(file_lines) == 2


def test_job_log_appends_on_a_line_of_its_own_after_a_cut_off_line(tmp_path):
    """A job.log whose last line was cut by a kill gets a newline first, so the next line parses."""
    path = tmp_path / "job.log"
    path.write_bytes(b'{"event": "job_started", "job_id": "job-1"}\n{"event": "cut off')
    logconfig.configure(level="INFO", stream=io.StringIO(), log_file=None)
    try:
        with logconfig.job_log(path, "job-1"):
            with structlog.contextvars.bound_contextvars(job_id="job-1"):
                logconfig.get_logger("test").warning("job_failed")
    finally:
        logconfig.configure(level="INFO", stream=None, log_file=None, owner=None)
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"event": "job_started", "job_id": "job-1"}', '{"event": "cut off']
    assert [json.loads(line)["event"] for line in lines[2:]] == ["job_failed"]


def test_files_of_every_room_count_as_this_package():
    """A warning raised in any room (data/, inbox/, the top level) is ours; a library's is not."""
    package = Path(logconfig.__file__).resolve().parent
    assert [logconfig.from_this_package(str(p)) for p in (
        package / "data" / "dataset.py", package / "inbox" / "service.py", package / "cli.py",
        Path(structlog.__file__))] == [True, True, True, False]


def _umask_022() -> None:
    os.umask(0o022)


_LIBRARY_USE = """
from daemon import FineTuner
from daemon.logconfig import get_logger
FineTuner(config={"paths": {"root": "."}})
get_logger("test").info("library_line")
"""


def test_fine_tuner_log_is_its_users_only_from_the_command_line_and_the_library(tmp_path):
    """Run with umask 022 in the working folder, `fine-tuner check` (the command line) and a
    library FineTuner each write fine_tuner.log 0600 there (it names the caller's files and
    models)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9", "FINE_TUNER_OLLAMA__RETRIES": "0"}
    modes = {}
    for name, argv in [("cli", ["-m", "daemon", "check", "llama3.2:1b"]), ("library", ["-c", _LIBRARY_USE])]:
        (tmp_path / name).mkdir()
        res = subprocess.run([sys.executable, *argv], cwd=tmp_path / name, env=env, capture_output=True, text=True,
                             timeout=120, preexec_fn=_umask_022)
        assert res.returncode == (1 if name == "cli" else 0), res.stderr
        log = tmp_path / name / "fine_tuner.log"
        modes[name] = oct(log.stat().st_mode & 0o777)
        assert log.read_text().count("\n") >= 1
    assert modes == {"cli": "0o600", "library": "0o600"}
