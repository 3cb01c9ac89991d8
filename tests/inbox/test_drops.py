"""The inbox: names, refusals, completeness, pairing, claims, recovery and refusing files."""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest

from daemon.inbox.drops import (
    Drop,
    InboxTracker,
    Refusal,
    abandoned_claims,
    claim_drop,
    classify_name,
    MAX_COMPANION_BYTES,
    NOT_REGULAR,
    content_key,
    escape_name,
    finish_claim,
    hash_claim,
    name_claim,
    orphans,
    refusal_reason,
    refuse,
)


class Clock:
    """A settable monotonic clock handed to the tracker (a parameter, not a patch)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dirs(tmp_path):
    inbox, work, failed, processed = (tmp_path / "inbox", tmp_path / "inbox/.work",
                                      tmp_path / "inbox/failed", tmp_path / "inbox/processed")
    for d in (inbox, work, failed, processed):
        d.mkdir(parents=True)
    return inbox, work, failed, processed


@pytest.mark.parametrize("name, expected", [
    ("visits.csv", ("dataset", "visits")),
    ("visits.CSV", ("dataset", "visits")),
    ("visits.mapping.json", ("mapping", "visits")),
    ("visits.mapping.yml", ("mapping", "visits")),
    ("visits.job.yaml", ("job", "visits")),
    ("visits.job.json", ("job", "visits")),
    (".visits.csv", ("ignored", "")),
    ("visits.csv.part", ("ignored", "")),
    ("visits.csv.tmp", ("ignored", "")),
    ("visits.csv.swp", ("ignored", "")),
    ("visits.csv~", ("ignored", "")),
    ("visits.txt", ("unknown", "")),
    ("visits.json", ("unknown", "")),
    (".csv", ("ignored", "")),
])
def test_classify_name(name, expected):
    """Inbox names map to dataset/mapping/job with their stem; temp names are ignored."""
    assert classify_name(name) == expected


def test_refusal_reasons(tmp_path):
    """Symlinks, FIFOs, folders, unknown extensions and oversized files each get their reason."""
    (tmp_path / "ok.csv").write_text("a,b\n")
    (tmp_path / "big.csv").write_text("x" * 11)
    os.symlink(tmp_path / "ok.csv", tmp_path / "link.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "folder.csv").mkdir()

    def reason(name, kind="dataset"):
        return refusal_reason(kind, os.lstat(tmp_path / name), 10)

    assert [reason("ok.csv"), reason("big.csv"), reason("link.csv"), reason("pipe.csv"),
            reason("folder.csv"), reason("ok.csv", "unknown")] == [
        None, "too_large", "symlink", "not_regular_file", "directory", "unknown_extension"]


def test_renamed_in_file_is_ready_at_once_written_file_after_close_and_settle(dirs):
    """A rename is complete at once; an in-place write waits for close plus settle_s."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, clock=clock)
    (inbox / "a.mapping.json").write_text("{}")
    (inbox / "a.csv").write_text("x")
    (inbox / "b.mapping.json").write_text("{}")
    (inbox / "b.csv").write_text("x\n")
    tracker.refresh("a.mapping.json", event="moved_in")
    tracker.refresh("a.csv", event="moved_in")
    tracker.refresh("b.mapping.json", event="moved_in")
    tracker.refresh("b.csv", event="created")
    tracker.refresh("b.csv", event="modified")
    assert tracker.ready_drops(5.0) == [Drop("a", "a.csv", "a.mapping.json", None)]
    clock.now += 10
    assert [d.stem for d in tracker.ready_drops(5.0)] == ["a"]  # b is still open for writing
    tracker.refresh("b.csv", event="closed")
    clock.now += 0.4
    assert [d.stem for d in tracker.ready_drops(5.0)] == ["a"]
    clock.now += 0.2
    assert sorted(d.stem for d in tracker.ready_drops(5.0)) == ["a", "b"]


def test_scanned_file_settles_when_size_stops_changing(dirs):
    """A file found by a scan is complete once its size and mtime stay the same for settle_s."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, clock=clock)
    (inbox / "c.mapping.json").write_text("{}")
    (inbox / "c.csv").write_text("x")
    tracker.scan()
    clock.now += 0.3
    with open(inbox / "c.csv", "a") as fh:
        fh.write("more\n")
    tracker.scan()
    clock.now += 0.3
    assert tracker.ready_drops(5.0) == []
    clock.now += 0.3
    assert tracker.ready_drops(5.0) == [Drop("c", "c.csv", "c.mapping.json", None)]


def test_dataset_without_mapping_waits_pair_timeout(dirs):
    """A dataset alone is claimable only after pair_timeout_s; a job file next to it comes along."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.0, max_input_bytes=1 << 20, clock=clock)
    (inbox / "d.job.yaml").write_text("epochs: 1\n")
    (inbox / "d.csv").write_text("x")
    tracker.refresh("d.job.yaml", event="moved_in")
    tracker.refresh("d.csv", event="moved_in")
    assert tracker.ready_drops(2.0) == []
    clock.now += 1.0
    assert tracker.next_deadline() == pytest.approx(1.0)
    assert tracker.ready_drops(2.0) == []
    clock.now += 1.0
    assert tracker.ready_drops(2.0) == [Drop("d", "d.csv", None, "d.job.yaml")]


def test_complete_pair_waits_job_wait_for_a_late_job_file(dirs):
    """A dataset and mapping without a job file wait job_wait_s; a job file arriving then joins the drop."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, job_wait_s=0.4, clock=clock)
    for name in ("e.mapping.json", "e.csv", "f.mapping.json", "f.csv"):
        (inbox / name).write_text("x")
        tracker.refresh(name, event="moved_in")
    assert tracker.ready_drops(5.0) == []
    assert tracker.next_deadline() == pytest.approx(0.4)
    clock.now += 0.3
    (inbox / "e.job.yaml").write_text("epochs: 1\n")
    tracker.refresh("e.job.yaml", event="moved_in")
    assert tracker.ready_drops(5.0) == [Drop("e", "e.csv", "e.mapping.json", "e.job.yaml")]
    tracker.forget("e.csv")
    clock.now += 0.2
    assert tracker.ready_drops(5.0) == [Drop("f", "f.csv", "f.mapping.json", None)]


def test_job_file_being_written_holds_its_dataset_back(dirs):
    """A job file still open for writing keeps a complete dataset and mapping waiting past job_wait_s."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, job_wait_s=0.1, clock=clock)
    for name in ("g.mapping.json", "g.csv"):
        (inbox / name).write_text("x")
        tracker.refresh(name, event="moved_in")
    (inbox / "g.job.yaml").write_text("epo")
    tracker.refresh("g.job.yaml", event="opened")
    clock.now += 1.0
    assert tracker.ready_drops(5.0) == []
    tracker.refresh("g.job.yaml", event="closed")
    clock.now += 0.5
    assert tracker.ready_drops(5.0) == [Drop("g", "g.csv", "g.mapping.json", "g.job.yaml")]


def test_a_readers_open_and_close_leave_the_settle_clock_and_an_open_file_waits(dirs):
    """A read (an open and a close without a write: the daemon's own checks, a viewer) does not
    restart a file's settle clock, so a dataset without a mapping is due pair_timeout_s after its
    close however often it is read; a file still open (a writer that has not written yet) waits
    for its close, with no deadline that would wake the loop."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, clock=clock)
    (inbox / "r.csv").write_text("a,b\n1,2\n")
    for event in ("created", "opened", "modified", "closed"):
        tracker.refresh("r.csv", event=event)
    (inbox / "w.csv").write_text("")
    for event in ("created", "opened"):  # `query > inbox/w.csv`, the query still running
        tracker.refresh("w.csv", event=event)
    ready = []
    for _ in range(8):
        clock.now += 0.25
        for event in ("opened", "closed_no_write"):
            tracker.refresh("r.csv", event=event)
        ready.append([d.stem for d in tracker.ready_drops(1.0)])
    assert ready == [[], [], [], [], [], ["r"], ["r"], ["r"]]
    assert tracker.next_deadline() is None
    tracker.refresh("w.csv", event="closed")
    clock.now += 1.5
    assert [d.stem for d in tracker.ready_drops(1.0)] == ["r", "w"]


def test_ready_drops_stop_at_the_limit_and_drops_waiting_for_capacity_set_no_deadline(dirs):
    """ready_drops returns at most ``limit`` drops, oldest first; complete drops left over (waiting
    for a worker, announced by a finished job) do not make the loop wake up early."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, job_wait_s=0.4, clock=clock)
    for stem in ("h1", "h2", "h3"):
        for name in (f"{stem}.mapping.json", f"{stem}.job.yaml", f"{stem}.csv"):
            (inbox / name).write_text("x")
            tracker.refresh(name, event="moved_in")
        clock.now += 0.01
    assert [d.stem for d in tracker.ready_drops(5.0, limit=2)] == ["h1", "h2"]
    assert tracker.next_deadline() is None


def test_claim_name_finish_moves_everything_in_one_folder(dirs):
    """A claim takes the drop's files, gets a <stem>-<stamp>-<8 hex> id and ends in processed/."""
    inbox, work, _, processed = dirs
    (inbox / "e.csv").write_text("rows")
    (inbox / "e.mapping.json").write_text("{}")
    claim = claim_drop(inbox, work, Drop("e", "e.csv", "e.mapping.json", None))
    assert sorted(os.listdir(inbox)) == [".work", "failed", "processed"]
    hashes = hash_claim(claim)
    key = content_key((role, digest) for role, (_, digest, _) in hashes.items())
    job_id = name_claim(claim, "e", key)
    assert re.fullmatch(r"e-\d{8}T\d{6}-[0-9a-f]{8}", job_id)
    assert job_id.endswith(key[:8])
    assert abandoned_claims(work) == []  # we hold its lock
    target = finish_claim(claim, processed, note=("duplicate.json", {"duplicate_of": "x"}))
    assert target == processed / job_id
    assert sorted(os.listdir(target)) == ["duplicate.json", "e.csv", "e.mapping.json"]
    assert os.listdir(work) == []


def test_second_claim_of_same_drop_loses_cleanly(dirs):
    """When the dataset is already claimed, another claim returns None and leaves no folder."""
    inbox, work, _, _ = dirs
    (inbox / "f.csv").write_text("rows")
    first = claim_drop(inbox, work, Drop("f", "f.csv", None, None))
    assert claim_drop(inbox, work, Drop("f", "f.csv", None, None)) is None
    assert os.listdir(work) == [first.path.name]
    first.release()


def test_released_claim_is_recovered_with_its_roles(dirs, tmp_path):
    """A claim folder nobody holds is found by abandoned_claims, with the default mapping copy."""
    inbox, work, _, _ = dirs
    default = tmp_path / "default.json"
    default.write_text('{"Match": 1}')
    (inbox / "g.csv").write_text("rows")
    (inbox / "g.job.yaml").write_text("epochs: 1\n")
    claim = claim_drop(inbox, work, Drop("g", "g.csv", None, "g.job.yaml"), default_mapping=default)
    claim.release()
    (work / "empty").mkdir()
    found = abandoned_claims(work)
    assert [c.files for c in found] == [{"dataset": "g.csv", "job": "g.job.yaml",
                                         "default_mapping": "default-mapping.json"}]
    assert os.listdir(work) == [claim.path.name]  # the empty folder was tidied away
    found[0].release()


def test_content_key_ignores_order():
    """The content key depends on roles and hashes, not on their order."""
    assert content_key([("dataset", "1"), ("mapping", "2")]) == content_key([("mapping", "2"), ("dataset", "1")])
    assert content_key([("dataset", "1")]) != content_key([("dataset", "1"), ("job", "3")])


def test_refuse_moves_symlink_itself_with_error_json(dirs, tmp_path):
    """A refused symlink is moved as a link (its target untouched) next to an error.json."""
    inbox, _, failed, _ = dirs
    target = tmp_path / "secret.csv"
    target.write_text("PATIENT-MARKER")
    os.symlink(target, inbox / "l.csv")
    dest = refuse(inbox, failed, Refusal("l.csv", "symlink", 0), {"error_type": "RefusedInputError"})
    assert os.path.islink(dest / "l.csv") and os.readlink(dest / "l.csv") == str(target)
    assert target.read_text() == "PATIENT-MARKER"
    assert json.loads((dest / "error.json").read_text()) == {"error_type": "RefusedInputError", "job_id": dest.name}
    assert refuse(inbox, failed, Refusal("l.csv", "symlink", 0), {}) is None
    assert os.listdir(failed) == [dest.name]  # no staging folder left behind


def test_a_job_folder_never_appears_before_its_files(dirs):
    """finish_claim and refuse put a folder into processed/ or failed/ whole: a watcher listing
    the destination the whole time sees each job's folder only with its files (and never takes
    the name of a folder already there: the second refusal within a second gets -1)."""
    import threading

    inbox, work, failed, processed = dirs
    seen: list[tuple[str, tuple]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for where in (failed, processed):
                for entry in os.scandir(where):
                    if not entry.name.startswith("."):
                        with contextlib.suppress(FileNotFoundError):  # renamed away meanwhile
                            seen.append((entry.name, tuple(sorted(os.listdir(entry.path)))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for n in range(20):
            (inbox / f"r{n}.csv").write_text("rows")
            claim = claim_drop(inbox, work, Drop(f"r{n}", f"r{n}.csv", None, None))
            finish_claim(claim, processed, note=("duplicate.json", {}))
            (inbox / "bad.txt").write_text("x")
            refuse(inbox, failed, Refusal("bad.txt", "unknown_extension", 1), {"error_type": "RefusedInputError"})
    finally:
        done.set()
        watcher.join()
    assert seen, "the watcher saw nothing"
    assert {files for _, files in seen} <= {("duplicate.json", "r%d.csv" % n) for n in range(20)} | {
        ("bad.txt", "error.json")}
    names = sorted(os.listdir(failed))
    assert len(names) == 20 and all(json.loads((failed / n / "error.json").read_text())["job_id"] == n for n in names)


def test_sweep_refusals_finishes_what_a_stop_interrupted(dirs):
    """A stop in the middle of a refusal leaves a hidden staging folder in failed/: the sweep puts
    one holding the entry into place (an error.json saying the reason was lost, when it had none)
    and removes an empty one; nothing is lost."""
    from daemon.inbox.drops import REFUSING_PREFIX, sweep_refusals

    _, _, failed, _ = dirs
    stamp = "bad.txt-20261207T101010"
    kept = failed / f"{REFUSING_PREFIX}{stamp}-0a1b2c3d"
    kept.mkdir()
    (kept / "bad.txt").write_text("PATIENT-MARKER")
    (failed / f"{REFUSING_PREFIX}other-20261207T101011-00000000").mkdir()
    placed = sweep_refusals(failed)
    assert placed == [failed / stamp] and sorted(os.listdir(failed)) == [stamp]
    assert (failed / stamp / "bad.txt").read_text() == "PATIENT-MARKER"
    error = json.loads((failed / stamp / "error.json").read_text())
    assert (error["error_type"], error["job_id"]) == ("RecoveryError", stamp)
    assert "PATIENT" not in json.dumps(error)
    # a stop after the reason was written: it is kept; the name already taken: -1, as refuse names it
    again = failed / f"{REFUSING_PREFIX}{stamp}-99999999"
    again.mkdir()
    (again / "bad.txt").write_text("x")
    (again / "error.json").write_text(json.dumps({"error_type": "RefusedInputError", "job_id": stamp}))
    assert sweep_refusals(failed) == [failed / f"{stamp}-1"]
    assert json.loads((failed / f"{stamp}-1" / "error.json").read_text()) == {
        "error_type": "RefusedInputError", "job_id": f"{stamp}-1"}


def test_orphans_lists_companions_without_dataset(dirs):
    """Mappings and job files whose dataset is absent are orphans; paired ones are not."""
    inbox = dirs[0]
    for name in ("h.mapping.json", "i.job.yaml", "j.csv", "j.mapping.yaml"):
        (inbox / name).write_text("x")
    assert [(o["name"], o["kind"]) for o in orphans(inbox)] == [("h.mapping.json", "mapping"), ("i.job.yaml", "job")]


def test_escape_name_escapes_bytes_that_are_not_utf8_and_control_characters():
    """Non-UTF-8 bytes become \\xNN; newlines, escapes and bidi overrides are escaped; text stays."""
    assert escape_name(os.fsdecode(b"Grippe_M\xe4rz.csv")) == "Grippe_M\\xe4rz.csv"
    assert escape_name("a\nb\x1b[2J\u202ec.csv") == "a\\x0ab\\x1b[2J\\u202ec.csv"
    assert escape_name("Erkältung.csv") == "Erkältung.csv"


def test_job_ids_from_long_or_undecodable_stems_are_bounded_utf8(dirs):
    """A 240-byte stem gives a job id of at most 150 bytes; a non-UTF-8 stem gives a UTF-8 id."""
    inbox, work, _, _ = dirs
    for stem in ("é" * 120, os.fsdecode(b"M\xe4rz")):
        (inbox / f"{stem}.csv").write_text("rows")
        claim = claim_drop(inbox, work, Drop(stem, f"{stem}.csv", None, None))
        job_id = name_claim(claim, stem, "0" * 64)
        assert len(job_id.encode("utf-8")) <= 150
        assert job_id.startswith("é" * 60 if stem.startswith("é") else "M\\xe4rz-")
        assert (work / job_id / f"{stem}.csv").is_file()
        claim.release()


def test_hash_claim_never_opens_a_fifo(dirs):
    """A FIFO renamed over a companion is hashed as NOT_REGULAR without blocking on open."""
    inbox, work, _, _ = dirs
    (inbox / "p.csv").write_text("rows")
    os.mkfifo(inbox / "p.mapping.json")
    claim = claim_drop(inbox, work, Drop("p", "p.csv", "p.mapping.json", None))
    hashes = hash_claim(claim)
    assert hashes["mapping"] == ("p.mapping.json", NOT_REGULAR, 0)
    assert hashes["dataset"][2] == 4
    claim.release()


def test_companions_over_the_cap_are_refused(tmp_path):
    """Mapping and job files over 256 KiB are refused as too large; a dataset of that size is not."""
    path = tmp_path / "x"
    path.write_bytes(b"x" * (MAX_COMPANION_BYTES + 1))
    st = os.lstat(path)
    assert refusal_reason("mapping", st, 10**9) == "too_large"
    assert refusal_reason("job", st, 10**9) == "too_large"
    assert refusal_reason("dataset", st, 10**9) is None


def test_refusing_a_long_or_undecodable_name_bounds_the_folder_name(dirs):
    """A refused 250-byte name or a non-UTF-8 name gets a bounded, escaped failed/ folder."""
    inbox, _, failed, _ = dirs
    for name in ("n" * 246 + ".txt", os.fsdecode(b"note\xff.txt")):
        (inbox / name).write_text("x")
        dest = refuse(inbox, failed, Refusal(name, "unknown_extension", 1), {"error_type": "RefusedInputError"})
        assert len(os.fsencode(dest.name)) <= 150
        assert (dest / name).is_file()
    assert sorted(p.name[:8] for p in failed.iterdir()) == ["nnnnnnnn", "note\\xff"]


def test_finish_claim_refuses_a_symlinked_destination(dirs, tmp_path):
    """A symbolic link put in place of processed/ is not followed: the claim stays where it is."""
    inbox, work, _, processed = dirs
    os.rmdir(processed)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, processed)
    (inbox / "s.csv").write_text("rows")
    claim = claim_drop(inbox, work, Drop("s", "s.csv", None, None))
    with pytest.raises(NotADirectoryError):
        finish_claim(claim, processed)
    assert os.listdir(outside) == []
    assert os.listdir(claim.path) == ["s.csv"]
    claim.release()


def test_in_place_dataset_with_an_unfinished_last_line_waits_longer(dirs):
    """A dataset written in place whose last line has no newline is not complete after settle_s
    (its writer may reopen it); after 10 x settle_s unchanged it is taken anyway. A renamed-in
    file is trusted at once."""
    inbox = dirs[0]
    clock = Clock()
    tracker = InboxTracker(inbox, settle_s=0.5, max_input_bytes=1 << 20, clock=clock)
    for stem in ("h", "r"):
        (inbox / f"{stem}.mapping.json").write_text("{}")
        (inbox / f"{stem}.csv").write_text("a,b\n1,2")  # no final newline
        tracker.refresh(f"{stem}.mapping.json", event="moved_in")
    tracker.refresh("h.csv", event="created")
    tracker.refresh("h.csv", event="closed")
    tracker.refresh("r.csv", event="moved_in")
    clock.now += 1.0
    assert [d.stem for d in tracker.ready_drops(0.0)] == ["r"]
    assert tracker.next_deadline() == 4.0
    clock.now += 4.0
    assert sorted(d.stem for d in tracker.ready_drops(0.0)) == ["h", "r"]
