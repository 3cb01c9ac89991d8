"""The inbox: what a drop is, when a file is complete, claiming drops and moving them out.

Names: a dataset ``NAME.csv``; its mapping ``NAME.mapping.json|.yaml|.yml``; an optional job file
``NAME.job.yaml|.yml|.json``. Ignored: dotfiles and ``*.tmp``, ``*.part``, ``*.swp``, ``*~`` — write a
file under such a name and rename it to its final name when complete (the write-then-rename
convention; a rename is taken at once). Refused into ``failed/``: symlinks (the link itself is moved,
never followed), FIFOs and other non-regular files, directories, unknown extensions and files over
``max_input_bytes``. A file written in place is complete after its close-after-write event and no
further change for ``settle_s``; a file found by a scan (start-up, rescan, event overflow, polling)
after its size and mtime stayed the same for ``settle_s``. Reading a file is no change: an open
holds it back only while it lasts (it may be a writer's), and a close without a write (the daemon's
own checks, a viewer) leaves its settle clock where it was. The order of a drop's files does not
matter: a dataset without a mapping waits ``pair_timeout_s`` for it (then the default or inferred
mapping is used), unless its complete job file needs no mapping (a rating job whose model folder
brings its own: the service's ``mapping_needed`` reads the job file once per content); a complete
dataset and mapping without a job file wait ``job_wait_s`` for one (a job file dropped in that
window still joins the drop); a drop with all three complete is
claimed at once, so include a job file (it may be empty) to skip the wait. A companion that is
still being written holds its dataset back. Mappings and job files without a dataset wait (they
are "orphans").

Claiming renames the dataset (the anchor: whoever renames it owns the drop) and then its companions
into ``.work/.claim-<random>/``, hashes them there, and renames that folder to ``.work/<job_id>/``.
The owner holds an ``flock`` on the claim folder for as long as it works on the job, so recovery
(another daemon, or this one after a crash) only takes up folders nobody holds. Finishing a job
renames the whole work folder into ``processed/`` or ``failed/`` in one step: inputs are never in two
places and nothing is deleted. The watchdog observer thread only posts hints on a queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..config import MAX_COMPANION_BYTES
from ..fsutil import (NotRegularFileError, fsync_dir, hash_regular_file, new_dir, open_regular, read_json, real_dir,
                      rename_no_replace, rename_to_free_name, write_json)
from ..text import display_name

DATASET_SUFFIXES = (".csv",)
MAPPING_SUFFIXES = (".mapping.json", ".mapping.yaml", ".mapping.yml")
JOB_SUFFIXES = (".job.yaml", ".job.yml", ".job.json")
IGNORED_SUFFIXES = (".tmp", ".part", ".swp", "~")
RESERVED_DIRS = ("processed", "failed")
WORK_DIR = ".work"
CLAIM_PREFIX = ".claim-"
DEFAULT_MAPPING_STEM = "default-mapping"  # the config's default mapping, copied into a claim folder

DATASET, MAPPING, JOB, IGNORED, UNKNOWN = "dataset", "mapping", "job", "ignored", "unknown"
# Job ids and the folders named after them must stay well below the 255-byte name limit:
# ``.refusing-`` + stem + ``-<stamp>-<8 hex>``, or a job id's ``-N`` variant.
MAX_ID_STEM_BYTES = 120


def escape_name(name: str) -> str:
    """A file name as text that is safe everywhere (``text.display_name``): bytes that are not
    UTF-8 (``os.listdir`` hands them over as lone surrogates) become ``\\xNN``; control and
    formatting characters (newlines, escape sequences, right-to-left overrides) are escaped. Used for
    job ids, log lines, JSON, the journal and ``status`` output; the file keeps its real name."""
    return display_name(name)


def bounded(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def id_stem(stem: str) -> str:
    """The part of a job id (or a refused entry's folder name) that comes from a file name."""
    return bounded(escape_name(stem), MAX_ID_STEM_BYTES).rstrip(".") or "input"


def classify_name(name: str) -> tuple[str, str]:
    """``(kind, stem)`` of an inbox entry's name; kind is dataset, mapping, job, ignored or unknown."""
    lower = name.lower()
    if name.startswith(".") or lower.endswith(IGNORED_SUFFIXES):
        return IGNORED, ""
    for kind, suffixes in ((MAPPING, MAPPING_SUFFIXES), (JOB, JOB_SUFFIXES), (DATASET, DATASET_SUFFIXES)):
        for suffix in suffixes:
            if lower.endswith(suffix) and len(name) > len(suffix):
                return kind, name[: -len(suffix)]
    return UNKNOWN, ""


def refusal_reason(kind: str, st: os.stat_result, max_input_bytes: int) -> str | None:
    """Why an inbox entry is refused (None when it is acceptable). Uses ``lstat`` results."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if not stat.S_ISREG(mode):
        return "not_regular_file"
    if kind == UNKNOWN:
        return "unknown_extension"
    if st.st_size > (MAX_COMPANION_BYTES if kind in (MAPPING, JOB) else max_input_bytes):
        return "too_large"
    return None


REFUSAL_MESSAGES = {
    "symlink": ("a symbolic link was dropped; links are never followed",
                "copy the file itself into the inbox (write it as NAME.csv.part, then rename it)"),
    "directory": ("a folder was dropped; only files are accepted",
                  "drop the files inside the folder one by one"),
    "not_regular_file": ("a special file (FIFO, socket or device) was dropped",
                         "drop a regular file"),
    "unknown_extension": ("the file name does not end in .csv, .mapping.json|.yaml|.yml or "
                          ".job.yaml|.yml|.json", "rename the file to one of these endings and drop it again"),
    "too_large": ("the file is too large (a dataset: more than watch.max_input_bytes; a mapping or "
                  "job file: more than 256 KiB)",
                  "split the dataset or raise watch.max_input_bytes; a mapping or job file only "
                  "needs a few lines"),
}


# --- completeness tracking ---------------------------------------------------------------------

@dataclass
class Entry:
    """What the daemon knows about one inbox entry."""

    name: str
    kind: str
    stem: str
    sig: tuple[int, int, int]  # (mode, size, mtime_ns) from lstat
    changed_at: float  # monotonic time of the last observed change
    writing: bool = False  # written to (IN_MODIFY) and not yet closed
    opens: int = 0  # opens not yet closed: a writer's or a reader's, inotify does not say which
    renamed_in: bool = False  # arrived complete by rename
    refusal: str | None = None
    needs_mapping: bool | None = None  # a job file: whether its drop waits for a mapping (None: not asked yet)
    newline: tuple[tuple[int, int, int], bool] | None = None  # (sig, whether the file ended with a newline)

    @property
    def busy(self) -> bool:
        """Being written, or open in some process (which may be a writer that has not written yet)."""
        return self.writing or self.opens > 0

    def settled(self, now: float, settle_s: float) -> bool:
        if self.busy:
            return False
        return self.renamed_in or now - self.changed_at >= settle_s


@dataclass(frozen=True)
class Drop:
    """A dataset ready to claim, with the companions found next to it."""

    stem: str
    dataset: str
    mapping: str | None
    job: str | None


@dataclass(frozen=True)
class Refusal:
    name: str
    reason: str
    size_bytes: int


INCOMPLETE_WAIT = 10  # × settle_s: how long an in-place CSV whose last line has no newline waits


def _ends_with_newline(path: Path) -> bool:
    """Whether a file's last byte is a newline (read without blocking or following a link)."""
    try:
        fd = open_regular(path)
    except OSError:
        return True  # gone or not a file: the claim or the refusal deals with it
    try:
        size = os.fstat(fd).st_size
        return size == 0 or os.pread(fd, 1, size - 1) in (b"\n", b"\r")
    finally:
        os.close(fd)


class InboxTracker:
    """Follows inbox entries from first sight to "complete"; decides which drops can be claimed.

    Owned by the service's main loop (not thread-safe). Events are hints; ``scan`` is the truth.
    The loop runs on every batch of events, so the work per call is kept to what changed: the
    datasets, refused and not-yet-settled entries are kept in their own sets, and the wait times
    of a drop are worked out from its files' settle times instead of being stored.
    """

    def __init__(self, inbox: Path, *, settle_s: float, max_input_bytes: int, job_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 mapping_needed: Callable[[Path], bool] = lambda job_file: True) -> None:
        self.inbox = Path(inbox)
        self.settle_s = settle_s
        self.max_input_bytes = max_input_bytes
        self.job_wait_s = job_wait_s
        self.clock = clock
        # whether a drop with this (complete) job file waits for a mapping: asked once per content
        self.mapping_needed = mapping_needed
        self.entries: dict[str, Entry] = {}
        self._new: list[Entry] = []  # first seen since the last take_new()
        self._datasets: set[str] = set()
        self._refused: set[str] = set()
        self._unsettled: set[str] = set()  # may still be waiting for settle_s
        self._due: list[float] = []  # when drops seen waiting by the last ready_drops() are due

    def refresh(self, name: str, *, event: str | None = None) -> Entry | None:
        """Re-stat one entry (after an event or during a scan); returns it, None when gone/ignored."""
        kind, stem = classify_name(name)
        if kind == IGNORED or name in RESERVED_DIRS:
            return None
        try:
            st = os.lstat(self.inbox / name)
        except FileNotFoundError:
            self.forget(name)
            return None
        now = self.clock()
        sig = (st.st_mode, st.st_size, st.st_mtime_ns)
        entry = self.entries.get(name)
        if entry is None:
            entry = Entry(name, kind, stem, sig, now)
            self.entries[name] = entry
            self._new.append(entry)
            if kind == DATASET:
                self._datasets.add(name)
            self._unsettled.add(name)
        elif entry.sig != sig:
            entry.sig, entry.changed_at, entry.renamed_in = sig, now, False
            entry.needs_mapping = None
            self._unsettled.add(name)
        if event == "moved_in":
            entry.renamed_in, entry.writing, entry.changed_at = True, False, now
        elif event in ("modified", "created"):
            entry.writing = event == "modified"
            entry.renamed_in = False
            entry.changed_at = now
            self._unsettled.add(name)
        elif event == "opened":
            # no change yet: a reader's open (ours included) must not restart the settle clock
            entry.opens += 1
            self._unsettled.add(name)
        elif event == "closed":  # closed after writing
            entry.opens = max(0, entry.opens - 1)
            entry.writing, entry.changed_at = False, now
            self._unsettled.add(name)
        elif event == "closed_no_write":  # a reader is done: the file is as it was
            entry.opens = max(0, entry.opens - 1)
        entry.refusal = refusal_reason(kind, st, self.max_input_bytes)
        if entry.refusal is None:
            self._refused.discard(name)
        else:
            self._refused.add(name)
        return entry

    def scan(self, *, events_lost: bool = False) -> None:
        """List the inbox: pick up entries no event told us about and drop vanished ones.

        ``events_lost`` (after an event-queue overflow) forgets "being written" and "open" marks
        whose close event may have been lost; such files then complete by the settle rule."""
        if events_lost:
            for entry in self.entries.values():
                if entry.busy:
                    entry.writing, entry.opens = False, 0
                    self._unsettled.add(entry.name)
        try:
            names = set(os.listdir(self.inbox))
        except FileNotFoundError:
            names = set()
        for name in list(self.entries):
            if name not in names:
                self.forget(name)
        for name in names:
            self.refresh(name)

    def forget(self, name: str) -> None:
        self.entries.pop(name, None)
        self._datasets.discard(name)
        self._refused.discard(name)
        self._unsettled.discard(name)

    def take_new(self) -> list[Entry]:
        """Entries first seen since the last call (for ``file_detected`` log lines)."""
        new, self._new = self._new, []
        return [e for e in new if self.entries.get(e.name) is e]

    def refusals(self) -> list[Refusal]:
        """Entries to move to ``failed/``: links and special files at once, others once settled."""
        now = self.clock()
        out = []
        for name in sorted(self._refused):
            e = self.entries[name]
            if e.refusal in ("symlink", "not_regular_file") or e.settled(now, self.settle_s):
                out.append(Refusal(e.name, e.refusal, e.sig[1]))
        return out

    def _ready_time(self, e: Entry) -> float:
        """When ``e`` became (or becomes) complete."""
        return e.changed_at if e.renamed_in else e.changed_at + self.settle_s

    def _companion(self, stem: str, kind: str, now: float) -> tuple[Entry | None, bool]:
        """(a complete companion, whether one exists but is still being written)."""
        suffixes = MAPPING_SUFFIXES if kind == MAPPING else JOB_SUFFIXES
        pending = False
        for suffix in suffixes:
            for name in (stem + suffix, stem + suffix.upper()):
                e = self.entries.get(name)
                if e is None or e.refusal is not None:
                    continue
                if e.settled(now, self.settle_s):
                    return e, False
                pending = True
        return None, pending

    def ready_drops(self, pair_timeout_s: float, limit: int | None = None) -> list[Drop]:
        """Datasets that can be claimed now (at most ``limit``), oldest first, with their complete
        companions. A dataset without a mapping is due ``pair_timeout_s`` after it is complete (at
        once when its complete job file needs none: ``mapping_needed``); a dataset and mapping
        without a job file ``job_wait_s`` after both are; with all three at once."""
        now = self.clock()
        out: list[Drop] = []
        self._due = []
        for e in sorted((self.entries[n] for n in self._datasets), key=lambda x: x.changed_at):
            if e.refusal is not None or not e.settled(now, self.settle_s):
                continue
            if not e.renamed_in and now - e.changed_at < INCOMPLETE_WAIT * self.settle_s \
                    and not self._ends_with_newline(e):
                # written in place and its last line is unfinished: most likely still being written
                self._due.append(e.changed_at + INCOMPLETE_WAIT * self.settle_s)
                continue
            mapping, mapping_pending = self._companion(e.stem, MAPPING, now)
            job, job_pending = self._companion(e.stem, JOB, now)
            if mapping_pending or job_pending:
                continue
            if mapping is None and job is not None and not self._needs_mapping(job):
                due = now  # a rating job with a model folder: the folder brings its mapping
            elif mapping is None:
                due = self._ready_time(e) + max(pair_timeout_s, self.job_wait_s)
            elif job is None:
                due = max(self._ready_time(e), self._ready_time(mapping)) + self.job_wait_s
            else:
                due = now
            if now < due:
                self._due.append(due)
                continue
            out.append(Drop(e.stem, e.name, mapping.name if mapping else None, job.name if job else None))
            if limit is not None and len(out) >= limit:
                break
        return out

    def _ends_with_newline(self, e: Entry) -> bool:
        """Whether the dataset's last byte is a newline, read once per content: each read is an open
        and a close that the watcher reports, which would wake the loop to read it again."""
        if e.newline is None or e.newline[0] != e.sig:
            e.newline = (e.sig, _ends_with_newline(self.inbox / e.name))
        return e.newline[1]

    def _needs_mapping(self, job: Entry) -> bool:
        """Whether the drop of this complete job file waits for a mapping (``mapping_needed``, asked
        again only when the file changes)."""
        if job.needs_mapping is None:
            job.needs_mapping = bool(self.mapping_needed(self.inbox / job.name))
        return job.needs_mapping

    def pending_refusals(self) -> int:
        """Entries that will be refused once settled (``--once`` waits for them, as the daemon would)."""
        return len(self._refused)

    def waiting_datasets(self) -> int:
        return len(self._datasets) - len(self._datasets & self._refused)

    def next_deadline(self) -> float | None:
        """Seconds until something may become ready without a new event (for the loop's sleep):
        a file settling, or a drop seen waiting by the last ``ready_drops``. Drops that were due
        then and not claimed wait for capacity, which a finished job's hint announces."""
        now = self.clock()
        waits = [due - now for due in self._due if due > now]
        for name in list(self._unsettled):
            e = self.entries.get(name)
            if e is None or e.settled(now, self.settle_s):
                self._unsettled.discard(name)
            elif not e.busy:
                waits.append(self.settle_s - (now - e.changed_at))
        return max(0.0, min(waits)) if waits else None


def orphans(inbox: Path) -> list[dict]:
    """Mappings and job files in the inbox whose dataset is not there (for ``status``)."""
    try:
        names = sorted(os.listdir(inbox))
    except FileNotFoundError:
        return []
    datasets = {stem for kind, stem in map(classify_name, names) if kind == DATASET}
    out = []
    for name in names:
        kind, stem = classify_name(name)
        if kind in (MAPPING, JOB) and stem not in datasets:
            with contextlib.suppress(FileNotFoundError):
                age = time.time() - os.lstat(inbox / name).st_mtime
                out.append({"name": name, "kind": kind, "waiting_s": round(max(age, 0.0), 1)})
    return out


# --- claiming and moving -----------------------------------------------------------------------

def utc_stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")


def content_key(inputs: Iterable[tuple[str, str]]) -> str:
    """sha256 over ``role:sha256`` lines of a job's inputs (sorted), the duplicate-detection key."""
    h = hashlib.sha256()
    for role, digest in sorted(inputs):
        h.update(f"{role}:{digest}\n".encode())
    return h.hexdigest()


@dataclass
class Claim:
    """A job's claimed folder under ``.work/``, locked by this process while the object is open."""

    path: Path
    fd: int
    files: dict[str, str] = field(default_factory=dict)  # role -> file name inside ``path``

    @property
    def job_id(self) -> str:
        return self.path.name

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _lock_dir(path: Path) -> int | None:
    """Open ``path`` and take an exclusive non-blocking flock; None when someone else holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim_drop(inbox: Path, work: Path, drop: Drop, *, default_mapping: Path | None = None) -> Claim | None:
    """Move the drop's files into a locked claim folder; None when another process won the dataset.

    The folder is still named ``.claim-*``: call ``name_claim`` to give it its job id.
    """
    tmp = new_dir(work / f"{CLAIM_PREFIX}{secrets.token_hex(6)}")  # it becomes processed/<job_id>/
    fd = _lock_dir(tmp)
    if fd is None:  # a recovery scan took the empty folder between mkdir and lock
        return None
    claim = Claim(tmp, fd)
    try:
        os.rename(inbox / drop.dataset, tmp / drop.dataset)
    except FileNotFoundError:
        claim.release()
        with contextlib.suppress(OSError):
            tmp.rmdir()
        return None
    claim.files["dataset"] = drop.dataset
    for role, name in (("mapping", drop.mapping), ("job", drop.job)):
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(inbox / name, tmp / name)
                claim.files[role] = name
    if "mapping" not in claim.files and default_mapping is not None:
        target = tmp / f"{DEFAULT_MAPPING_STEM}{default_mapping.suffix or '.json'}"
        target.write_bytes(default_mapping.read_bytes())
        claim.files["default_mapping"] = target.name
    fsync_dir(inbox)
    return claim


NOT_REGULAR = "not-a-regular-file"  # the digest recorded for an input that is not a regular file


def hash_claim(claim: Claim) -> dict[str, tuple[str, str, int]]:
    """role -> (file name, sha256, size) for every input in the claim folder. An input that is not a
    regular file (a FIFO or link renamed over a companion between the scan and the claim) is never
    opened for reading: its digest is ``NOT_REGULAR`` and the job fails when it reads it."""
    out = {}
    for role, name in claim.files.items():
        try:
            digest, size = hash_regular_file(claim.path / name)
        except NotRegularFileError:
            digest, size = NOT_REGULAR, 0
        out[role] = (name, digest, size)
    return out


def name_claim(claim: Claim, stem: str, key: str, *, when: datetime | None = None,
               taken: Callable[[str], bool] = lambda job_id: False) -> str:
    """Rename the claim folder to ``<stem>-<UTC stamp>-<8 hex of key>``, with ``-N`` when that id is
    in ``.work/`` or ``taken(job_id)`` says it was used before (the same content in the same second).
    The stem is escaped and bounded (``id_stem``), so every id is valid UTF-8 and short enough."""
    base = f"{id_stem(stem)}-{utc_stamp(when)}-{key[:8]}"
    n = 0
    while True:
        job_id = base if n == 0 else f"{base}-{n}"
        target = claim.path.parent / job_id
        if taken(job_id):
            n += 1
            continue
        try:
            # rename onto an existing empty folder would succeed silently, so create it first
            target.mkdir(mode=0o700)
        except FileExistsError:
            n += 1
            continue
        os.rename(claim.path, target)
        claim.path = target
        fsync_dir(target.parent)
        return job_id


def abandoned_claims(work: Path) -> list[Claim]:
    """Claim folders under ``.work/`` that nobody holds (their owner died), now locked by us."""
    out = []
    try:
        names = sorted(os.listdir(work))
    except FileNotFoundError:
        return out
    for name in names:
        fd = _lock_dir(work / name)
        if fd is None:
            continue
        claim = Claim(work / name, fd)
        try:
            entries = sorted(os.listdir(claim.path))
        except FileNotFoundError:  # moved away by its owner just before we locked it
            claim.release()
            continue
        if not entries:
            claim.release()
            with contextlib.suppress(OSError):
                claim.path.rmdir()
            continue
        claim.files = roles_of(entries)
        out.append(claim)
    return out


def roles_of(names: Iterable[str]) -> dict[str, str]:
    """role -> file name for the files of a claim folder (notes such as error.json are skipped)."""
    files: dict[str, str] = {}
    for name in names:
        kind, _ = classify_name(name)
        if kind in (DATASET, MAPPING, JOB):
            files.setdefault(kind, name)
        elif name.startswith(DEFAULT_MAPPING_STEM + "."):
            files["default_mapping"] = name
    return files


def finish_claim(claim: Claim, destination: Path, *, note: tuple[str, dict] | None = None) -> Path:
    """Write an optional note (``error.json``, ``duplicate.json``) and rename the work folder to
    ``destination/<job_id>`` (never overwriting: ``-N`` when taken), whole: the folder appears
    there with its files, never empty. Releases the lock."""
    if note is not None:
        write_json(claim.path / note[0], note[1])
    target = rename_to_free_name(claim.path, real_dir(destination) / claim.job_id)
    fsync_dir(destination)
    fsync_dir(claim.path.parent)
    claim.release()
    return target


REFUSING_PREFIX = ".refusing-"


def refuse(inbox: Path, failed: Path, refusal: Refusal, error: dict) -> Path | None:
    """Move a refused entry (the link itself for a symlink) into ``failed/<name>-<stamp>/`` with
    ``error.json``. None when it vanished first (another daemon took it). The folder's name is the
    entry's escaped and bounded name, so any name the kernel allows gives a valid folder name. The
    folder is put together under a hidden name (``.refusing-<name>-<stamp>-<random>``) and renamed
    into place whole; ``sweep_refusals`` finishes one a stop left behind."""
    failed = real_dir(failed)
    name = f"{id_stem(refusal.name)}-{utc_stamp()}"
    staging = new_dir(failed / f"{REFUSING_PREFIX}{name}-{secrets.token_hex(4)}")
    try:
        os.rename(inbox / refusal.name, staging / refusal.name)
    except FileNotFoundError:
        staging.rmdir()
        return None
    target = _place_refusal(staging, failed, name, error)
    fsync_dir(failed)
    fsync_dir(inbox)
    return target


def _place_refusal(staging: Path, failed: Path, name: str, error: dict) -> Path:
    """Write ``error.json`` into a staging folder, its ``job_id`` the folder's final name, and rename
    the folder to ``failed/<name>``, or ``<name>-1``, ``-2``, ... when taken (the same name refused
    twice within a second): it appears whole, and its error.json names it."""
    n = 0
    while True:
        target = failed / (name if n == 0 else f"{name}-{n}")
        write_json(staging / "error.json", {**error, "job_id": target.name})
        try:
            rename_no_replace(staging, target)
            return target
        except FileExistsError:
            n += 1


def sweep_refusals(failed: Path) -> list[Path]:
    """Finish the refusals a stop interrupted (hidden ``.refusing-`` folders in ``failed/``): one
    holding the entry is put into place as ``refuse`` places one, keeping the ``error.json`` it had
    or, when the stop came before it was written, one saying that the reason was lost; an empty one
    is removed. Returns the folders placed."""
    placed = []
    for staging in sorted(Path(failed).glob(f"{REFUSING_PREFIX}*")):
        if not staging.is_dir() or staging.is_symlink():
            continue
        entries = os.listdir(staging)
        if not entries:
            staging.rmdir()
            continue
        error: object = None
        if "error.json" in entries:
            with contextlib.suppress(OSError, ValueError):  # unreadable: as if never written
                error = read_json(staging / "error.json")
        if not isinstance(error, dict):
            error = {"error_type": "RecoveryError",
                     "failed_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                     "message": "the service stopped while it refused this entry, before it wrote why",
                     "hint": "drop the file again: the service says why it refuses it"}
        name = staging.name[len(REFUSING_PREFIX):].rsplit("-", 1)[0]
        placed.append(_place_refusal(staging, Path(failed), name, error))
    if placed:
        fsync_dir(failed)
    return placed


# --- the watcher -------------------------------------------------------------------------------

RESCAN = "__rescan__"


class _OverflowHandler(logging.Handler):
    """watchdog reports a kernel event-queue overflow only as a log warning: turn it into a rescan."""

    def __init__(self, hints: queue.Queue) -> None:
        super().__init__(logging.WARNING)
        self.hints = hints

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.hints.put((RESCAN, ""))


def _no_move_pairing_delay() -> None:
    """watchdog holds each IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and its queue is
    FIFO, so every claim (a rename out of the inbox) would delay the next drop's event by 0.5 s. We
    never need the pairing (a move out is a removal, a move in an arrival), so the delay is 0."""
    with contextlib.suppress(ImportError):
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
        InotifyMoveEventGrouper.delay = 0.0


class InboxWatcher:
    """Runs a watchdog observer on the inbox (not recursive) and posts ``(event, name)`` hints."""

    def __init__(self, inbox: Path, hints: queue.Queue, *, polling: bool = False,
                 poll_interval_s: float = 1.0) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
        from watchdog.observers.polling import PollingObserver

        _no_move_pairing_delay()

        self.inbox = Path(inbox)
        self.hints = hints
        self.polling = polling
        if polling:
            self.observer = PollingObserver(timeout=poll_interval_s)
        else:
            self.observer = InotifyObserver(generate_full_events=True)
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's type
                watcher._post(event)

        self.observer.schedule(Handler(), str(self.inbox), recursive=False)
        self._overflow = _OverflowHandler(hints)

    def _post(self, event) -> None:  # noqa: ANN001
        kind = event.event_type
        if kind == "moved":
            src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path)
            if dest and os.path.dirname(dest) == str(self.inbox):
                self.hints.put(("moved_in", os.path.basename(dest)))
            if src and os.path.dirname(src) == str(self.inbox):
                self.hints.put(("deleted", os.path.basename(src)))
            return
        path = os.fsdecode(event.src_path)
        if os.path.dirname(path) != str(self.inbox):
            return
        mapped = {"created": "created", "modified": "modified", "opened": "opened", "closed": "closed",
                  "closed_no_write": "closed_no_write", "deleted": "deleted"}.get(kind)
        if mapped is None or (event.is_directory and mapped not in ("created", "deleted")):
            return
        if self.polling and mapped == "modified":
            # a poll sees a change but never a close: the file settles by its size and time, not
            # by a close that will not come (as "modified" it would stay "being written" forever)
            mapped = "created"
        self.hints.put((mapped, os.path.basename(path)))

    def start(self) -> None:
        logging.getLogger("watchdog").addHandler(self._overflow)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
        logging.getLogger("watchdog").removeHandler(self._overflow)
