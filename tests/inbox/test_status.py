"""``fine-tuner status`` over a real journal: finished jobs' details, filters, a limit, a running job's
progress as its own log events report it, and reading while another process holds a write lock."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys

import structlog
import yaml

from daemon import logconfig
from daemon.config import load_config
from daemon.inbox.journal import InputFile, Journal
from daemon.inbox.progress import recording
from daemon.inbox.status import format_status, status

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _root(tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / ".fine-tuner").mkdir()
    return (load_config(None, {}, overrides={"paths": {"root": str(tmp_path)}}),
            tmp_path / ".fine-tuner" / "journal.sqlite3")


def _finished(journal, tmp_path, job_id, topic, *, used=80, name="m:latest"):
    out = tmp_path / "outputs" / job_id
    out.mkdir(parents=True)
    (out / "fine_tuning_metadata.json").write_text(json.dumps({
        "target_topics": [topic], "model": "llama3.2:1b", "rows": {"read": used, "used": used},
        "duration_s": 125.0, "registration": {"registered": True, "name": name}, "warnings": []}))
    journal.add_job(job_id, job_id, [InputFile("dataset", f"{job_id}.csv", "ab" * 32, 10)], job_id)
    journal.start(job_id)
    journal.succeed(job_id, output_path=str(out), approach="model_set")


def test_finished_jobs_show_topic_base_rows_duration_and_ollama_name_and_filter(tmp_path):
    """A finished job lists its topic, base model, rows, duration and Ollama name; --topic matches
    without case, --failed keeps failures, --limit caps the list."""
    cfg, path = _root(tmp_path)
    with Journal(path) as journal:
        _finished(journal, tmp_path, "a1", "Respiratory infections", name="a:latest")
        _finished(journal, tmp_path, "b1", "falls")
        _finished(journal, tmp_path, "a2", "respiratory infections", name="a2:latest")
        journal.add_job("f1", "f1", [], "kf")
        journal.fail("f1", {"error_type": "DatasetError", "message": "no rows", "hint": "add rows"})
    report = status(cfg, topic="RESPIRATORY  infections")
    assert [j["job_id"] for j in report["recent_succeeded"]] == ["a2", "a1"]
    assert {k: report["recent_succeeded"][1][k]
            for k in ("topics", "base_model", "rows", "duration_s", "ollama_name")} == {
        "topics": ["Respiratory infections"], "base_model": "llama3.2:1b", "rows": 80, "duration_s": 125.0,
        "ollama_name": "a:latest"}
    assert format_status(report).splitlines()[4] == (
        "    topic respiratory infections; base llama3.2:1b; 80 rows; took 2 min; in Ollama as a2:latest")
    assert [j["job_id"] for j in status(cfg, limit=1)["recent_succeeded"]] == ["a2"]
    failed = status(cfg, failed_only=True)
    assert (failed["recent_succeeded"], [j["job_id"] for j in failed["recent_failed"]]) == ([], ["f1"])
    assert [j["job_id"] for j in status(cfg, since="2999-01-01T00:00:00.000+00:00")["recent_succeeded"]] == []


def test_a_running_job_shows_the_progress_its_log_events_report(tmp_path):
    """Rating progress logged with the job id bound becomes the job's progress row (percent from
    done/total, records/s, ETA); another job's lines do not."""
    cfg, path = _root(tmp_path)
    logconfig.configure(stream=None)  # as the daemon does, without a console
    log = logconfig.get_logger("test")
    try:
        with Journal(path) as journal:
            journal.add_job("r1", "r1", [], "k")
            journal.start("r1")
            with recording(journal, "r1"):
                with structlog.contextvars.bound_contextvars(job_id="other"):
                    log.info("rating_progress", done=1, total=2, records_per_s=9.0, eta_s=1.0)
                with structlog.contextvars.bound_contextvars(job_id="r1"):
                    log.info("rating_progress", done=50, total=200, records_per_s=2.5, eta_s=60.0)
            assert journal.progress("other") is None
            row = journal.progress("r1")
    finally:  # later tests in this process configure logging as a library would
        logconfig.configure(stream=None, owner=None)
    assert {k: row[k] for k in ("stage", "percent", "done", "total", "rate", "rate_unit", "eta_s")} == {
        "stage": "rating", "percent": 25.0, "done": 50, "total": 200, "rate": 2.5, "rate_unit": "records",
        "eta_s": 60.0}
    running = status(cfg)["running"]
    assert format_status(status(cfg)).splitlines()[4] == (
        "    rating 25 % (record 50 of 200), 2.5 records/s, about 60 s left")
    assert running[0]["progress"]["stage"] == "rating"


def test_status_reads_while_another_process_holds_the_write_lock(tmp_path):
    """A daemon in the middle of a write transaction does not make status wait: it answers from the
    last committed state (SQLite's write-ahead log)."""
    cfg, path = _root(tmp_path)
    with Journal(path) as journal:
        _finished(journal, tmp_path, "a1", "falls")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"paths": {"root": str(tmp_path)}}))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET state = 'failed' WHERE id = 'a1'")
        proc = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--config", str(config)],
                              cwd=REPO, capture_output=True, text=True, timeout=20)
        writer.execute("ROLLBACK")
    assert proc.returncode == 0, proc.stderr
    assert [j["job_id"] for j in json.loads(proc.stdout)["recent_succeeded"]] == ["a1"]


def test_a_job_not_evaluated_or_registered_says_why_on_its_lines(tmp_path):
    """A finished job whose model was neither evaluated nor registered shows both reasons, as the
    job recorded them, on its status lines."""
    cfg, path = _root(tmp_path)
    out = tmp_path / "outputs" / "quick1"
    out.mkdir(parents=True)
    (out / "fine_tuning_metadata.json").write_text(json.dumps({
        "target_topics": ["falls"], "model": "llama3.2:1b", "rows": {"read": 40, "used": 40}, "duration_s": 0.3,
        "registration": {"registered": False, "reason": "Ollama is not reachable at http://127.0.0.1:11434"},
        "evaluation": {"status": "skipped", "reason": "there are no held-out rows (fewer than 50 usable rows)"},
        "warnings": []}))
    with Journal(path) as journal:
        journal.add_job("quick1", "quick1", [InputFile("dataset", "quick1.csv", "ab" * 32, 10)], "quick1")
        journal.start("quick1")
        journal.succeed("quick1", output_path=str(out), approach="model_set")
    lines = format_status(status(cfg)).splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("  quick1")]
    assert lines[at].endswith("  not evaluated: there are no held-out rows (fewer than 50 usable rows)")
    assert lines[at + 1] == ("    topic falls; base llama3.2:1b; 40 rows; took 0 s; "
                             "not in Ollama: Ollama is not reachable at http://127.0.0.1:11434")


def test_a_running_evaluation_shows_its_estimate_then_its_progress_with_the_whole_time_left(tmp_path):
    """The evaluation's estimate is the job's progress line until the first model's progress
    replaces it; that line's time left is the whole evaluation's (evaluation_eta_s)."""
    cfg, path = _root(tmp_path)
    logconfig.configure(stream=None)
    log = logconfig.get_logger("test")
    lines = []
    try:
        with Journal(path) as journal:
            journal.add_job("e1", "e1", [], "k")
            journal.start("e1")
            with recording(journal, "e1"), structlog.contextvars.bound_contextvars(job_id="e1"):
                log.info("evaluation_estimated", backend="ollama", rows=20, models=2, seconds=80.0,
                         measured_records=2, records_per_s=0.5)
                lines.append(format_status(status(cfg)).splitlines()[4])
                log.info("evaluation_progress", model="new", done=5, total=20, percent=25.0, records_per_s=0.5,
                         eta_s=30.0, evaluation_eta_s=70.0)
                lines.append(format_status(status(cfg)).splitlines()[4])
    finally:
        logconfig.configure(stream=None, owner=None)
    assert lines == ["    evaluation (estimated: 2 model(s) x 20 records), 0.5 records/s, about 80 s left",
                     "    evaluation (new) 25 % (record 5 of 20), 0.5 records/s, about 70 s left"]
