"""The daemon's life: signals, --once, reload, sd_notify, two daemons, and kill -9 during a burst."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

MODEL_SET_OUTPUTS = ["Modelfile", "fine_tuning_metadata.json", "job.log", "model_set_config.json"]
# only datasets of 50 rows or more hold rows out, and fit the bag-of-words baseline on the others
HELD_OUT = ("baseline.json", "validation_data.jsonl")


def _check_invariants(root, stems: list[str]) -> None:
    """Every dataset is in exactly one of processed/ or failed/; every success has complete outputs."""
    places = Counter()
    for where in (root.processed, root.failed):
        for folder in where.iterdir():
            for name in os.listdir(folder):
                if name.endswith(".csv"):
                    places[name] += 1
    assert places == Counter({f"{s}.csv": 1 for s in stems})
    assert root.inputs_everywhere() == sorted(f"{s}.csv" for s in stems)
    successes = {p.name for p in root.processed.iterdir() if not (p / "duplicate.json").exists()}
    assert {p.name for p in root.outputs.iterdir()} == successes
    for job_id in successes:
        files = sorted(os.listdir(root.outputs / job_id))
        assert files in (MODEL_SET_OUTPUTS, sorted([*MODEL_SET_OUTPUTS, *HELD_OUT])), files
    assert leftovers(root.path) == []
    assert os.listdir(root.inbox / ".work") == []


@pytest.mark.slow  # about 45 s
def test_sigterm_during_work_exits_0_and_once_drains_the_rest(root, start_daemon):
    """SIGTERM while jobs run exits 0 leaving every input in one place; --once then drains and exits."""
    root.write_config(watch={"workers": 1})
    stems = [f"job{i:02d}" for i in range(8)]
    for i, stem in enumerate(stems):
        root.drop_dataset(stem, rows=600, seed=100 + i)
    d = start_daemon()
    d.wait_event("job_started")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.events("daemon_stopped")[-1]["exit_code"] == 0
    assert Counter(root.inputs_everywhere()) == Counter(f"{s}.csv" for s in stems)
    once = start_daemon("--once", log_name="daemon-once.log")
    assert once.wait_exit(timeout=120) == 0
    assert once.events("daemon_stopped")[-1]["reason"] == "drained"
    _check_invariants(root, stems)
    assert sorted(x["status"] for x in d.events("job_finished") + once.events("job_finished")).count("succeeded") == 8
    assert MARKER not in all_log_text(root)


def test_sighup_reloads_the_configuration(root, start_daemon):
    """After SIGHUP new jobs use the reloaded defaults."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.write_config(defaults={"topics": "influenza"})
    d.signal(signal.SIGHUP)
    d.wait_event("config_reloaded")
    root.drop_dataset("flu")
    wait_for(lambda: root.job_folders(root.processed, "flu"), timeout=20, message="processed")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    [done] = root.job_folders(root.processed, "flu")
    meta = json.loads((root.outputs / done.name / "fine_tuning_metadata.json").read_text())
    assert meta["parameters"]["topics"] == "influenza"


def test_config_error_exits_78(root):
    """An invalid configuration makes `watch` exit 78 (the unit does not restart on it)."""
    root.config.write_text("watch:\n  workers: 0\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "watch", "--config", str(root.config),
                           "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "watch.workers: must be at least 1" in proc.stderr


def test_sd_notify_ready_status_watchdog_stopping(root, start_daemon, tmp_path):
    """READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 arrive on a real AF_UNIX datagram socket."""
    path = str(tmp_path / "notify.sock")
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.setblocking(False)

        def drain() -> list[str]:
            while True:
                try:
                    received.append(server.recv(4096).decode())
                except BlockingIOError:
                    return received

        d = start_daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        wait_for(lambda: any(m.startswith("READY=1") for m in drain()), timeout=20, message="READY=1")
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3, timeout=10, message="3 watchdog pings")
        root.drop_dataset("notified")
        wait_for(lambda: root.job_folders(root.processed, "notified"), timeout=20, message="processed")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        drain()
    assert received.index("STOPPING=1") > 0
    statuses = [m for m in received if m.startswith("STATUS=")]
    assert "STATUS=queued 0, running 1, waiting 0" in statuses
    assert statuses[-1] == "STATUS=queued 0, running 0, waiting 0"


def test_two_daemons_on_one_inbox_never_process_a_job_twice(root, start_daemon):
    """Two daemons sharing an inbox process each of 30 drops exactly once."""
    a, b = start_daemon(log_name="daemon-a.log"), start_daemon(log_name="daemon-b.log")
    a.wait_event("daemon_ready")
    b.wait_event("daemon_ready")
    stems = [f"shared{i:02d}" for i in range(30)]
    for i, stem in enumerate(stems):
        root.drop_dataset(stem, seed=200 + i)
    wait_for(lambda: len(root.folders(root.processed)) == 30, timeout=60, message="30 processed")
    for d in (a, b):
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    started = [x["job_id"] for d in (a, b) for x in d.events("job_started")]
    assert sorted(started) == sorted(set(started)) and len(started) == 30
    _check_invariants(root, stems)


def test_kill_9_during_a_burst_loses_and_doubles_nothing(root, start_daemon):
    """kill -9 at random moments during 100 jobs, restarts: each input ends in one place, outputs whole."""
    rng = random.Random(1234)
    stems = [f"burst{i:03d}" for i in range(100)]
    for i, stem in enumerate(stems):
        root.drop_dataset(stem, seed=1000 + i)
    finished_before = 0
    for round_no in range(4):
        d = start_daemon(log_name=f"daemon-{round_no}.log")
        target = finished_before + rng.randint(1, 20)
        d.wait_event("daemon_ready", timeout=30)
        wait_for(lambda d=d, before=finished_before, target=target: len(d.events("job_finished")) + before >= target
                 or len(root.folders(root.processed)) + len(root.folders(root.failed)) >= 100,
                 timeout=60, message="some progress")
        finished_before += len(d.events("job_finished"))
        d.kill()  # kill -9 of its process group
    final = start_daemon("--once", log_name="daemon-final.log")
    assert final.wait_exit(timeout=120) == 0
    _check_invariants(root, stems)
    assert MARKER not in all_log_text(root)


def test_a_job_killed_max_attempts_times_fails_as_poison_without_leftovers(root, start_daemon):
    """A job whose process died max_attempts times goes to failed/ as PoisonJobError with the killed
    attempt's job.log; its half-built outputs/.tmp-<job_id> is removed."""
    root.write_config(watch={"max_attempts": 1})
    root.drop_dataset("big", rows=100_000)  # about a second of loading: still running when killed
    d = start_daemon()
    [started] = d.wait_event("job_started", timeout=30)
    job_id = started["job_id"]
    build_log = root.outputs / f".tmp-{job_id}" / "job.log"  # the killed attempt's partial build
    wait_for(lambda: build_log.is_file() and build_log.read_bytes().endswith(b"\n"), timeout=10,
             message="job_started in the build's job.log")
    d.kill()  # kill -9 of its process group
    with open(build_log, "ab") as fh:  # as if the kill had cut a line in half
        fh.write(b'{"event": "cut off by kill -9')
    again = start_daemon("--once", log_name="daemon-again.log")
    assert again.wait_exit(timeout=60) == 0
    [failed] = root.job_folders(root.failed, "big")
    error = json.loads((failed / "error.json").read_text())
    assert (error["error_type"], error["attempts"], error["job_id"]) == ("PoisonJobError", 1, job_id)
    assert sorted(os.listdir(failed)) == ["big.csv", "big.mapping.json", "error.json", "job.log"]
    lines = (failed / "job.log").read_text().splitlines()
    assert lines[-2] == '{"event": "cut off by kill -9'  # the outcome still gets a line of its own
    events = [json.loads(line)["event"] for line in lines[:-2] + lines[-1:]]
    assert (events[0], events[-1]) == ("job_started", "job_failed")
    assert os.listdir(root.outputs) == []
    assert leftovers(root.path) == []


@pytest.mark.slow  # two 100,000-row builds: a minute and a half
def test_a_killed_job_that_became_a_duplicate_leaves_no_partial_build(root, start_daemon):
    """Two drops of one content both killed while building: after a restart one succeeds, the other
    is a duplicate, and neither leaves an outputs/.tmp-<job_id> behind."""
    for stem in ("same1", "same2"):
        root.drop_dataset(stem, rows=100_000, seed=5)
    d = start_daemon()
    d.wait_event("job_started", count=2, timeout=30)
    d.kill()  # kill -9 of its process group
    assert len([p for p in root.outputs.iterdir() if p.name.startswith(".tmp-")]) == 2
    root.write_config(watch={"workers": 1})  # one after the other: the second sees the first's success
    again = start_daemon("--once", log_name="daemon-again.log")
    assert again.wait_exit(timeout=300) == 0  # about 90 s alone, more beside the rest of the suite
    assert sorted(x["status"] for x in again.events("job_finished")) == ["duplicate", "succeeded"]
    [duplicate] = [p for p in root.processed.iterdir() if (p / "duplicate.json").exists()]
    assert [p.name for p in root.outputs.iterdir()] == [
        x["job_id"] for x in again.events("job_finished") if x["status"] == "succeeded"]
    assert not (root.outputs / f".tmp-{duplicate.name}").exists()
    assert leftovers(root.path) == []


def test_two_signals_at_once_are_one_request_to_stop(root, start_daemon):
    """Two SIGTERMs arriving together (make or timeout forwarding to a process group) are one
    request: the daemon drains and exits 0 instead of leaving at once with exit 1."""
    root.write_config(watch={"workers": 1})
    root.drop_dataset("both", rows=600)
    d = start_daemon()
    d.wait_event("job_started")
    d.signal(signal.SIGTERM)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.events("daemon_stopped")[-1]["reason"] == "signal"


def test_once_refuses_unknown_entries_like_the_daemon(root, start_daemon):
    """`watch --once` leaves the inbox as the daemon would: unknown files and folders refused into
    failed/, datasets processed."""
    root.drop_bytes("x.txt", b"hello")
    (root.inbox / "dir3").mkdir()
    root.drop_dataset("drained")
    root.failed.mkdir(parents=True, exist_ok=True)
    interrupted = root.failed / ".refusing-y.txt-20261207T101010-0a1b2c3d"  # a stop in mid-refusal
    interrupted.mkdir()
    (interrupted / "y.txt").write_bytes(b"kept")
    once = start_daemon("--once")
    assert once.wait_exit(timeout=60) == 0
    assert sorted(n for n in os.listdir(root.inbox) if n not in ("processed", "failed", ".work")) == []
    assert sorted(p.name.split("-")[0] for p in root.failed.iterdir()) == ["dir3", "x.txt", "y.txt"]
    placed = root.failed / "y.txt-20261207T101010"
    assert (placed / "y.txt").read_bytes() == b"kept"
    assert json.loads((placed / "error.json").read_text())["error_type"] == "RecoveryError"
    assert len(root.job_folders(root.processed, "drained")) == 1


def _journal_root(state) -> list[tuple[str, str]]:
    """The journal_info rows of the journal in ``state`` (its schema checked to be version 5)."""
    with contextlib.closing(sqlite3.connect(state / "journal.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5
        return db.execute("SELECT key, value FROM journal_info").fetchall()


def test_a_state_folder_shared_by_two_roots_serves_only_the_first(root, start_daemon, tmp_path):
    """Two roots configured with one state folder: a journal written before roots were recorded
    gets the first daemon's root (its old jobs kept); `watch` on the second root exits 78 with one
    line naming both roots and what to do, and takes nothing from its inbox (no duplicate pointing
    at the first root's outputs); once the first root is moved elsewhere, its journal follows it."""
    from tests.inbox.test_journal import V1_SCHEMA
    from tests.integration.conftest import Root

    state = tmp_path / "shared-state"
    state.mkdir(mode=0o700)
    with contextlib.closing(sqlite3.connect(state / "journal.sqlite3")) as db:
        db.executescript(V1_SCHEMA)
    root.write_config(paths={"state_dir": str(state)})
    first = start_daemon()
    first.wait_event("daemon_ready")
    assert _journal_root(state) == [("root", str(root.path))]
    root.drop_dataset("flu")
    wait_for(lambda: root.job_folders(root.processed, "flu"), timeout=30, message="the first root's job")

    other = Root(tmp_path / "other")
    other.write_config(paths={"state_dir": str(state)})
    other.drop_dataset("flu")  # the same content: under a shared journal, a "duplicate" of the first root's
    second = start_daemon(on=other, log_dir=root.path, log_name="daemon-other.log")
    assert second.wait_exit() == 78
    [line] = second.err_path.read_text().splitlines()
    assert line == (f"fine-tuner: error: the journal {state / 'journal.sqlite3'} holds the jobs of the root "
                    f"{root.path}, not of {other.path} (give each root its own state directory "
                    "(paths.state_dir, or STATE_DIRECTORY under systemd), or start this daemon with that --root)")
    once = subprocess.run([sys.executable, "-m", "daemon", "watch", "--once", "--config", str(other.config),
                           "--root", str(other.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (once.returncode, once.stderr) == (78, line + "\n")
    assert sorted(p.name for p in other.inbox.iterdir() if p.is_file()) == ["flu.csv", "flu.mapping.json"]
    assert [os.listdir(other.inbox / d) for d in ("processed", "failed", ".work")] == [[], [], []]
    assert os.listdir(other.outputs) == []
    assert first.proc.poll() is None
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0

    moved = tmp_path / "moved"
    os.rename(root.path, moved)
    once = subprocess.run([sys.executable, "-m", "daemon", "watch", "--once", "--config", str(moved / "config.yaml"),
                           "--root", str(moved)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    [note] = [json.loads(x) for x in once.stdout.splitlines() if '"journal_root_moved"' in x]
    assert (note["previous_root"], note["root"]) == (str(root.path), str(moved))
    assert _journal_root(state) == [("root", str(moved))]
