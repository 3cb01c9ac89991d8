"""The job journal: one SQLite row per job, its state and history, and duplicate detection.

Schema (``PRAGMA user_version`` = 5; an older journal gains the tables it lacks when it is opened):

- ``jobs``: ``id`` (the job id ``<stem>-<UTC yyyymmddThhmmss>-<8 hex>``, or the folder name of a
  refused file), ``stem``, ``inputs`` (JSON list of ``{"role", "name", "sha256", "size_bytes"}``;
  role is ``dataset``, ``mapping``, ``default_mapping``, ``job`` or ``refused``), ``content_key``
  (sha256 over the roles and hashes of the inputs), ``state`` (``queued``, ``running``, ``succeeded``,
  ``failed``, ``duplicate``), ``attempts`` (processing starts; an interrupted start is given back),
  ``created_at`` / ``updated_at`` / ``started_at`` / ``finished_at`` (ISO-8601 UTC), ``output_path``
  (from version 4 relative to the daemon root, ``outputs/<job_id>``, so that a moved or copied root
  keeps its jobs; older rows are absolute: ``Paths.output_folder`` reads both), ``approach``,
  ``error`` (the error.json fields as JSON: never cell contents), ``duplicate_of``, ``force``. A
  ``queued`` job whose approach is already ``fine_tune`` has been planned and waits for the
  training lane (``await_training``; ``resume`` starts it without counting a new attempt).
- ``contents``: ``content_key`` PRIMARY KEY → ``job_id`` of the latest success with that content.
  The UNIQUE key is what makes "the same content dropped again" a duplicate: a later drop whose key is
  here is recorded as ``duplicate`` pointing at that job's outputs, unless its job file says
  ``force: true`` (then it is processed and becomes the key's new owner).
- ``journal_info``: ``key`` PRIMARY KEY → ``value``; ``root`` is the daemon root (real path) whose
  jobs the journal holds (``record_root``). Its duplicates point at that root's outputs, so a daemon
  on another root must not use it; a journal from before version 2 has no root until the first
  daemon records its own.
- ``progress``: ``job_id`` PRIMARY KEY → what a queued or running job is doing now (``stage``,
  ``percent``, ``done`` / ``total``, ``rate`` in ``rate_unit`` per second, ``eta_s``), written by
  the daemon at most once a second and removed when the job ends; ``status`` reads it.
- ``events``: the operator's actions on a job (``cancel_requested``, ``cancelled``, ``retried``,
  ``promoted``), with their time and fields (names and numbers, never cell contents).
- ``requests``: ``job_id`` PRIMARY KEY → ``action`` (``cancel``) a command asked of the daemon,
  which acts on it at its next tick (or at its next start) and removes it.
- ``current_models``: ``topic`` PRIMARY KEY → the job whose model is the topic's current one
  (``fine-tuner promote``), its Ollama name and alias. The topic is stored as ``normal_topic``
  makes it (case and runs of spaces aside), so that two spellings name one topic; opening a
  version 3 journal merges its spellings, keeping the latest promotion.
- ``training_rows`` (version 5): per job and topic (as ``normal_topic`` makes it), the rows its model
  was trained on: ``row_key`` (``id:`` + sha256 of the record id where the input has one, else
  ``text:`` + sha256 of the normalised prompt), ``text_key`` (the latter, always), ``content_sha256``
  (the row's cells, rating and rationale), ``rating``, ``reviewed`` (1: an expert's rating from a
  reviewed file), ``added_by`` / ``added_at`` (the job that brought the row in this content, and
  when). Hashes and ratings only: the rows' text is in the topic's rows file (``topicrows``).
- ``training_sets`` (version 5): per job and topic, the counts of its training rows: ``rows``,
  ``reviewed_rows``, ``rows_before`` (the topic's rows it started from), ``rows_added``,
  ``duplicates``, ``conflicts`` (a duplicate with another rating: the newest won),
  ``unreviewed_skipped``, ``base_job``. A version 4 journal gains both tables, empty.

The database runs in WAL mode with a busy timeout, so the daemon's worker threads, ``fine-tuner
status`` and a second daemon on the same root can use it at once. Every change goes
through ``transaction()`` (``BEGIN IMMEDIATE`` under a process-local lock). This module keeps states
only: it never moves files and holds no business rules beyond the state transitions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import JournalError

STATES = ("queued", "running", "succeeded", "failed", "duplicate")
SCHEMA_VERSION = 5
ROOT_KEY = "root"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    stem         TEXT NOT NULL,
    inputs       TEXT NOT NULL,
    content_key  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','duplicate')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    output_path  TEXT,
    approach     TEXT,
    error        TEXT,
    duplicate_of TEXT,
    force        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated_at);
CREATE TABLE IF NOT EXISTS contents (
    content_key TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs (id)
);
CREATE TABLE IF NOT EXISTS journal_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (
    job_id     TEXT PRIMARY KEY,
    stage      TEXT NOT NULL,
    percent    REAL,
    done       INTEGER,
    total      INTEGER,
    rate       REAL,
    rate_unit  TEXT,
    eta_s      REAL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at     TEXT NOT NULL,
    event  TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS requests (
    job_id       TEXT PRIMARY KEY,
    action       TEXT NOT NULL CHECK (action IN ('cancel')),
    requested_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS current_models (
    topic       TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    model       TEXT,
    alias       TEXT,
    promoted_at TEXT NOT NULL,
    forced      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS training_rows (
    job_id         TEXT NOT NULL,
    topic          TEXT NOT NULL,
    row_key        TEXT NOT NULL,
    text_key       TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    rating         INTEGER NOT NULL,
    reviewed       INTEGER NOT NULL DEFAULT 0,
    added_by       TEXT NOT NULL,
    added_at       TEXT NOT NULL,
    PRIMARY KEY (job_id, topic, row_key)
);
CREATE TABLE IF NOT EXISTS training_sets (
    job_id             TEXT NOT NULL,
    topic              TEXT NOT NULL,
    rows               INTEGER NOT NULL,
    reviewed_rows      INTEGER NOT NULL,
    rows_before        INTEGER NOT NULL,
    rows_added         INTEGER NOT NULL,
    duplicates         INTEGER NOT NULL,
    conflicts          INTEGER NOT NULL,
    unreviewed_skipped INTEGER NOT NULL,
    base_job           TEXT,
    recorded_at        TEXT NOT NULL,
    PRIMARY KEY (job_id, topic)
);
"""

_HINT_FULL = "free space on its disk; the service retries by itself"
_HINT_WRITABLE = "make the state directory and the journal writable for the service, then start it again"
_HINT_LOCKED = ("another process holds the journal locked: stop a second fine-tuner using this state "
                "directory, or try again")


def normal_topic(topic: str) -> str:
    """A topic as stored and compared: case and runs of spaces aside (``Respiratory  Infections``
    and ``respiratory infections`` are one topic)."""
    return " ".join(str(topic).split()).casefold()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class InputFile:
    """One input of a job as the journal records it (a name and a hash, never contents)."""

    role: str
    name: str
    sha256: str
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "sha256": self.sha256, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class JobRecord:
    id: str
    stem: str
    inputs: tuple[InputFile, ...]
    content_key: str
    state: str
    attempts: int
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    output_path: str | None
    approach: str | None
    error: dict | None
    duplicate_of: str | None
    force: bool

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["inputs"] = [f.as_dict() for f in self.inputs]
        return out


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], stem=row["stem"],
        inputs=tuple(InputFile(**f) for f in json.loads(row["inputs"])),
        content_key=row["content_key"], state=row["state"], attempts=row["attempts"],
        created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], output_path=row["output_path"], approach=row["approach"],
        error=json.loads(row["error"]) if row["error"] else None, duplicate_of=row["duplicate_of"],
        force=bool(row["force"]),
    )


class Journal:
    """The job journal in one SQLite file. Thread-safe; several processes may open the same file."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        """Open (or create) the journal. A file that is empty, damaged, truncated, not a database,
        not a regular file, not writable or of a newer schema raises ``JournalError`` naming the
        file: it is never silently replaced or changed, since it holds the job history and the
        duplicate detection. Opening writes nothing to a journal whose schema is current, so a
        journal on a full disk opens as long as SQLite can map its shared-memory file."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._check_file(busy_timeout_s)
        try:
            # autocommit mode: transactions are opened explicitly by transaction()
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, "opened") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._retry_busy(lambda: self._db.execute("PRAGMA journal_mode = WAL"), busy_timeout_s)
            self._db.execute("PRAGMA synchronous = NORMAL")
            if self._db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"the journal {self.path} has schema version {version}; this "
                                   f"fine-tuner knows version {SCHEMA_VERSION}", path=str(self.path),
                                   reason="newer schema",
                                   hint="run the fine-tuner version that wrote it, or move it aside to "
                                        "start a new journal")
            if version < SCHEMA_VERSION:
                with self.transaction() as db:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(statement)
                    if version < 4:
                        _merge_topic_spellings(db)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (sqlite3.Error, JournalError) as exc:
            self._db.close()
            if isinstance(exc, JournalError):
                raise
            raise self._error(exc, "opened") from None

    def _check_file(self, busy_timeout_s: float) -> None:
        """Create the journal when it is missing; refuse what SQLite must not be given: a dangling
        link, a folder or FIFO (SQLite would block on a FIFO), an empty file, a write-ahead log
        left without its journal (a new journal would take in its pages) and a read-only file
        (refused now rather than at the first job's write). It never opens the file itself: closing
        any descriptor of a file drops every POSIX lock this process holds on it, those of its SQLite
        connections included, and another process would then delete the write-ahead log they use."""
        try:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if os.path.islink(self.path):
                    raise JournalError(f"the journal {self.path} is a symbolic link to a missing file",
                                       path=str(self.path), reason="dangling symbolic link",
                                       hint="point the link at the journal, or remove it to start with a "
                                            "new, empty journal") from None
                # the -wal is looked at first: a journal is always linked in before its -wal exists,
                # so a -wal seen while the journal is still missing afterwards was left behind
                wal = self.path.with_name(self.path.name + "-wal")
                if os.path.lexists(wal) and not os.path.lexists(self.path):
                    raise JournalError(
                        f"the journal {self.path} is missing but its write-ahead log {wal} is still there",
                        path=str(self.path), reason="write-ahead log without its journal",
                        hint=f"put the journal back beside it, or move {wal.name} and {self.path.name}-shm "
                             "aside too to start with a new, empty journal") from None
                self._create(busy_timeout_s)
                st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise JournalError(f"the journal {self.path} is not a regular file", path=str(self.path),
                                   reason="not a regular file",
                                   hint="move it aside; the service then starts with a new, empty journal")
            if st.st_size == 0:
                raise JournalError(f"the journal {self.path} is an empty file (its history is lost)",
                                   path=str(self.path), reason="empty file")
            _check_writable(self.path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise JournalError(f"the journal {self.path} is not writable: {reason}", path=str(self.path),
                               reason=reason, disk_full=full,
                               hint=_HINT_FULL if full else _HINT_WRITABLE) from None

    def _create(self, busy_timeout_s: float) -> None:
        """Make a new journal whole in a temporary file and link it into place, so that nobody ever
        sees the journal as an empty file (an empty journal is refused as damaged). When another
        process links its own first, that one is used."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            db = sqlite3.connect(tmp, timeout=busy_timeout_s, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
            finally:
                db.close()
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
        except sqlite3.Error as exc:
            raise self._error(exc, "created") from None
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _error(self, exc: sqlite3.Error, doing: str) -> JournalError:
        """A JournalError for an SQLite error: the file, what failed and SQLite's short reason (it
        names the database's state, never a row's contents), with the hint for its cause."""
        reason = str(exc).split("\n")[0][:120] or type(exc).__name__
        message = f"the journal {self.path} could not be {doing}: {reason}"
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == sqlite3.SQLITE_FULL or "full" in reason:
            return JournalError(message, path=str(self.path), reason=reason, disk_full=True, hint=_HINT_FULL)
        if primary == sqlite3.SQLITE_IOERR and self._disk_nearly_full():
            # SQLite reports a failed write of its shared-memory file as an I/O error, not as FULL
            return JournalError(f"{message} (its disk is full)", path=str(self.path), reason=reason,
                                disk_full=True, hint=_HINT_FULL)
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in reason:
            return JournalError(message, path=str(self.path), reason=reason, hint=_HINT_LOCKED)
        if (primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM)
                or "readonly" in reason or "read-only" in reason or "unable to open" in reason):
            return JournalError(message, path=str(self.path), reason=reason, hint=_HINT_WRITABLE)
        return JournalError(message, path=str(self.path), reason=reason)

    def _disk_nearly_full(self) -> bool:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1024 * 1024

    @staticmethod
    def _retry_busy(action: Callable[[], object], timeout_s: float) -> None:
        """Run ``action`` until SQLite stops answering "database is locked", up to ``timeout_s``.
        Switching to WAL while another process opens the same file can fail at once, without the
        busy handler (SQLite reports the lock clash as a deadlock), so daemons started together
        would crash at start-up."""
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                action()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The one way to change the journal: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error).
        SQLite errors become ``JournalError`` (``disk_full`` set for a full disk); the journal stays
        usable, so a write that failed for lack of space succeeds once there is space again."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, "written") from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:  # a broken rule of the schema: a bug, not the file
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise self._error(exc, "written") from None
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from None

    # --- writes ----------------------------------------------------------------------------------

    def add_job(self, job_id: str, stem: str, inputs: Sequence[InputFile], content_key: str, *,
                force: bool = False) -> bool:
        """Record a newly claimed job as ``queued``. False when a row with this id already exists."""
        now = utc_now()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (id, stem, inputs, content_key, state, created_at,"
                " updated_at, force) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, stem, json.dumps([f.as_dict() for f in inputs]), content_key, now, now,
                 int(force)))
            return cur.rowcount == 1

    def start(self, job_id: str) -> int:
        """Mark the job ``running`` and count the attempt; returns the attempt number."""
        now = utc_now()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?,"
                       " updated_at = ? WHERE id = ?", (now, now, job_id))
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return int(row["attempts"])

    def await_training(self, job_id: str) -> None:
        """A planned fine-tune waits for the training lane: ``queued`` with approach ``fine_tune``
        (its attempt stays counted: planning it was part of the attempt)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'queued', approach = 'fine_tune', updated_at = ?"
                       " WHERE id = ?", (utc_now(), job_id))

    def resume(self, job_id: str) -> None:
        """The training lane takes up a job that waited for it: ``running`` again, same attempt."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'running', updated_at = ? WHERE id = ?", (utc_now(), job_id))

    def requeue(self, job_id: str, *, give_back_attempt: bool) -> None:
        """Put a job back to ``queued`` (shutdown interrupted it: the attempt is not counted)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'queued', approach = NULL, updated_at = ?,"
                       " attempts = MAX(attempts - ?, 0) WHERE id = ?",
                       (utc_now(), int(give_back_attempt), job_id))
            db.execute("DELETE FROM progress WHERE job_id = ?", (job_id,))

    def succeed(self, job_id: str, *, output_path: str, approach: str | None,
                training: TrainingSet | None = None) -> None:
        """Mark the job ``succeeded`` and make it the owner of its content key; ``training``: the
        rows its model was trained on, recorded in the same transaction."""
        now = utc_now()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'succeeded', output_path = ?, approach = ?,"
                       " finished_at = ?, updated_at = ?, error = NULL WHERE id = ?",
                       (output_path, approach, now, now, job_id))
            db.execute("INSERT INTO contents (content_key, job_id) SELECT content_key, id FROM jobs"
                       " WHERE id = ? ON CONFLICT (content_key) DO UPDATE SET job_id = excluded.job_id",
                       (job_id,))
            if training is not None:
                _record_training(db, job_id, training, now)
            _ended(db, job_id)

    def fail(self, job_id: str, error: dict) -> None:
        now = utc_now()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ?"
                       " WHERE id = ?", (json.dumps(error, default=str), now, now, job_id))
            _ended(db, job_id)

    def mark_duplicate(self, job_id: str, *, of: JobRecord) -> None:
        now = utc_now()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'duplicate', duplicate_of = ?, output_path = ?,"
                       " approach = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                       (of.id, of.output_path, of.approach, now, now, job_id))
            _ended(db, job_id)

    def record_refused(self, refused_id: str, name: str, error: dict, *, size_bytes: int = 0) -> None:
        """A file refused at the door (symlink, FIFO, directory, unknown extension, too large)."""
        now = utc_now()
        inputs = json.dumps([InputFile("refused", name, "", size_bytes).as_dict()])
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (id, stem, inputs, content_key, state, created_at,"
                " updated_at, finished_at, error) VALUES (?, ?, ?, '', 'failed', ?, ?, ?, ?)",
                (refused_id, name, inputs, now, now, now, json.dumps(error, default=str)))

    def record_root(self, root: str, *, replacing: str | None = None) -> str:
        """Record ``root`` as the root whose jobs this journal holds when none is recorded yet (or
        when ``replacing`` is the one recorded: the root was moved). Returns the root recorded
        afterwards, which is another one when a daemon on another root recorded its own first."""
        with self.transaction() as db:
            if replacing is not None:
                db.execute("UPDATE journal_info SET value = ? WHERE key = ? AND value = ?",
                           (root, ROOT_KEY, replacing))
            db.execute("INSERT OR IGNORE INTO journal_info (key, value) VALUES (?, ?)", (ROOT_KEY, root))
            return db.execute("SELECT value FROM journal_info WHERE key = ?", (ROOT_KEY,)).fetchone()["value"]

    def set_progress(self, job_id: str, stage: str, *, percent: float | None = None, done: int | None = None,
                     total: int | None = None, rate: float | None = None, rate_unit: str | None = None,
                     eta_s: float | None = None) -> None:
        """What the job is doing now (replaces what was there)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO progress (job_id, stage, percent, done, total, rate, rate_unit,"
                       " eta_s, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, stage, percent, done, total, rate, rate_unit, eta_s, utc_now()))

    def add_event(self, job_id: str, event: str, **fields: Any) -> None:
        """Record an operator's action on a job (names and numbers only)."""
        with self.transaction() as db:
            db.execute("INSERT INTO events (job_id, at, event, fields) VALUES (?, ?, ?, ?)",
                       (job_id, utc_now(), event, json.dumps(fields, default=str)))

    def request(self, job_id: str, action: str) -> bool:
        """Ask the daemon to ``action`` (``cancel``) a queued or running job, recorded as an event.
        False when the job is not queued or running (nothing is recorded then)."""
        now = utc_now()
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in ("queued", "running"):
                return False
            db.execute("INSERT OR REPLACE INTO requests (job_id, action, requested_at) VALUES (?, ?, ?)",
                       (job_id, action, now))
            db.execute("INSERT INTO events (job_id, at, event, fields) VALUES (?, ?, ?, '{}')",
                       (job_id, now, f"{action}_requested"))
            return True

    def promote(self, topic: str, job_id: str, *, model: str | None, alias: str | None, forced: bool) -> None:
        """Make ``job_id``'s model the current one for ``topic`` (recorded as the job's event); the
        topic is stored as ``normal_topic`` makes it."""
        now = utc_now()
        topic = normal_topic(topic)
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO current_models (topic, job_id, model, alias, promoted_at, forced)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (topic, job_id, model, alias, now, int(forced)))
            db.execute("INSERT INTO events (job_id, at, event, fields) VALUES (?, ?, 'promoted', ?)",
                       (job_id, now, json.dumps({"topic": topic, "model": model, "alias": alias,
                                                 "forced": forced})))

    # --- reads -----------------------------------------------------------------------------------

    def root(self) -> str | None:
        """The root whose jobs this journal holds, None when none is recorded yet (a new journal,
        or one written before roots were recorded). Reading it writes nothing."""
        rows = self._read("SELECT value FROM journal_info WHERE key = ?", (ROOT_KEY,))
        return rows[0]["value"] if rows else None

    def _record(self, row: sqlite3.Row) -> JobRecord:
        """A row as a JobRecord; a row the journal did not write that way is a damaged journal (the
        message names the exception class only, never the row)."""
        try:
            return _record(row)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise JournalError(f"the journal {self.path} has a damaged row in its jobs table "
                               f"({type(exc).__name__})", path=str(self.path), reason="damaged row") from None

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._record(rows[0]) if rows else None

    def success_for(self, content_key: str) -> JobRecord | None:
        """The job that owns this content (the latest success with the same inputs), if any."""
        rows = self._read("SELECT jobs.* FROM contents JOIN jobs ON jobs.id = contents.job_id"
                          " WHERE contents.content_key = ? AND jobs.state = 'succeeded'", (content_key,))
        return self._record(rows[0]) if rows else None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for row in self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[row["state"]] = row["n"]
        return out

    def jobs(self, states: Sequence[str], *, limit: int | None = None, since: str | None = None) -> list[JobRecord]:
        """Jobs in ``states`` (updated at or after ``since``, an ISO time), most recently updated first."""
        marks = ",".join("?" * len(states))
        params: list[Any] = list(states)
        where = ""
        if since is not None:
            where, params = " AND updated_at >= ?", [*params, since]
        sql = f"SELECT * FROM jobs WHERE state IN ({marks}){where} ORDER BY updated_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._record(r) for r in self._read(sql, params)]

    def progress(self, job_id: str) -> dict | None:
        rows = self._read("SELECT * FROM progress WHERE job_id = ?", (job_id,))
        return {k: rows[0][k] for k in rows[0].keys() if k != "job_id"} if rows else None

    def events(self, job_id: str) -> list[dict]:
        """The operator's actions on a job, oldest first."""
        return [{"at": r["at"], "event": r["event"], **json.loads(r["fields"])}
                for r in self._read("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))]

    def requests(self) -> dict[str, str]:
        """Pending requests: job id → action."""
        return {r["job_id"]: r["action"] for r in self._read("SELECT job_id, action FROM requests")}

    def current_models(self) -> dict[str, dict]:
        """Topic → the promoted job, its model, alias and when."""
        return {r["topic"]: {k: r[k] for k in ("job_id", "model", "alias", "promoted_at")}
                | {"forced": bool(r["forced"])}
                for r in self._read("SELECT * FROM current_models ORDER BY topic")}

    def training_rows(self, job_id: str, topic: str) -> list[dict]:
        """The rows ``job_id``'s model of ``topic`` was trained on, in the order recorded."""
        return [dict(r) for r in self._read(
            "SELECT row_key, text_key, content_sha256, rating, reviewed, added_by, added_at FROM training_rows"
            " WHERE job_id = ? AND topic = ? ORDER BY rowid", (job_id, normal_topic(topic)))]

    def training_sets(self, topic: str | None = None) -> list[dict]:
        """Every recorded training set (of ``topic`` only, when given) with its job's finish time,
        oldest finish first; only succeeded jobs."""
        where, params = ("AND s.topic = ?", (normal_topic(topic),)) if topic is not None else ("", ())
        return [dict(r) for r in self._read(
            "SELECT s.*, j.finished_at FROM training_sets s JOIN jobs j ON j.id = s.job_id"
            f" WHERE j.state = 'succeeded' {where} ORDER BY j.finished_at, s.rowid", params)]

    def current_model(self, topic: str) -> dict | None:
        """The current model of ``topic`` (compared as ``normal_topic`` makes it)."""
        wanted = normal_topic(topic)
        return next((v | {"topic": t} for t, v in self.current_models().items() if t == wanted), None)


def _merge_topic_spellings(db: sqlite3.Connection) -> None:
    """Version 3 → 4: each current model's topic as ``normal_topic`` makes it; where two spellings
    of one topic each had a current model, the latest promotion stays."""
    rows = db.execute("SELECT * FROM current_models ORDER BY promoted_at, rowid").fetchall()
    latest = {normal_topic(r["topic"]): r for r in rows}
    db.execute("DELETE FROM current_models")
    db.executemany("INSERT INTO current_models (topic, job_id, model, alias, promoted_at, forced)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   [(topic, r["job_id"], r["model"], r["alias"], r["promoted_at"], r["forced"])
                    for topic, r in latest.items()])


@dataclass(frozen=True)
class TrainingSet:
    """What ``succeed`` records of a job's training rows for one topic: ``rows`` as
    ``Journal.training_rows`` returns them (``added_by`` / ``added_at`` None: this job, now) and
    the counts of ``training_sets``."""

    topic: str
    rows: tuple[dict, ...]
    counts: dict[str, Any]


def _record_training(db: sqlite3.Connection, job_id: str, training: TrainingSet, now: str) -> None:
    topic = normal_topic(training.topic)
    db.execute("DELETE FROM training_rows WHERE job_id = ? AND topic = ?", (job_id, topic))
    db.executemany(
        "INSERT OR REPLACE INTO training_rows (job_id, topic, row_key, text_key, content_sha256, rating, reviewed,"
        " added_by, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(job_id, topic, r["row_key"], r["text_key"], r["content_sha256"], int(r["rating"]), int(bool(r["reviewed"])),
          r.get("added_by") or job_id, r.get("added_at") or now) for r in training.rows])
    c = training.counts
    db.execute(
        "INSERT OR REPLACE INTO training_sets (job_id, topic, rows, reviewed_rows, rows_before, rows_added,"
        " duplicates, conflicts, unreviewed_skipped, base_job, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job_id, topic, len(training.rows), sum(1 for r in training.rows if r["reviewed"]),
         int(c.get("rows_before", 0)),
         int(c.get("rows_added", len(training.rows))), int(c.get("duplicates", 0)), int(c.get("conflicts", 0)),
         int(c.get("unreviewed_skipped", 0)), c.get("base_job"), now))


def _check_writable(path: Path) -> None:
    """An ``OSError`` when this process may not write ``path`` (a read-only file system, or the
    file's permissions), found without opening it (see ``Journal._check_file``)."""
    if os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    code = errno.EROFS if read_only else errno.EACCES
    raise OSError(code, os.strerror(code), str(path))


def _ended(db: sqlite3.Connection, job_id: str) -> None:
    """A job that ended has no progress and no pending request."""
    db.execute("DELETE FROM progress WHERE job_id = ?", (job_id,))
    db.execute("DELETE FROM requests WHERE job_id = ?", (job_id,))
