"""The job journal: states, attempts, duplicate detection, refused files, WAL and sharing."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time

import pytest

from daemon.errors import JournalError
from daemon.journal import InputFile, Journal

INPUTS = [InputFile("dataset", "visits.csv", "a" * 64, 120), InputFile("mapping", "visits.mapping.json", "b" * 64, 40)]


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3") as j:
        yield j


def test_add_job_records_queued_row_once(journal):
    """A claimed job is recorded as queued with its inputs; the same id cannot be added twice."""
    assert journal.add_job("visits-20250101T000000-abcdef01", "visits", INPUTS, "k1") is True
    assert journal.add_job("visits-20250101T000000-abcdef01", "visits", INPUTS, "k1") is False
    job = journal.get("visits-20250101T000000-abcdef01")
    assert (job.state, job.attempts, job.stem, job.content_key, job.force) == ("queued", 0, "visits", "k1", False)
    assert job.inputs == tuple(INPUTS)


def test_start_counts_attempts_and_requeue_gives_one_back(journal):
    """start() counts an attempt; an interrupted job goes back to queued without counting it."""
    journal.add_job("j1", "s", INPUTS, "k")
    assert journal.start("j1") == 1
    assert journal.get("j1").state == "running"
    journal.requeue("j1", give_back_attempt=True)
    assert (journal.get("j1").state, journal.get("j1").attempts) == ("queued", 0)
    assert journal.start("j1") == 1
    assert journal.start("j1") == 2


def test_planned_fine_tune_waits_resumes_and_is_given_back_without_its_attempt(journal):
    """await_training keeps the attempt and marks approach fine_tune; resume runs it; requeue clears both."""
    journal.add_job("j1", "s", INPUTS, "k")
    assert journal.start("j1") == 1
    journal.await_training("j1")
    job = journal.get("j1")
    assert (job.state, job.attempts, job.approach) == ("queued", 1, "fine_tune")
    journal.resume("j1")
    job = journal.get("j1")
    assert (job.state, job.attempts, job.approach) == ("running", 1, "fine_tune")
    journal.requeue("j1", give_back_attempt=True)
    job = journal.get("j1")
    assert (job.state, job.attempts, job.approach) == ("queued", 0, None)


def test_success_owns_content_key_and_force_takes_it_over(journal):
    """A success becomes the owner of its content key; a forced reprocess becomes the new owner."""
    journal.add_job("j1", "s", INPUTS, "key")
    assert journal.success_for("key") is None
    journal.start("j1")
    journal.succeed("j1", output_path="/out/j1", approach="model_set")
    owner = journal.success_for("key")
    assert (owner.id, owner.state, owner.output_path, owner.approach) == ("j1", "succeeded", "/out/j1", "model_set")
    journal.add_job("j2", "s", INPUTS, "key", force=True)
    journal.start("j2")
    journal.succeed("j2", output_path="/out/j2", approach="model_set")
    assert journal.success_for("key").id == "j2"
    assert journal.get("j2").force is True


def test_duplicate_points_at_earlier_outputs(journal):
    """mark_duplicate records which job and outputs the content belongs to."""
    journal.add_job("j1", "s", INPUTS, "key")
    journal.succeed("j1", output_path="/out/j1", approach="model_set")
    journal.add_job("j2", "s", INPUTS, "key")
    journal.mark_duplicate("j2", of=journal.success_for("key"))
    dup = journal.get("j2")
    assert (dup.state, dup.duplicate_of, dup.output_path) == ("duplicate", "j1", "/out/j1")
    assert journal.success_for("key").id == "j1"


def test_fail_and_refused_rows_carry_errors(journal):
    """Failures and refused files are failed rows whose error fields read back unchanged."""
    journal.add_job("j1", "s", INPUTS, "k")
    journal.fail("j1", {"error_type": "MappingError", "message": "m", "hint": "h"})
    journal.record_refused("link.csv-20250101T000000", "link.csv", {"error_type": "RefusedInputError"}, size_bytes=3)
    assert journal.get("j1").error == {"error_type": "MappingError", "message": "m", "hint": "h"}
    refused = journal.get("link.csv-20250101T000000")
    assert (refused.state, refused.inputs[0].role, refused.inputs[0].name) == ("failed", "refused", "link.csv")
    assert journal.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 2, "duplicate": 0}
    assert [j.id for j in journal.jobs(["failed"], limit=1)] == ["link.csv-20250101T000000"]


def test_transaction_rolls_back_on_error(journal):
    """An exception inside transaction() leaves the journal unchanged."""
    journal.add_job("j1", "s", INPUTS, "k")
    with pytest.raises(RuntimeError):
        with journal.transaction() as db:
            db.execute("UPDATE jobs SET state = 'failed' WHERE id = 'j1'")
            raise RuntimeError("boom")
    assert journal.get("j1").state == "queued"


def test_wal_mode_and_a_second_connection_sees_writes(tmp_path):
    """The file is in WAL mode and two Journal objects on one file share their rows."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as a, Journal(path) as b:
        a.add_job("j1", "s", INPUTS, "k")
        assert b.get("j1").state == "queued"
        b.start("j1")
        assert a.get("j1").attempts == 1
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()


def test_invalid_state_is_rejected(journal):
    """The schema refuses a state outside queued/running/succeeded/failed/duplicate."""
    journal.add_job("j1", "s", INPUTS, "k")
    with pytest.raises(sqlite3.IntegrityError):
        with journal.transaction() as db:
            db.execute("UPDATE jobs SET state = 'lost' WHERE id = 'j1'")


_OPEN_AT_ONCE = """
import sys, time
from daemon.journal import Journal
path, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
for _ in range(20):
    with Journal(path) as j:
        j.counts()
"""


def test_processes_opening_a_new_journal_at_once_all_succeed(tmp_path):
    """Processes opening and closing one fresh journal file at the same moments all succeed (WAL switch races)."""
    for trial in range(5):
        path = tmp_path / f"journal-{trial}.sqlite3"
        start = time.time() + 1.0  # past every child's start-up, so the opens collide
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(path), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        results = [(p.wait(timeout=60), p.stderr.read().strip().splitlines()[-1:]) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert results == [(0, [])] * 6, trial
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _damaged(tmp_path, kind: str):
    """A journal file damaged in one of the ways seen in the field: empty, random bytes, cut in half."""
    path = tmp_path / "journal.sqlite3"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        with Journal(path) as j:
            for i in range(300):
                j.add_job(f"j{i}", "s", INPUTS, f"k{i}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_damaged_journal_is_refused_not_replaced(tmp_path, kind):
    """An empty, garbage or truncated journal raises JournalError naming the file; the file is kept
    as it was (its history is never silently replaced)."""
    path = _damaged(tmp_path, kind)
    before = path.read_bytes()
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert str(path) in info.value.message
    assert info.value.disk_full is False
    assert "move the damaged journal file aside" in info.value.hint
    assert path.read_bytes() == before


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def test_read_only_journal_is_a_journal_error(tmp_path):
    """A journal on a file system remounted read-only raises JournalError with a hint to make it
    writable."""
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "4m")
    try:
        with Journal(disk / "journal.sqlite3") as j:
            j.add_job("j1", "s", INPUTS, "k1")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(JournalError) as info:
            Journal(disk / "journal.sqlite3")
        assert "writable" in info.value.hint
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_write_is_a_journal_error_and_the_journal_recovers(tmp_path):
    """On a full disk a write raises JournalError with disk_full set; once space is freed the same
    journal object writes again and nothing earlier is lost."""
    disk = tmp_path / "full"
    _mount_tmpfs(disk, "2m")
    try:
        with Journal(disk / "journal.sqlite3") as j:
            j.add_job("before", "s", INPUTS, "k0")
            filler = disk / "filler"
            with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * 4096)
            with pytest.raises(JournalError) as info:
                for i in range(200):  # the WAL may still hold a page or two
                    j.add_job(f"j{i}", "s" * 2000, INPUTS, f"k{i}")
            assert info.value.disk_full is True
            filler.unlink()
            assert j.add_job("after", "s", INPUTS, "k1") is True
            assert (j.get("before").state, j.get("after").state) == ("queued", "queued")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_content_of_a_job_that_no_longer_succeeded_is_not_a_duplicate(journal):
    """success_for only returns a job that is still succeeded: content is never a duplicate of a
    job recorded as failed afterwards."""
    journal.add_job("j1", "s", INPUTS, "k")
    journal.start("j1")
    journal.succeed("j1", output_path="/o/j1", approach="model_set")
    assert journal.success_for("k").id == "j1"
    journal.fail("j1", {"error_type": "X"})
    assert journal.success_for("k") is None
