"""Hostile drops against a real daemon process: bad encodings, odd names, long names, FIFOs, links put
in place of state folders, a full disk. One bad file only ever fails itself; the daemon stays up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from daemon.data.synthetic import MAPPING
from tests.conftest import leftovers, mounted, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

NON_UTF8_STEM = os.fsdecode(b"Grippe_M\xe4rz")  # what os.listdir hands over for that byte name
CONTROL_STEM = "line\nvisits-20990101T000000-ffffffff  model_set -> forged\x1b[2J\u202eevil"


def _stop(daemon) -> None:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def _error(folder) -> dict:
    return json.loads((folder / "error.json").read_text(encoding="utf-8"))


def _mapping_bytes() -> bytes:
    return json.dumps(MAPPING).encode()


def _assert_alive(daemon) -> None:
    assert daemon.proc.poll() is None, daemon.err_path.read_text(errors="replace")


def _only_place(root, name: str) -> list[str]:
    """Where a file named ``name`` is under the inbox (relative folders), to check it is in one place."""
    return sorted(str(p.parent.relative_to(root.inbox)) for p in root.inbox.rglob("*") if p.name == name)


def test_job_file_not_utf8_or_deeply_nested_fails_only_its_job(root, start_daemon):
    """A job file that is not UTF-8, or nested 5,000 deep, fails its own job with a ConfigError;
    the daemon keeps serving and a restart does not die in recovery."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("latin.mapping.json", _mapping_bytes())
    root.drop_bytes("latin.job.yaml", b"topics: Erk\xe4ltung\n")
    root.drop_bytes("latin.csv", root.dataset_bytes())
    root.drop_bytes("deep.mapping.json", _mapping_bytes())
    root.drop_bytes("deep.job.yaml", b"force: " + b"[" * 5000 + b"]" * 5000 + b"\n")
    root.drop_bytes("deep.csv", root.dataset_bytes(seed=8))
    root.drop_dataset("fine", seed=9)
    wait_for(lambda: root.job_folders(root.failed, "latin") and root.job_folders(root.failed, "deep")
             and root.job_folders(root.processed, "fine"), timeout=30, message="two failed, one processed")
    _assert_alive(d)
    for stem in ("latin", "deep"):
        [folder] = root.job_folders(root.failed, stem)
        error = _error(folder)
        assert error["error_type"] == "ConfigError"
        assert f"{stem}.job.yaml" in error["message"]
        assert str(root.path) not in error["message"]
        assert sorted(os.listdir(folder)) == sorted(["error.json", "job.log", f"{stem}.csv", f"{stem}.job.yaml",
                                                     f"{stem}.mapping.json"])
    _stop(d)
    d2 = start_daemon()
    d2.wait_event("daemon_ready")
    _stop(d2)
    assert MARKER not in all_log_text(root)


def test_job_file_bombs_fail_their_own_job_naming_the_rule(root, start_daemon):
    """A 50 KB job file whose topics repeat an anchored 10,000-character string 10,000 times (100 MB
    once expanded) and one that writes out 60 topics each fail their own job with a ConfigError
    naming the rule or the key and its limit; nothing is published for them and the daemon serves on."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    bomb = b"topics: [&t " + b"x" * 10_000 + b", *t" * 9_999 + b"]\n"
    assert len(bomb) < 51_000
    root.drop_bytes("bomb.mapping.json", _mapping_bytes())
    root.drop_bytes("bomb.job.yaml", bomb)
    root.drop_bytes("bomb.csv", root.dataset_bytes(seed=11))
    root.drop_bytes("many.mapping.json", _mapping_bytes())
    root.drop_bytes("many.job.yaml", ("topics:\n" + "".join(f"  - topic {i}\n" for i in range(60))).encode())
    root.drop_bytes("many.csv", root.dataset_bytes(seed=12))
    wait_for(lambda: root.job_folders(root.failed, "bomb") and root.job_folders(root.failed, "many"),
             timeout=30, message="both bombs failed")
    root.drop_dataset("after", seed=13)
    wait_for(lambda: root.job_folders(root.processed, "after"), timeout=30, message="still serving")
    _assert_alive(d)
    [bomb_folder] = root.job_folders(root.failed, "bomb")
    [many_folder] = root.job_folders(root.failed, "many")
    assert [(_error(f)["error_type"], _error(f)["message"], _error(f)["hint"])
            for f in (bomb_folder, many_folder)] == [
        ("ConfigError", "invalid configuration in bomb.job.yaml: the file uses a YAML alias (*name), which job "
                        "and mapping files may not use: write each value out in full (line 1)",
         "fix the job file and drop it again"),
        ("ConfigError", "invalid configuration in many.job.yaml: topics: 60 topics, over the limit of 50",
         "fix the job file and drop it again")]
    assert [p.name for p in root.outputs.iterdir()] == [root.job_folders(root.processed, "after")[0].name]
    assert (bomb_folder / "error.json").stat().st_size < 1000
    _stop(d)


def test_job_file_numbers_that_are_nan_or_inf_fail_their_own_job(root, start_daemon):
    """A job file whose learning_rate is .nan or -.inf, or whose review_below is .inf, fails its own
    job at the door (error.json: a ConfigError naming the key); the daemon serves on."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    jobs = {"nanrate": b"learning_rate: .nan\n", "infrate": b"learning_rate: -.inf\n",
            "infreview": b"task: rate\nreview_below: .inf\n"}
    for i, (stem, job) in enumerate(jobs.items()):
        root.drop_bytes(f"{stem}.mapping.json", _mapping_bytes())
        root.drop_bytes(f"{stem}.job.yaml", job)
        root.drop_bytes(f"{stem}.csv", root.dataset_bytes(seed=20 + i))
    wait_for(lambda: all(root.job_folders(root.failed, stem) for stem in jobs), timeout=30,
             message="the three jobs failed")
    root.drop_dataset("after", seed=23)
    wait_for(lambda: root.job_folders(root.processed, "after"), timeout=30, message="still serving")
    _assert_alive(d)
    errors = [_error(root.job_folders(root.failed, stem)[0]) for stem in jobs]
    assert [(e["error_type"], e["message"], e["hint"]) for e in errors] == [
        ("ConfigError", "invalid configuration in nanrate.job.yaml: learning_rate: must be a finite number",
         "fix the job file and drop it again"),
        ("ConfigError", "invalid configuration in infrate.job.yaml: learning_rate: must be a finite number",
         "fix the job file and drop it again"),
        ("ConfigError", "invalid configuration in infreview.job.yaml: review_below: must be a confidence in (0, 1]",
         "fix the job file and drop it again")]
    assert [p.name for p in root.outputs.iterdir()] == [root.job_folders(root.processed, "after")[0].name]
    _stop(d)


def test_file_names_that_are_not_utf8_are_escaped_everywhere(root, start_daemon):
    """A dataset named with a non-UTF-8 byte is processed under a job id with the byte escaped as
    \\xe4; a refused file named so goes to failed/; logs, JSON and the journal hold the escape."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes(f"{NON_UTF8_STEM}.mapping.json", _mapping_bytes())
    root.drop_bytes(f"{NON_UTF8_STEM}.csv", root.dataset_bytes())
    root.drop_bytes(os.fsdecode(b"note\xff.txt"), b"hello")
    escaped = "Grippe_M\\xe4rz"
    wait_for(lambda: root.job_folders(root.processed, escaped) and root.folders(root.failed),
             timeout=30, message="the job processed and the note refused")
    _assert_alive(d)
    [done] = root.job_folders(root.processed, escaped)
    assert sorted(os.listdir(os.fsencode(done))) == [b"Grippe_M\xe4rz.csv", b"Grippe_M\xe4rz.mapping.json"]
    assert (root.outputs / done.name / "model_set_config.json").is_file()
    [refused] = root.failed.iterdir()
    assert refused.name.startswith("note\\xff.txt-")
    assert _error(refused)["message"].startswith("note\\xff.txt: ")
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(root.config),
                             "--root", str(root.path), "--json"], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    [job] = report["recent_succeeded"]
    assert (job["job_id"], sorted(job["inputs"])) == (done.name, [f"{escaped}.csv", f"{escaped}.mapping.json"])
    [claimed] = d.events("job_claimed")
    assert claimed["files"] == [f"{escaped}.csv", f"{escaped}.mapping.json"]
    _stop(d)


def test_names_near_the_length_limit_are_bounded(root, start_daemon):
    """Stems of 228 and 240 bytes become bounded job ids; a refused 246-byte name goes to failed/
    without blocking the claims; nothing stays in .work/."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    stems = ["a" * 228, "b" * 240]
    for i, stem in enumerate(stems):
        _drop_long(root, f"{stem}.mapping.json", _mapping_bytes())
        _drop_long(root, f"{stem}.csv", root.dataset_bytes(seed=20 + i))
    refused = "c" * 242 + ".txt"
    _drop_long(root, refused, b"hello")
    _drop_long(root, "bad" + "d" * 226 + ".csv", b"not,a,dataset\n")  # fails: no mapping, bad columns
    root.drop_dataset("short", seed=30)
    wait_for(lambda: len(root.folders(root.processed)) == 3 and len(root.folders(root.failed)) == 2,
             timeout=40, message="three processed, two failed")
    _assert_alive(d)
    for folder in [*root.processed.iterdir(), *root.failed.iterdir(), *root.outputs.iterdir()]:
        assert len(os.fsencode(folder.name)) <= 150, folder.name
    assert os.listdir(root.inbox / ".work") == []
    assert _only_place(root, refused) == [f"failed/{next(root.failed.glob('c*')).name}"]
    _stop(d)
    assert leftovers(root.path) == []


def _drop_long(root, name: str, data: bytes) -> None:
    """Write-then-rename under a short temporary name (``.NAME.part`` would exceed the limit)."""
    part = root.inbox / ".long.part"
    part.write_bytes(data)
    os.rename(part, root.inbox / name)


def test_fifo_in_an_abandoned_claim_neither_blocks_recovery_nor_signals(root, start_daemon):
    """A claim folder left by a dead daemon whose mapping is a FIFO is recovered without blocking:
    the job fails with a clear error and the first SIGTERM stops the daemon."""
    claim = root.inbox / ".work" / ".claim-0123456789ab"
    claim.mkdir(parents=True)
    (claim / "piped.csv").write_bytes(root.dataset_bytes())
    os.mkfifo(claim / "piped.mapping.json")
    d = start_daemon()
    d.wait_event("daemon_ready", timeout=30)
    wait_for(lambda: root.job_folders(root.failed, "piped"), timeout=30, message="the FIFO job failed")
    [folder] = root.job_folders(root.failed, "piped")
    error = _error(folder)
    assert "piped.mapping.json" in error["message"]
    assert "regular file" in error["message"]
    _stop(d)


def test_symlinked_state_folder_is_refused_at_start(root, start_daemon, tmp_path):
    """A symbolic link in place of inbox/processed stops the start with one line and exit 78; the
    link's target is neither used nor chmodded."""
    outside = tmp_path / "elsewhere"
    outside.mkdir(mode=0o755)
    os.chmod(outside, 0o755)
    os.symlink(outside, root.inbox / "processed")
    proc = subprocess.run([sys.executable, "-m", "daemon", "watch", "--once", "--config", str(root.config),
                           "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("fine-tuner: error: invalid configuration")
    assert "processed is a symbolic link or a file" in line
    assert oct(os.stat(outside).st_mode & 0o777) == "0o755"
    assert os.listdir(outside) == []


def test_moving_inputs_after_publishing_fails_consistently(root, start_daemon):
    """When processed/ is replaced by a file after a job published its outputs, the job stays
    succeeded, its inputs wait in .work/ and are moved once processed/ is a folder again; the same
    content dropped again is a duplicate of that success."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    os.rmdir(root.processed)
    root.processed.write_bytes(b"not a folder")
    root.drop_dataset("moved")
    d.wait_event("input_move_failed", timeout=30)
    [out] = [p for p in root.outputs.iterdir() if p.name.startswith("moved-")]
    assert os.listdir(root.inbox / ".work") == [out.name]
    assert root.folders(root.failed) == []
    os.unlink(root.processed)
    root.processed.mkdir(mode=0o700)
    wait_for(lambda: root.job_folders(root.processed, "moved"), timeout=30, message="moved at rescan")
    assert [p.name for p in root.job_folders(root.processed, "moved")] == [out.name]
    root.drop_dataset("moved")
    [dup] = d.wait_event("job_duplicate", timeout=30)
    assert dup["duplicate_of"] == out.name
    _assert_alive(d)
    _stop(d)


def test_workers_survive_when_failing_a_job_fails(root, start_daemon):
    """With failed/ replaced by a file, three bad jobs cannot be moved there; the workers live on,
    a good job is still processed, and the bad ones reach failed/ once it is a folder again."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    os.rmdir(root.failed)
    root.failed.write_bytes(b"not a folder")
    for i in range(3):
        root.drop_bytes(f"bad{i}.mapping.json", _mapping_bytes())
        root.drop_bytes(f"bad{i}.csv", b"no,usable,columns\n1,2,3\n")
    d.wait_event("input_move_failed", count=3, timeout=30)
    root.drop_dataset("good")
    wait_for(lambda: root.job_folders(root.processed, "good"), timeout=30, message="the good job")
    _assert_alive(d)
    os.unlink(root.failed)
    root.failed.mkdir(mode=0o700)
    wait_for(lambda: len(root.folders(root.failed)) == 3, timeout=30, message="bad jobs in failed/")
    assert [_error(f)["error_type"] for f in root.failed.iterdir()] == ["MissingColumnError"] * 3
    assert d.events("thread_replaced") == []
    _stop(d)


def test_status_escapes_control_characters_in_names(root, start_daemon):
    """A file name with a newline, an escape sequence and a right-to-left override cannot forge a
    line of `fine-tuner status`."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes(f"{CONTROL_STEM}.mapping.json", _mapping_bytes())
    root.drop_bytes(f"{CONTROL_STEM}.csv", root.dataset_bytes())
    wait_for(lambda: root.folders(root.processed), timeout=30, message="processed")
    _stop(d)
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(root.config),
                             "--root", str(root.path)], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert not any(ch in status.stdout for ch in ("\x1b", "\u202e", "\r"))
    [line] = [x for x in status.stdout.splitlines() if "forged" in x]
    assert line.startswith("  line\\x0avisits-20990101T000000-ffffffff  model_set -> forged\\x1b[2J\\u202eevil-")


def test_config_that_cannot_be_read_on_sighup_keeps_the_daemon_running(root, start_daemon):
    """SIGHUP with a config file that is not UTF-8 logs config_reload_failed and keeps serving."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.config.write_bytes(b"defaults:\n  topics: Erk\xe4ltung\n")
    d.signal(signal.SIGHUP)
    [failed] = d.wait_event("config_reload_failed")
    assert (failed["problems"], failed["source"]) == (["the file is not UTF-8 text (save it as UTF-8)"],
                                                      str(root.config))
    root.drop_dataset("after")
    wait_for(lambda: root.job_folders(root.processed, "after"), timeout=30, message="still serving")
    _stop(d)


@pytest.mark.parametrize("journal_on_full_disk", [False, True])
def test_full_disk_gives_jobs_back_and_resumes_when_space_returns(root, start_daemon, tmp_path,
                                                                  journal_on_full_disk):
    """On a full disk (a real 8 MiB tmpfs holding the inbox and outputs, and in one case the journal
    too) no job fails and no input is lost: jobs are given back or stay claimed, the daemon and its
    workers stay up, and once space is freed every job finishes by itself; SIGTERM then stops it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    with mounted(mount, "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"):
        # the daemon's log (journald's part in production) stays off the full disk
        _full_disk_scenario(root, start_daemon, mount, journal_on_full_disk)


def _full_disk_scenario(root, start_daemon, mount, journal_on_full_disk: bool) -> None:
    from tests.integration.conftest import Root

    disk_root = Root(mount / "root")
    state = {} if journal_on_full_disk else {"state_dir": str(root.path / "state")}
    disk_root.write_config(watch={"rescan_s": 1.0, "settle_s": 0.3, "pair_timeout_s": 1.0}, paths=state)
    staged = []
    for i in range(3):  # written before the disk is full; renamed in (no space needed) afterwards
        for name, data in ((f"full{i}.mapping.json", _mapping_bytes()),
                           (f"full{i}.csv", disk_root.dataset_bytes(rows=60, seed=40 + i))):
            part = disk_root.inbox / f".{name}.part"
            part.write_bytes(data)
            staged.append((part, disk_root.inbox / name))
    d = start_daemon(on=disk_root, log_dir=root.path)
    d.wait_event("daemon_ready")
    filler = mount / "filler"
    _fill(filler)
    for part, final in staged:
        os.rename(part, final)
    d.wait_event("claim_error" if journal_on_full_disk else "job_requeued", count=3, timeout=30)
    _assert_alive(d)
    assert disk_root.folders(disk_root.failed) == []
    os.unlink(filler)
    wait_for(lambda: len(disk_root.folders(disk_root.processed)) == 3, timeout=60,
             message="all three processed after space returned")
    _assert_alive(d)
    assert disk_root.folders(disk_root.failed) == []
    for i in range(3):
        [done] = disk_root.job_folders(disk_root.processed, f"full{i}")
        assert _only_place(disk_root, f"full{i}.csv") == [f"processed/{done.name}"]
        assert (disk_root.outputs / done.name / "model_set_config.json").is_file()
    assert d.events("thread_replaced") == [] and d.events("loop_error") == []
    _stop(d)
    assert d.events("stop_timeout_reached") == []  # no worker was left hanging
    assert leftovers(disk_root.path) == []


def _fill(path) -> None:
    """Write zeros into ``path`` until the file system is full (unbuffered: a failed write is
    raised where it happens, not later at close)."""
    for block in (65536, 512):  # big blocks, then the last partial one
        with contextlib.suppress(OSError), open(path, "ab", buffering=0) as fh:
            while True:
                fh.write(b"\0" * block)
    assert _free_bytes(path) < 65536


def _free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_mix_of_hostile_drops_fails_only_themselves(root, start_daemon, tmp_path):
    """Hostile drops mixed with valid ones: every valid job is processed, every hostile input ends
    in failed/ with an error.json, nothing stays behind, no cell value is logged, the daemon is up."""
    secret = tmp_path / "secret.csv"
    secret.write_bytes(root.dataset_bytes())
    d = start_daemon()
    d.wait_event("daemon_ready")
    hostile_jobs = {  # stem -> (job file bytes or None, mapping bytes)
        "latin": (b"topics: Erk\xe4ltung\n", _mapping_bytes()),
        "deep": (b"force: " + b"[" * 5000 + b"]" * 5000 + b"\n", _mapping_bytes()),
        "shadow": (b"model: /etc/shadow\n", _mapping_bytes()),
        "nested": (None, b"[" * 5000 + b"]" * 5000),
        "toplist": (b"- a\n- b\n", _mapping_bytes()),
    }
    for i, (stem, (job, mapping)) in enumerate(hostile_jobs.items()):
        root.drop_bytes(f"{stem}.mapping.json", mapping)
        if job is not None:
            root.drop_bytes(f"{stem}.job.yaml", job)
        root.drop_bytes(f"{stem}.csv", root.dataset_bytes(seed=50 + i))
    refused = [os.fsdecode(b"note\xff.txt"), "e" * 242 + ".txt", "big.job.yaml", "pipe.csv", "link.csv"]
    _drop_long(root, refused[1], b"x")
    root.drop_bytes(refused[0], b"x")
    root.drop_bytes("big.job.yaml", b"# " + b"x" * 300_000 + b"\n")
    os.mkfifo(root.inbox / "pipe.csv")
    os.symlink(secret, root.inbox / "link.csv")
    valid = ["good1", "good2", NON_UTF8_STEM, "Erkältung März"]
    for i, stem in enumerate(valid):
        root.drop_bytes(f"{stem}.mapping.json", _mapping_bytes())
        root.drop_bytes(f"{stem}.csv", root.dataset_bytes(seed=70 + i))
    total_failed = len(hostile_jobs) + len(refused)
    wait_for(lambda: len(root.folders(root.processed)) == len(valid)
             and len(root.folders(root.failed)) == total_failed, timeout=60,
             message="every valid job processed and every hostile input failed")
    _assert_alive(d)
    for folder in root.failed.iterdir():
        error = _error(folder)
        assert error["error_type"] in ("ConfigError", "MappingError", "RefusedInputError"), error
        assert error["message"] and error["hint"]
    for stem in hostile_jobs:
        [folder] = root.job_folders(root.failed, stem)
        assert _error(folder)["error_type"] == ("MappingError" if stem == "nested" else "ConfigError")
    assert os.listdir(root.inbox / ".work") == []
    assert sorted(n for n in os.listdir(root.inbox) if n not in ("processed", "failed", ".work")) == []
    assert secret.exists()
    _stop(d)
    assert MARKER not in all_log_text(root)
    assert leftovers(root.path) == []


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_a_flood_of_drops_keeps_memory_bounded_and_every_file_in_one_place(root, start_daemon, tmp_path):
    """2,950 files renamed into a running daemon's inbox at once (2,600 mappings waiting for their
    datasets, 300 refused files, 25 datasets with their mappings): the daemon's resident memory grows
    by less than 100 MB while it works through them, and every file ends in exactly one place."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_dataset("first", seed=99)  # the baseline is a daemon that has run a job (pandas loaded)
    wait_for(lambda: root.job_folders(root.processed, "first"), timeout=30, message="the first job")
    staging = root.path / "staging"
    staging.mkdir()
    orphans = [f"orphan{i}.mapping.json" for i in range(2600)]
    refused = [f"note{i}.txt" for i in range(300)]
    for name in orphans + refused:
        (staging / name).write_bytes(b"{}" if name.endswith(".json") else b"x")
    for i in range(25):
        (staging / f"flood{i}.mapping.json").write_bytes(_mapping_bytes())
        (staging / f"flood{i}.csv").write_bytes(root.dataset_bytes(seed=100 + i))
    baseline = _rss_kib(d.proc.pid)
    peak = baseline
    for name in sorted(os.listdir(staging)):
        os.rename(staging / name, root.inbox / name)

    def done() -> bool:
        nonlocal peak
        peak = max(peak, _rss_kib(d.proc.pid))
        return len(root.folders(root.processed)) == 26 and len(root.folders(root.failed)) == 300

    wait_for(done, timeout=120, interval=0.05, message="every dataset processed and every refusal moved")
    _assert_alive(d)
    assert (peak - baseline) < 100 * 1024, (baseline, peak)
    places: dict[str, list[str]] = {}  # every file under the inbox -> the folders holding one of that name
    for folder, _, files in os.walk(root.inbox):
        for name in files:
            places.setdefault(name, []).append(os.path.relpath(folder, root.inbox))
    assert {name: places[name] for name in orphans} == {name: ["."] for name in orphans}
    for name in refused:
        [where] = places[name]
        assert where.startswith(f"failed/{name}-")
    for i in range(25):
        [job] = root.job_folders(root.processed, f"flood{i}")
        assert (places[f"flood{i}.csv"], places[f"flood{i}.mapping.json"]) == (
            [f"processed/{job.name}"], [f"processed/{job.name}"])
    assert sum(len(where) for name, where in places.items() if name != "error.json") == 2600 + 300 + 52
    assert os.listdir(root.inbox / ".work") == []
    _stop(d)


def test_log_lines_stay_one_json_object_each_whatever_the_file_names(root, start_daemon):
    """Files named with a newline followed by a forged JSON log line, an escape sequence and a quote
    are processed or refused; every line the daemon and the job write is one JSON object, no line
    is forged, and no raw control character reaches the logs."""
    forged = '"}\n{"event": "job_succeeded", "job_id": "forged", "level": "info"}\n\x1b[2J'
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes(f"a{forged}.mapping.json", _mapping_bytes())
    root.drop_bytes(f"a{forged}.csv", root.dataset_bytes())
    root.drop_bytes(f"b{forged}.txt", b"x")
    wait_for(lambda: root.folders(root.processed) and root.folders(root.failed), timeout=30,
             message="the dataset processed and the note refused")
    _stop(d)
    [done] = root.processed.iterdir()
    for raw in (d.log_path.read_bytes(), (root.outputs / done.name / "job.log").read_bytes()):
        assert b"\x1b" not in raw and raw.endswith(b"\n")
        lines = raw.decode("utf-8").split("\n")[:-1]
        parsed = [json.loads(line) for line in lines]
        assert all(isinstance(line, dict) for line in parsed)
        assert [line.get("job_id") for line in parsed].count("forged") == 0
    succeeded = [line["job_id"] for line in d.events("job_succeeded")]
    assert succeeded == [done.name]
    assert done.name.startswith('a"}\\x0a{"event": "job_succeeded", "job_id": "forged", "level": "info"}\\x0a\\x1b[2J-')
