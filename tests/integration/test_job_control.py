"""Day-to-day control of a running daemon: status with progress, status JOB_ID, cancel, retry.

A real daemon trains the tiny Llama (``tests/tiny_model.py``) for many epochs, so that a fine-tune is
in progress while the commands run as separate processes, the way an operator runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from daemon.inbox.journal import Journal
from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

LONG_FT_JOB = b"approach: fine_tune\nmodel: tiny-llama\nepochs: 60\nlearning_rate: 0.002\nbatch_size: 4\n"


def _cli(root, *args: str, code: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(root.config), "--root",
                           str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc.stdout if code == 0 else proc.stderr


def _children(pid: int) -> list[int]:
    """The daemon's child processes (the trainer child while a fine-tune trains)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(p) for p in fh.read().split()]
    return found


def _training_job(root):
    """The running job once status shows its training progress (percent and a rate), else None."""
    running = json.loads(_cli(root, "status", "--json"))["running"]
    if running and (running[0].get("progress") or {}).get("percent") is not None:
        return running[0]
    return None


def test_status_shows_progress_cancel_drops_a_queued_and_stops_a_running_fine_tune_and_retry_reruns(
        root, start_daemon, fake_ollama, tiny_model_dir):
    """While one fine-tune trains and a second waits for the lane: status shows the training's stage,
    percent, step, tokens/s and ETA and the second's wait; cancelling the waiting one fails it at
    once (inputs and error.json in failed/, reason cancelled) while training goes on; cancelling the
    training one stops its trainer child and removes its partial outputs, keeping its inputs;
    status JOB_ID shows the actions and the job's own events; retry drops the inputs again with the
    override in a new job file, and the new job succeeds."""
    fake_ollama.add_model("tiny-llama:latest", architecture="llama")
    root.write_config(ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      base_models={"tiny-llama:latest": str(tiny_model_dir)},
                      training={"sequence_len": 512, "device": "cpu", "grace_s": 2.0},
                      evaluation={"enabled": "off"})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("ft1.job.yaml", LONG_FT_JOB)
    root.drop_dataset("ft1", rows=60, seed=300)
    [started] = d.wait_event("training_started", timeout=120)
    first = started["job_id"]
    root.drop_bytes("ft2.job.yaml", LONG_FT_JOB)
    root.drop_dataset("ft2", rows=60, seed=301)
    waiting = d.wait_event("job_waiting_for_training", count=2, timeout=60)
    [second] = {w["job_id"] for w in waiting} - {first}

    job = wait_for(lambda: _training_job(root), timeout=180, interval=0.5, message="training progress in status")
    progress = job["progress"]
    last = d.events("training_progress")[-1]
    assert (job["job_id"], progress["stage"], progress["rate_unit"], progress["total"]) == (
        first, "training", "tokens", last["total_steps"])
    assert 0 < progress["percent"] < 100 and progress["rate"] > 0 and progress["eta_s"] >= 0
    report = json.loads(_cli(root, "status", "--json"))
    [queued] = report["queued"]
    assert (queued["job_id"], queued["progress"]["stage"]) == (second, "waiting for training (1 ahead)")
    text = _cli(root, "status").splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith(f"  {first}"))
    assert text[line + 1].startswith("    training ") and " tokens/s, about " in text[line + 1]

    out = _cli(root, "cancel", second)
    assert out.splitlines() == [f"cancel requested for {second} (queued)",
                                f"cancelled: {second}'s inputs are in failed/{second}/; "
                                f"'fine-tuner retry {second}' runs it again"]
    error = json.loads((root.failed / second / "error.json").read_text())
    assert (error["error_type"], error["reason"]) == ("JobCancelled", "cancelled")
    assert {"ft2.csv", "ft2.job.yaml", "ft2.mapping.json"} <= set(os.listdir(root.failed / second))
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert journal.get(first).state == "running"
    assert _children(d.proc.pid) != []

    assert _cli(root, "cancel", first).splitlines()[-1] == (
        f"cancelled: {first}'s inputs are in failed/{first}/; 'fine-tuner retry {first}' runs it again")
    assert _children(d.proc.pid) == []
    assert not (root.outputs / first).exists() and not (root.outputs / f".tmp-{first}").exists()
    assert {"ft1.csv", "ft1.job.yaml", "ft1.mapping.json", "error.json"} <= set(os.listdir(root.failed / first))
    assert sorted(e["job_id"] for e in d.events("job_cancelled")) == sorted([first, second])

    detail = json.loads(_cli(root, "status", first, "--json"))
    assert [a["event"] for a in detail["actions"]] == ["cancel_requested", "cancelled"]
    assert detail["state"] == "failed" and detail["error"]["error_type"] == "JobCancelled"
    assert {"training_started", "job_failed"} <= {e["event"] for e in detail["events"]}
    assert {f["name"] for f in detail["files"]} >= {"ft1.csv", "error.json", "job.log"}
    assert f"  {first}" in _cli(root, "status", "--failed")

    _cli(root, "cancel", first, code=1)  # a failed job cannot be cancelled again
    assert _cli(root, "retry", second, "--approach", "model_set").splitlines()[0] == (
        f"{second} dropped into the inbox again: ft2.job.yaml, ft2.mapping.json, ft2.csv")
    done = wait_for(lambda: [f for f in root.job_folders(root.processed, "ft2")], timeout=60,
                    message="the retried job processed")
    job_file = yaml.safe_load((done[0] / "ft2.job.yaml").read_text())
    assert (job_file["approach"], job_file["epochs"]) == ("model_set", 60)
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert [e["event"] for e in journal.events(second)] == ["cancel_requested", "cancelled", "retried"]
        assert journal.get(done[0].name).state == "succeeded"
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    assert leftovers(root.path) == []
    assert MARKER not in all_log_text(root)


def test_a_cancel_asked_while_no_daemon_runs_is_done_when_the_daemon_starts(root, start_daemon):
    """A job left queued by a stopped daemon and cancelled meanwhile is dropped to failed/ as
    cancelled at the next start, not run."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    root.drop_dataset("late", seed=5)
    journal_path = root.path / ".fine-tuner" / "journal.sqlite3"
    with Journal(journal_path) as journal:  # a claimed, queued job as a stopped daemon leaves it
        journal.add_job("late-20261203T000000-0000abcd", "late", [], "k")
    work = root.inbox / ".work" / "late-20261203T000000-0000abcd"
    work.mkdir(parents=True)
    for name in ("late.csv", "late.mapping.json"):
        os.rename(root.inbox / name, work / name)
    out = _cli(root, "cancel", "late-20261203T000000-0000abcd", "--wait", "0")
    assert out.splitlines() == ["cancel requested for late-20261203T000000-0000abcd (queued)"]
    d = start_daemon("--once", log_name="daemon-once.log")
    assert d.wait_exit(timeout=60) == 0
    error = json.loads((root.failed / "late-20261203T000000-0000abcd" / "error.json").read_text())
    assert error["reason"] == "cancelled"
    assert root.folders(root.processed) == []
    assert Path(root.failed / "late-20261203T000000-0000abcd" / "late.csv").is_file()


def _deleted_journal_files(pid: int) -> list[str]:
    """The journal files the process still has open although they were deleted (a split journal)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(link for link in links if "journal.sqlite3" in link and link.endswith(" (deleted)"))


def test_rating_by_topic_status_promote_and_cancel_keep_one_journal(root, start_daemon, fake_ollama):
    """While the daemon runs a rating job by topic, then status, promote and cancel run as other
    processes: the journal's write-ahead log stays on disk (the daemon never writes to a deleted
    one), every later job is visible to status, and cancel finds and stops a running rating job."""
    topic = "respiratory infections"
    fake_ollama.add_model("llama3.2:1b")
    slow = threading.Event()

    def answer(model, messages):
        if slow.is_set():  # a slow model: the second rating job takes 15 s, the daemon cancels in 1 s
            time.sleep(0.3)
        return json.dumps({"rationale": "x", "rating": 0})

    fake_ollama.chat_responder = answer
    root.write_config(defaults={"model": "llama3.2:1b", "topics": topic, "approach": "model_set"},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      evaluation={"enabled": "off"})
    wal = root.path / ".fine-tuner" / "journal.sqlite3-wal"
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_dataset("good", rows=40, seed=11)
    d.wait_event("job_finished")
    [good] = [p.name for p in root.job_folders(root.outputs, "good")]
    assert _cli(root, "promote", good).splitlines()[0] == (
        f"current model for '{topic}': job {good}, llama3.2-1b-good:latest")

    root.drop_bytes("first.job.yaml", f"task: rate\ntopic: {topic}\n".encode())
    root.drop_bytes("first.csv", root.dataset_bytes(20, 12))
    d.wait_event("job_finished", count=2)
    [first] = [p.name for p in root.job_folders(root.outputs, "first")]
    report = json.loads(_cli(root, "status", "--json"))
    assert (report["counts"]["succeeded"], report["running"]) == (2, [])
    assert (wal.exists(), _deleted_journal_files(d.proc.pid)) == (True, [])

    slow.set()
    root.drop_bytes("second.job.yaml", f"task: rate\ntopic: {topic}\n".encode())
    root.drop_bytes("second.csv", root.dataset_bytes(100, 13))
    [second] = wait_for(lambda: json.loads(_cli(root, "status", "--json"))["running"], timeout=60,
                        interval=0.5, message="the second rating job running in status")
    assert _cli(root, "promote", good).splitlines()[0] == (
        f"current model for '{topic}': job {good}, llama3.2-1b-good:latest")
    assert _cli(root, "cancel", second["job_id"]).splitlines() == [
        f"cancel requested for {second['job_id']} (running)",
        f"cancelled: {second['job_id']}'s inputs are in failed/{second['job_id']}/; "
        f"'fine-tuner retry {second['job_id']}' runs it again"]
    detail = json.loads(_cli(root, "status", second["job_id"], "--json"))
    assert (detail["state"], detail["error"]["error_type"]) == ("failed", "JobCancelled")
    assert (wal.exists(), _deleted_journal_files(d.proc.pid)) == (True, [])
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert [(j.id, j.state) for j in journal.jobs(["succeeded", "failed"])] == [
            (second["job_id"], "failed"), (first, "succeeded"), (good, "succeeded")]
        assert [e["event"] for e in journal.events(good)] == ["promoted", "promoted"]
    assert leftovers(root.path) == []
    assert MARKER not in all_log_text(root)
