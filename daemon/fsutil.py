"""Filesystem primitives: atomic file writes, publishing a folder, claiming by rename, hashing.

A reader never sees half a file or half a folder: files are written to a temporary sibling,
fsynced and ``os.replace``d; folders are built under a temporary name and renamed when complete.
This module knows nothing about jobs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

HASH_CHUNK = 1 << 20
_WRITE_AHEAD = 4  # chunks built ahead of the writer thread (bounds memory)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding,
                       newline=None if binary else "") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    with atomic_open(path, "w", durable=durable) as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, data: Any, *, durable: bool = True) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): escape it
        text = json.dumps(data, indent=2, ensure_ascii=True, sort_keys=False, default=str)
    with atomic_open(path, "w", durable=durable) as fh:
        fh.write(text + "\n")


def write_lines(path: str | os.PathLike, chunks: Iterable[str], *, durable: bool = True) -> None:
    """Write an iterable of text chunks (each already ending with its newlines) atomically, as UTF-8.

    A helper thread writes while the caller's iterator builds the next chunk: writing a large new
    file is mostly the kernel allocating page-cache pages, which runs without the GIL, so the two
    overlap (building + writing 164 MiB of training_data.jsonl: 0.53 s → 0.35 s on 2 cores). The thread always ends before
    this returns or raises, and an error on either side removes the temporary file."""
    with atomic_open(path, "wb", durable=durable) as fh:
        _write_overlapped(fh, chunks)


_END = object()


def _write_overlapped(fh: IO[bytes], chunks: Iterable[str]) -> None:
    pending: queue.Queue = queue.Queue(maxsize=_WRITE_AHEAD)
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            while (chunk := pending.get()) is not _END:
                fh.write(chunk.encode("utf-8"))
        except BaseException as exc:  # handed to the caller's thread below
            failed.append(exc)
            while pending.get() is not _END:  # keep taking, so that the producer never blocks
                pass

    thread = threading.Thread(target=writer, name="write-lines", daemon=True)
    thread.start()
    try:
        for chunk in chunks:
            if failed:
                break
            pending.put(chunk)
    finally:
        pending.put(_END)
        thread.join()
    if failed:
        raise failed[0]


class NotRegularFileError(OSError):
    """An input path is a FIFO, socket, device, folder or symbolic link where a file was expected."""


def open_regular(path: str | os.PathLike) -> int:
    """Open a regular file for reading without ever blocking or following a link: ``O_NONBLOCK``
    (a FIFO swapped in would otherwise block ``open`` until a writer comes), ``O_NOFOLLOW``, and
    the type checked on the opened descriptor, not on a name that can change in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link, not a file", os.fspath(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, "not a regular file", os.fspath(path))
    os.set_blocking(fd, True)
    return fd


def _digest(fh: IO[bytes]) -> tuple[str, int]:
    """``(hex sha256, size)`` of what ``fh`` holds, streamed in 1 MiB chunks (never read whole)."""
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(HASH_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def hash_regular_file(path: str | os.PathLike) -> tuple[str, int]:
    """``(hex sha256, size)`` of a regular file (``open_regular``: never a FIFO or a link)."""
    with os.fdopen(open_regular(path), "rb") as fh:
        return _digest(fh)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a file, or {} when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def real_dir(path: str | os.PathLike) -> Path:
    """``path`` when it is a real folder (checked with ``lstat``: a symbolic link put in place of a
    state folder is never followed); NotADirectoryError otherwise."""
    path = Path(path)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder (a symbolic link or a file)", str(path))
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (never read whole into memory)."""
    with open(path, "rb") as fh:
        return _digest(fh)[0]


def temp_dir_for(final: str | os.PathLike) -> Path:
    """The temporary sibling a folder is built in before publishing: ``<parent>/.tmp-<name>``."""
    final = Path(final)
    return final.parent / f".tmp-{final.name}"


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a completely built folder into place. Fails if ``final`` already exists."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; not replacing published output")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def claim(src: str | os.PathLike, dest: str | os.PathLike) -> bool:
    """Atomically move ``src`` to ``dest`` (same filesystem). False when another process won the race
    (``src`` vanished); never overwrites an existing ``dest``."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        return False
    try:
        # os.link + unlink would refuse to overwrite, but rename is what makes the claim atomic;
        # the exists() check above covers the only case rename would silently replace.
        os.rename(src, dest)
    except FileNotFoundError:
        return False
    return True


def unique_path(path: str | os.PathLike) -> Path:
    """``path`` if free, else ``path`` with ``-1``, ``-2``, ... before the suffix."""
    path = Path(path)
    if not path.exists():
        return path
    stem, suffix = path.stem, path.suffix
    n = 1
    while True:
        candidate = path.with_name(f"{stem}-{n}{suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def reserve_dir(path: str | os.PathLike) -> Path:
    """Create a new, empty 0700 folder at ``path`` or, when taken, at the first free ``-N`` variant
    (race-free: the mkdir itself decides)."""
    target = Path(path)
    while True:
        target = unique_path(target)
        try:
            target.mkdir(mode=0o700)
            return target
        except FileExistsError:
            continue


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and make sure it is mode 0700. A symbolic link or a file in its
    place raises NotADirectoryError: the link is never followed, its target never chmodded."""
    path = Path(path)
    with contextlib.suppress(FileExistsError):  # a file in its place: reported just below
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (a symbolic link or a file)",
                                     str(path)) from None
        raise
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:  # nothing to change on a read-only mount
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
    return path
