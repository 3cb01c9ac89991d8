"""Atomic writes, publishing folders, claiming by rename."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from daemon import fsutil
from tests.conftest import leftovers


def test_atomic_write_replaces_whole_file(tmp_path):
    """write_json replaces the target in one step and leaves no temporary file."""
    target = tmp_path / "a.json"
    target.write_text("old")
    fsutil.write_json(target, {"k": "välue"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"k": "välue"}
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_old_content_and_no_temp(tmp_path):
    """An exception while writing leaves the old file untouched and removes the temp file."""
    target = tmp_path / "a.txt"
    target.write_text("old")

    def chunks():
        yield "new part\n"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fsutil.write_lines(target, chunks())
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_write_lines_writes_every_chunk_in_order_as_utf8(tmp_path):
    """Many chunks (more than the writer thread takes ahead) arrive whole, in order, UTF-8, no CRLF."""
    target = tmp_path / "lines.jsonl"
    chunks = [f"{i} fièvre\n" * (i % 5 + 1) for i in range(200)]
    fsutil.write_lines(target, iter(chunks))
    assert target.read_bytes() == "".join(chunks).encode("utf-8")
    assert leftovers(tmp_path) == []


def test_write_lines_raises_a_write_side_error_and_keeps_the_old_file(tmp_path):
    """Text that cannot be encoded fails on the writer thread: the caller gets that error, the old file
    stays, no temporary file is left and the producer is not left blocked."""
    target = tmp_path / "a.txt"
    target.write_text("old")
    produced = []

    def chunks():
        for i in range(50):
            produced.append(i)
            yield "lone surrogate \ud800\n" if i == 3 else f"line {i}\n"

    with pytest.raises(UnicodeEncodeError):
        fsutil.write_lines(target, chunks())
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    assert len(produced) < 50  # stopped soon after the failure instead of building every chunk


def test_sha256_file_matches_hashlib(tmp_path):
    """The streamed hash equals hashlib over the whole content."""
    data = os.urandom(3 * fsutil.HASH_CHUNK + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fsutil.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_publish_dir_renames_and_refuses_to_overwrite(tmp_path):
    """A built folder appears whole; publishing over an existing folder fails."""
    final = tmp_path / "job"
    tmp = fsutil.temp_dir_for(final)
    tmp.mkdir()
    (tmp / "f").write_text("x")
    assert fsutil.publish_dir(tmp, final) == final
    assert (final / "f").read_text() == "x" and not tmp.exists()
    tmp.mkdir()
    with pytest.raises(FileExistsError):
        fsutil.publish_dir(tmp, final)


def test_claim_is_exclusive(tmp_path):
    """The first claim wins; a second claim of the same file reports False."""
    src = tmp_path / "in.csv"
    src.write_text("a")
    assert fsutil.claim(src, tmp_path / "c1.csv") is True
    assert fsutil.claim(src, tmp_path / "c2.csv") is False
    other = tmp_path / "other.csv"
    other.write_text("b")
    assert fsutil.claim(other, tmp_path / "c1.csv") is False
    assert (tmp_path / "c1.csv").read_text() == "a"


def test_unique_path_and_private_dir(tmp_path):
    """unique_path never returns an existing path; make_private_dir sets 0700."""
    (tmp_path / "x.json").write_text("")
    (tmp_path / "x-1.json").write_text("")
    assert fsutil.unique_path(tmp_path / "x.json") == tmp_path / "x-2.json"
    d = fsutil.make_private_dir(tmp_path / "a" / "b")
    assert d.stat().st_mode & 0o777 == 0o700


def test_rename_no_replace_refuses_what_a_plain_rename_replaces(tmp_path):
    """A plain rename silently replaces an existing file or an empty folder; rename_no_replace
    raises FileExistsError and leaves both sides as they were, for files, folders and links."""
    (tmp_path / "a.csv").write_text("mine")
    (tmp_path / "b.csv").write_text("theirs")
    with pytest.raises(FileExistsError):
        fsutil.rename_no_replace(tmp_path / "a.csv", tmp_path / "b.csv")
    assert [(tmp_path / n).read_text() for n in ("a.csv", "b.csv")] == ["mine", "theirs"]
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "f").write_text("x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        fsutil.rename_no_replace(tmp_path / "job", tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == [] and os.listdir(tmp_path / "job") == ["f"]
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(FileExistsError):
        fsutil.rename_no_replace(tmp_path / "job", tmp_path / "dangling")
    fsutil.rename_no_replace(tmp_path / "job", tmp_path / "free")
    assert (tmp_path / "free" / "f").read_text() == "x" and not (tmp_path / "job").exists()
    with pytest.raises(FileNotFoundError):
        fsutil.rename_no_replace(tmp_path / "job", tmp_path / "other")


def test_rename_to_free_name_takes_the_first_free_variant_whole(tmp_path):
    """Taken names (a file, an empty folder) are skipped, never replaced: the folder arrives under
    the first free -N name with its files, and the names' holders are unchanged."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job-1").write_text("other")
    for n in range(3):
        (tmp_path / f"w{n}").mkdir()
        (tmp_path / f"w{n}" / "error.json").write_text("{}")
    placed = [fsutil.rename_to_free_name(tmp_path / f"w{n}", tmp_path / "job") for n in range(3)]
    assert [p.name for p in placed] == ["job-2", "job-3", "job-4"]
    assert all(os.listdir(p) == ["error.json"] for p in placed)
    assert os.listdir(tmp_path / "job") == [] and (tmp_path / "job-1").read_text() == "other"


def test_open_regular_refuses_fifo_and_symlink_without_blocking(tmp_path):
    """open_regular raises NotRegularFileError for a FIFO (no writer: a plain open would block)
    and for a symbolic link; a regular file opens."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_text("abc")
    os.symlink(tmp_path / "real", tmp_path / "link")
    for name in ("fifo", "link"):
        with pytest.raises(fsutil.NotRegularFileError):
            fsutil.open_regular(tmp_path / name)
    assert fsutil.hash_regular_file(tmp_path / "real") == (hashlib.sha256(b"abc").hexdigest(), 3)


def test_files_in_a_real_folder_open_relative_to_it_without_following_links(tmp_path):
    """open_real_dir refuses a link or a file in place of a folder; open_regular with its dir_fd
    opens a file inside and refuses a link there."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "real").write_text("abc")
    os.symlink(tmp_path / "d" / "real", tmp_path / "d" / "link")
    os.symlink(tmp_path / "d", tmp_path / "dlink")
    for name in ("dlink", "d/real"):
        with pytest.raises(NotADirectoryError):
            fsutil.open_real_dir(tmp_path / name)
    fd = fsutil.open_real_dir(tmp_path / "d")
    try:
        with os.fdopen(fsutil.open_regular("real", dir_fd=fd), "rb") as fh:
            assert fh.read() == b"abc"
        with pytest.raises(fsutil.NotRegularFileError):
            fsutil.open_regular("link", dir_fd=fd)
    finally:
        os.close(fd)


def test_read_json_object_of_absurdly_nested_json_is_empty(tmp_path):
    """JSON nested 100,000 levels deep (a RecursionError in the parser) reads as {}, like any
    other file that is not a JSON object."""
    (tmp_path / "deep.json").write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert fsutil.read_json_object(tmp_path / "deep.json") == {}


def test_write_json_escapes_lone_surrogates(tmp_path):
    """A value holding a lone surrogate (a non-UTF-8 file name) is written escaped, not a crash."""
    fsutil.write_json(tmp_path / "e.json", {"file": os.fsdecode(b"note\xff.txt")})
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8")) == {"file": "note\udcff.txt"}


def test_make_private_dir_never_follows_a_symlink(tmp_path):
    """A link in place of a state folder raises NotADirectoryError and its target keeps its mode."""
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    os.symlink(target, tmp_path / "state")
    with pytest.raises(NotADirectoryError):
        fsutil.make_private_dir(tmp_path / "state")
    assert oct(os.stat(target).st_mode & 0o777) == "0o755"


def _mode(path) -> str:
    return oct(os.stat(path).st_mode & 0o7777)


def test_make_shared_dir_gives_the_folder_to_the_group_with_setgid(tmp_path):
    """make_shared_dir creates the folder (and parents) owned by the group, mode 2770, and repairs an
    existing one that is private or open to others."""
    gid = os.getgid()
    shared = fsutil.make_shared_dir(tmp_path / "a" / "inbox", gid)
    existing = tmp_path / "outputs"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    fsutil.make_shared_dir(existing, gid)
    assert [(_mode(p), os.stat(p).st_gid) for p in (shared, existing)] == [("0o2770", gid), ("0o2770", gid)]


def test_make_shared_dir_never_follows_a_symlink(tmp_path):
    """A link in place of a shared folder raises NotADirectoryError and its target keeps its mode."""
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    os.symlink(target, tmp_path / "inbox")
    with pytest.raises(NotADirectoryError):
        fsutil.make_shared_dir(tmp_path / "inbox", os.getgid())
    assert _mode(target) == "0o755"


def test_what_is_made_in_a_shared_folder_is_for_the_group(tmp_path):
    """In a shared folder atomic files are 0660 and new folders (new_dir, make_dir_like_parent)
    2770 with the folder's group."""
    shared = fsutil.make_shared_dir(tmp_path / "outputs", os.getgid())
    fsutil.write_json(shared / "error.json", {})
    made = [fsutil.new_dir(shared / ".claim-1"), fsutil.make_dir_like_parent(shared / ".tmp-job")]
    assert [_mode(p) for p in (shared / "error.json", *made)] == ["0o660", "0o2770", "0o2770"]
    assert {os.stat(p).st_gid for p in made} == {os.getgid()}


def test_what_is_made_in_a_private_folder_stays_private(tmp_path):
    """Outside a shared folder nothing changes: atomic files 0600, new folders 0700."""
    private = fsutil.make_private_dir(tmp_path / "outputs")
    fsutil.write_json(private / "error.json", {})
    made = [fsutil.new_dir(private / ".claim-1"), fsutil.make_dir_like_parent(private / ".tmp-job")]
    assert [_mode(p) for p in (private / "error.json", *made)] == ["0o600", "0o700", "0o700"]


def test_make_dir_like_parent_refuses_a_group_members_folder(tmp_path):
    """In a shared folder a build folder another user made first (its name is predictable) is refused."""
    shared = fsutil.make_shared_dir(tmp_path / "outputs", os.getgid())
    planted = shared / ".tmp-job"
    planted.mkdir()
    os.chown(planted, os.geteuid() + 4242, -1)  # the tests run as root
    with pytest.raises(PermissionError):
        fsutil.make_dir_like_parent(planted)


def test_make_executable_adds_execute_where_read_is(tmp_path):
    """make_executable: 0600 becomes 0700, 0660 (a file in a shared folder) 0770."""
    private, shared = tmp_path / "p.sh", tmp_path / "s.sh"
    for path, mode in ((private, 0o600), (shared, 0o660)):
        path.write_text("exit 0\n")
        os.chmod(path, mode)
        fsutil.make_executable(path)
    assert [_mode(private), _mode(shared)] == ["0o700", "0o770"]


def test_read_json_never_blocks_on_a_fifo_nor_reads_a_device_or_a_link(tmp_path):
    """A FIFO (no writer), a link to /dev/zero and a link to a good file in place of a JSON file are
    refused at once, each saying what it is; read_json_object gives {} for them, following only a
    link to a regular file when asked to."""
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "good.json").write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "good.json")
    problems = {}
    for name in ("fifo.json", "zero.json", "link.json"):
        with pytest.raises(fsutil.NotRegularFileError) as info:
            fsutil.read_json(tmp_path / name)
        problems[name] = fsutil.read_problem(info.value)
    assert problems == {"fifo.json": "a FIFO (named pipe), not a regular file",
                        "zero.json": "a symbolic link, not a file", "link.json": "a symbolic link, not a file"}
    with pytest.raises(fsutil.NotRegularFileError) as info:
        fsutil.read_json(tmp_path / "zero.json", follow_links=True)
    assert fsutil.read_problem(info.value) == "a character device, not a regular file"
    assert [fsutil.read_json_object(tmp_path / n) for n in ("fifo.json", "zero.json", "link.json")] == [
        {}, {}, {"a": 1}]
    assert fsutil.read_json_object(tmp_path / "link.json", follow_links=False) == {}


def test_read_regular_stops_at_its_limit_or_gives_the_tail(tmp_path):
    """A file over the limit is a FileTooLargeError (nothing past the limit read); ``tail`` gives its
    last bytes instead; a file that is not JSON is a ValueError that does not quote it."""
    path = tmp_path / "big.log"
    path.write_bytes(b"0123456789" * 10)
    with pytest.raises(fsutil.FileTooLargeError) as info:
        fsutil.read_regular(path, limit=99)
    assert fsutil.read_problem(info.value) == "over the limit of 99 bytes"
    assert (fsutil.read_regular(path, limit=100), fsutil.read_regular(path, limit=15, tail=True)) == (
        b"0123456789" * 10, b"567890123456789")
    path.write_text("secret text, not json")
    with pytest.raises(ValueError) as bad:
        fsutil.read_json(path)
    assert str(bad.value) == "not valid JSON in UTF-8"


def test_write_problem_refuses_an_input_and_what_is_not_a_regular_file(tmp_path):
    """Writing at a path that is an input (itself, through a link, a hard link), a FIFO, a folder or
    a device is refused in words; a regular file or a free name is not."""
    source = tmp_path / "journal.sqlite3"
    source.write_text("x")
    (tmp_path / "link").symlink_to(source)
    os.link(source, tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "other").write_text("y")
    problems = {name: fsutil.write_problem(tmp_path / name, inputs=(source,))
                for name in ("journal.sqlite3", "link", "hard", "fifo", "dir", "other", "free")}
    same = f"is the input file {source} itself"
    assert problems == {"journal.sqlite3": same, "link": same, "hard": same,
                        "fifo": "is a FIFO (named pipe), not a regular file", "dir": "is a folder, not a regular file",
                        "other": None, "free": None}
    assert fsutil.write_problem("/dev/null") == "is a character device, not a regular file"
