"""The job journal: states, attempts, duplicate detection, refused files, WAL and sharing."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import mounted

from daemon.errors import JournalError
from daemon.inbox.journal import InputFile, Journal, TrainingSet

DAMAGED_HINT = ("move the damaged journal file aside, with its -wal and -shm files if any; the service "
                "then starts with a new, empty journal")
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
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5
    finally:
        db.close()


_OPEN_AND_CLOSE = """
import sys
from daemon.inbox.journal import Journal
with Journal(sys.argv[1]) as j:
    j.counts()
"""


def test_a_second_journal_in_a_process_leaves_the_first_ones_locks(tmp_path):
    """A second Journal opened and closed on the file in a process that holds one leaves the first
    one's locks: another process closing its own Journal then keeps the write-ahead log, which the
    first one goes on writing to."""
    path = tmp_path / "journal.sqlite3"
    wal = tmp_path / "journal.sqlite3-wal"
    with Journal(path) as first:
        first.add_job("j1", "s", INPUTS, "k1")
        Journal(path).close()
        subprocess.run([sys.executable, "-c", _OPEN_AND_CLOSE, str(path)], check=True, timeout=60)
        assert wal.exists()
        first.add_job("j2", "s", INPUTS, "k2")
        probe = subprocess.run([sys.executable, "-c", "import sqlite3, sys\n"
                                "db = sqlite3.connect(sys.argv[1])\n"
                                "print(db.execute('SELECT COUNT(*) FROM jobs').fetchone()[0])\ndb.close()",
                                str(path)], check=True, timeout=60, capture_output=True, text=True)
        assert (probe.stdout, wal.exists()) == ("2\n", True)


def test_invalid_state_is_rejected(journal):
    """The schema refuses a state outside queued/running/succeeded/failed/duplicate."""
    journal.add_job("j1", "s", INPUTS, "k")
    with pytest.raises(sqlite3.IntegrityError):
        with journal.transaction() as db:
            db.execute("UPDATE jobs SET state = 'lost' WHERE id = 'j1'")


_OPEN_AT_ONCE = """
import sys, time
from daemon.inbox.journal import Journal
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
    assert (info.value.path, info.value.disk_full) == (str(path), False)
    assert info.value.hint == DAMAGED_HINT
    assert path.read_bytes() == before


def _tmpfs(path, size: str):
    path.mkdir()
    return mounted(path, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


def _fill(disk) -> None:
    """Write a filler file until the disk says it is full."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)


WRITABLE_HINT = "make the state directory and the journal writable for the service, then start it again"


@pytest.mark.parametrize("how", ["remounted", "bind"])
def test_read_only_journal_is_a_journal_error(tmp_path, how):
    """A journal on a file system remounted read-only, or bind-mounted read-only into a writable
    folder, is refused when opened (not at the first write) with a hint to make it writable."""
    disk = tmp_path / "ro"
    with _tmpfs(disk, "4m"):
        path = disk / "journal.sqlite3"
        with Journal(path) as j:
            j.add_job("j1", "s", INPUTS, "k1")
        target = disk if how == "remounted" else path
        with mounted(target, "--bind", str(target)) if how == "bind" else contextlib.nullcontext():
            subprocess.run(["mount", "-o", "remount,bind,ro" if how == "bind" else "remount,ro",
                            str(target)], check=True)
            with pytest.raises(JournalError) as info:
                Journal(path)
        assert info.value.message == f"the journal {path} is not writable: Read-only file system"
        assert (info.value.hint, info.value.reason, info.value.disk_full) == (
            WRITABLE_HINT, "Read-only file system", False)


def _write(method: str, j: Journal, i: int) -> None:
    """One call of a writing method of the journal, sized so that a few calls fill a small disk."""
    big = "x" * 2000
    if method == "add_job":
        j.add_job(f"n{i}", big, INPUTS, f"n{i}")
    elif method == "record_refused":
        j.record_refused(f"r{i}", "r.csv", {"error_type": "RefusedInputError", "detail": big}, size_bytes=1)
    elif method == "fail":
        j.fail("j1", {"error_type": "MappingError", "detail": big})
    elif method == "succeed":
        j.succeed("j1", output_path=f"/out/{big}", approach="model_set")
    elif method == "mark_duplicate":
        j.mark_duplicate("j1", of=j.get("j0"))
    elif method == "requeue":
        j.requeue("j1", give_back_attempt=False)
    else:
        getattr(j, method)("j1")


@pytest.mark.parametrize("method", ["add_job", "start", "await_training", "resume", "requeue", "fail",
                                    "succeed", "mark_duplicate", "record_refused"])
def test_full_disk_write_is_a_journal_error_and_the_journal_recovers(tmp_path, method):
    """On a full disk every writing method raises JournalError with disk_full set and SQLite's
    reason; once space is freed the same journal object writes again and nothing earlier is lost."""
    disk = tmp_path / "full"
    with _tmpfs(disk, "2m"), Journal(disk / "journal.sqlite3") as j:
        j.add_job("j0", "s", INPUTS, "k0")
        j.succeed("j0", output_path="/out/j0", approach="model_set")
        j.add_job("j1", "s", INPUTS, "k1")
        _fill(disk)
        with pytest.raises(JournalError) as info:
            for i in range(500):  # the WAL may still hold a page or two
                _write(method, j, i)
        assert (info.value.disk_full, info.value.reason) == (True, "database or disk is full")
        assert info.value.message.startswith(f"the journal {disk / 'journal.sqlite3'} could not be written: ")
        (disk / "filler").unlink()
        _write(method, j, 1000)
        assert (j.get("j0").state, j.get("j0").output_path) == ("succeeded", "/out/j0")
        assert j.get("j1") is not None


def test_existing_journal_on_a_full_disk_is_disk_full_and_opens_once_space_is_free(tmp_path):
    """Opening a journal on a full disk (SQLite cannot size its shared-memory file) raises a
    JournalError with disk_full set, not a damaged-file error; with space again it opens unchanged."""
    disk = tmp_path / "full"
    with _tmpfs(disk, "2m"):
        path = disk / "journal.sqlite3"
        with Journal(path) as j:
            j.add_job("j1", "s", INPUTS, "k1")
        _fill(disk)
        with pytest.raises(JournalError) as info:
            Journal(path)
        assert info.value.disk_full is True
        assert info.value.hint == "free space on its disk; the service retries by itself"
        (disk / "filler").unlink()
        with Journal(path) as j:
            assert j.get("j1").state == "queued"


def test_journal_error_to_dict_names_the_file_and_the_reason():
    """JournalError carries the file, SQLite's short reason and disk_full, also in to_dict()."""
    exc = JournalError("the journal /s/journal.sqlite3 could not be written: database or disk is full",
                       path="/s/journal.sqlite3", reason="database or disk is full", disk_full=True,
                       hint="free space on its disk; the service retries by itself")
    assert exc.to_dict() == {
        "error_type": "JournalError",
        "message": "the journal /s/journal.sqlite3 could not be written: database or disk is full",
        "hint": "free space on its disk; the service retries by itself",
        "path": "/s/journal.sqlite3", "reason": "database or disk is full", "disk_full": True}
    assert (JournalError("m").path, JournalError("m").reason, JournalError("m").disk_full) == (None, None, False)


def test_dangling_symlink_in_place_of_the_journal_is_refused(tmp_path):
    """A symbolic link to a missing file where the journal should be is a JournalError naming it,
    not a traceback; nothing is created at the link's target."""
    path = tmp_path / "journal.sqlite3"
    path.symlink_to(tmp_path / "gone" / "journal.sqlite3")
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert info.value.message == f"the journal {path} is a symbolic link to a missing file"
    assert info.value.hint == "point the link at the journal, or remove it to start with a new, empty journal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.sqlite3"]


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_something_else_than_a_file_in_place_of_the_journal_is_refused(tmp_path, kind):
    """A folder or a FIFO where the journal should be is refused as not a regular file (a FIFO is
    never opened, so nothing blocks on it)."""
    path = tmp_path / "journal.sqlite3"
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert info.value.message == f"the journal {path} is not a regular file"
    assert info.value.hint == "move it aside; the service then starts with a new, empty journal"


_LEAVE_A_WAL = """
import os, sys
from daemon.inbox.journal import InputFile, Journal
j = Journal(sys.argv[1])
for i in range(20):
    j.add_job(f"j{i}", "s", [InputFile("dataset", "v.csv", "a" * 64, 1)], f"k{i}")
os._exit(0)  # killed: the write-ahead log is left behind, never checkpointed
"""


def test_write_ahead_log_left_without_its_journal_is_refused(tmp_path):
    """A -wal file whose journal was moved away alone is refused: a new journal would take in the
    old journal's pages (and the moved file would lose them)."""
    path = tmp_path / "journal.sqlite3"
    subprocess.run([sys.executable, "-c", _LEAVE_A_WAL, str(path)], check=True)
    path.rename(tmp_path / "aside.sqlite3")
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert info.value.message == (f"the journal {path} is missing but its write-ahead log "
                                  f"{path}-wal is still there")
    assert info.value.hint == ("put the journal back beside it, or move journal.sqlite3-wal and "
                               "journal.sqlite3-shm aside too to start with a new, empty journal")
    assert not path.exists()
    with contextlib.closing(sqlite3.connect(tmp_path / "aside.sqlite3")) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0  # its rows are in the -wal


def test_journal_of_a_newer_schema_is_refused_and_kept(tmp_path):
    """A journal whose user_version is newer than this code's is refused, never downgraded."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        j.add_job("j1", "s", INPUTS, "k1")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 6")
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert info.value.message == (f"the journal {path} has schema version 6; this fine-tuner "
                                  "knows version 5")
    assert info.value.hint == "run the fine-tuner version that wrote it, or move it aside to start a new journal"
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 6


def test_locked_journal_is_a_journal_error_that_does_not_say_to_move_it(tmp_path):
    """A journal locked by another process past the busy timeout raises JournalError with a hint
    about the other process, never "move it aside" (it is not damaged)."""
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other, \
            Journal(path, busy_timeout_s=0.2) as j:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(JournalError) as info:
            j.add_job("j1", "s", INPUTS, "k1")
        other.execute("ROLLBACK")
        assert (info.value.reason, info.value.disk_full) == ("database is locked", False)
        assert info.value.hint == ("another process holds the journal locked: stop a second fine-tuner "
                                   "using this state directory, or try again")
        assert j.add_job("j1", "s", INPUTS, "k1") is True


def test_damaged_row_is_a_journal_error_without_its_contents(tmp_path):
    """A row whose inputs are not the JSON the journal wrote raises JournalError on read (not a raw
    JSONDecodeError), and the message does not quote the row."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        j.add_job("j1", "s", INPUTS, "k1")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE jobs SET inputs = '{ZZROWMARKER' WHERE id = 'j1'")
    with Journal(path) as j:
        with pytest.raises(JournalError) as info:
            j.get("j1")
        with pytest.raises(JournalError):
            j.jobs(["queued"])
    assert info.value.message == f"the journal {path} has a damaged row in its jobs table (JSONDecodeError)"
    assert info.value.hint == DAMAGED_HINT


def test_a_row_nested_too_deeply_is_a_journal_error(tmp_path):
    """A row whose error JSON is nested 100,000 levels deep raises JournalError naming the file and
    RecursionError, not a RecursionError."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        j.add_job("j1", "s", INPUTS, "k1")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE jobs SET error = ? WHERE id = 'j1'", ("[" * 100_000 + "]" * 100_000,))
    with Journal(path) as j, pytest.raises(JournalError) as info:
        j.get("j1")
    assert info.value.message == f"the journal {path} has a damaged row in its jobs table (RecursionError)"


@pytest.mark.parametrize("read", ["get", "jobs", "counts", "success_for"])
def test_reads_of_a_journal_damaged_while_open_are_journal_errors(tmp_path, read):
    """Pages overwritten under an open journal make each read raise JournalError (SQLite's short
    reason, no raw sqlite3 error)."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        for i in range(300):
            j.add_job(f"j{i}", "s", INPUTS, f"k{i}")
        j.succeed("j1", output_path="/out/j1", approach="model_set")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            size = path.stat().st_size
            with open(path, "r+b") as fh:  # every page but the first (the schema)
                fh.seek(4096)
                fh.write((bytes(range(256)) * (size // 256))[: size - 4096])
            other.execute("PRAGMA user_version = 2")  # a commit: open connections drop their cache
        call = {"get": lambda: j.get("j5"), "jobs": lambda: j.jobs(["queued"]),
                "counts": j.counts, "success_for": lambda: j.success_for("k1")}[read]
        with pytest.raises(JournalError) as info:
            call()
    assert info.value.message == f"the journal {path} could not be read: database disk image is malformed"
    assert (info.value.reason, info.value.hint) == ("database disk image is malformed", DAMAGED_HINT)


def test_content_of_a_job_that_no_longer_succeeded_is_not_a_duplicate(journal):
    """success_for only returns a job that is still succeeded: content is never a duplicate of a
    job recorded as failed afterwards."""
    journal.add_job("j1", "s", INPUTS, "k")
    journal.start("j1")
    journal.succeed("j1", output_path="/o/j1", approach="model_set")
    assert journal.success_for("k").id == "j1"
    journal.fail("j1", {"error_type": "X"})
    assert journal.success_for("k") is None


def test_the_root_is_recorded_once_and_replaced_only_when_named(tmp_path):
    """A new journal records no root until one is recorded; a second root is not recorded over it
    (record_root returns the first), unless the recorded one is named as replaced (a moved root);
    another Journal on the same file sees it."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        assert j.root() is None
        assert j.record_root("/srv/a") == "/srv/a"
        assert j.record_root("/srv/b") == "/srv/a"
        assert j.record_root("/srv/b", replacing="/srv/other") == "/srv/a"
        assert j.record_root("/srv/b", replacing="/srv/a") == "/srv/b"
    with Journal(path) as j:
        assert j.root() == "/srv/b"


V1_SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, stem TEXT NOT NULL, inputs TEXT NOT NULL, content_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','duplicate')),
    attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, started_at TEXT,
    finished_at TEXT, output_path TEXT, approach TEXT, error TEXT, duplicate_of TEXT,
    force INTEGER NOT NULL DEFAULT 0);
CREATE INDEX jobs_state ON jobs (state, updated_at);
CREATE TABLE contents (content_key TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs (id));
INSERT INTO jobs VALUES ('old-job', 'old', '[]', 'k1', 'succeeded', 1, '2026-01-01T00:00:00.000+00:00',
    '2026-01-01T00:00:00.000+00:00', NULL, NULL, '/srv/a/outputs/old-job', 'model_set', NULL, NULL, 0);
INSERT INTO contents VALUES ('k1', 'old-job');
PRAGMA user_version = 1;
"""


def test_a_version_1_journal_is_migrated_keeping_its_jobs(tmp_path):
    """A journal of schema version 1 (before roots were recorded) opens as version 5 with its jobs
    and duplicate detection intact and no root recorded yet; the first root is then recorded, and
    the tables of version 3 (progress, events, requests, current models) work."""
    path = tmp_path / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(V1_SCHEMA)
    with Journal(path) as j:
        assert (j.get("old-job").state, j.success_for("k1").id, j.root()) == ("succeeded", "old-job", None)
        assert j.record_root("/srv/a") == "/srv/a"
        j.add_event("old-job", "promoted", topic="t")
        assert [e["event"] for e in j.events("old-job")] == ["promoted"]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5
        assert db.execute("SELECT key, value FROM journal_info").fetchall() == [("root", "/srv/a")]


def test_two_spellings_of_a_topic_name_one_current_model(journal):
    """A promotion under another spelling of a topic (case, runs of spaces) replaces the topic's
    current model instead of adding a second one; the topic is stored as compared."""
    journal.promote("Respiratory Infections", "a", model="m-a:latest", alias=None, forced=False)
    journal.promote(" respiratory  infections", "b", model="m-b:latest", alias=None, forced=False)
    assert [(t, c["job_id"]) for t, c in journal.current_models().items()] == [("respiratory infections", "b")]
    assert journal.current_model("RESPIRATORY INFECTIONS")["job_id"] == "b"


def test_a_version_3_journal_merges_the_spellings_of_its_topics_keeping_the_latest(tmp_path):
    """A version 3 journal whose topics were stored as typed opens as version 4 with one current
    model per topic (the latest promotion of its spellings), stored as compared (and opens as version 5)."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executemany("INSERT INTO current_models (topic, job_id, model, alias, promoted_at, forced)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       [("respiratory  infections", "b", "m-b:latest", None, "2026-02-01T00:00:00.000+00:00", 1),
                        ("Respiratory Infections", "a", "m-a:latest", "r:current", "2026-01-01T00:00:00.000+00:00", 0),
                        ("Injuries", "c", None, None, "2026-01-05T00:00:00.000+00:00", 0)])
        db.execute("PRAGMA user_version = 3")
    with Journal(path) as j:
        assert {t: (c["job_id"], c["model"], c["forced"]) for t, c in j.current_models().items()} == {
            "injuries": ("c", None, False), "respiratory infections": ("b", "m-b:latest", True)}
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5


def test_a_version_4_journal_gains_the_training_rows_tables_and_keeps_its_jobs(tmp_path):
    """A version 4 journal (before training rows were recorded) opens as version 5 with its jobs,
    no training sets yet, and a job's success then records its rows and their counts."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path) as j:
        j.add_job("old", "s", INPUTS, "k1")
        j.succeed("old", output_path="outputs/old", approach="model_set")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TABLE training_rows")
        db.execute("DROP TABLE training_sets")
        db.execute("PRAGMA user_version = 4")
    with Journal(path) as j:
        assert (j.get("old").state, j.training_sets()) == ("succeeded", [])
        j.add_job("new", "s", INPUTS, "k2")
        rows = ({"row_key": "id:a", "text_key": "text:a", "content_sha256": "c1", "rating": 1, "reviewed": True},
                {"row_key": "text:b", "text_key": "text:b", "content_sha256": "c2", "rating": 0, "reviewed": False,
                 "added_by": "old", "added_at": "2026-01-01T00:00:00.000+00:00"})
        j.succeed("new", output_path="outputs/new", approach="model_set", training=TrainingSet(
            "Respiratory  Infections", rows, {"rows_before": 1, "rows_added": 1, "duplicates": 2, "conflicts": 1,
                                              "unreviewed_skipped": 3, "base_job": "old"}))
        [recorded] = j.training_sets("respiratory infections")
        assert {k: recorded[k] for k in ("job_id", "topic", "rows", "reviewed_rows", "rows_before", "rows_added",
                                         "duplicates", "conflicts", "unreviewed_skipped", "base_job")} == {
            "job_id": "new", "topic": "respiratory infections", "rows": 2, "reviewed_rows": 1, "rows_before": 1,
            "rows_added": 1, "duplicates": 2, "conflicts": 1, "unreviewed_skipped": 3, "base_job": "old"}
        assert [(r["row_key"], r["rating"], r["reviewed"], r["added_by"]) for r in
                j.training_rows("new", "RESPIRATORY INFECTIONS")] == [("id:a", 1, 1, "new"), ("text:b", 0, 0, "old")]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5
