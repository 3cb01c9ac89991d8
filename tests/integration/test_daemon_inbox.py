"""The inbox daemon as a real process: drops, pairing, job files, refusals, bad inputs, duplicates."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

from daemon.data.synthetic import MAPPING
from tests import corpus
from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

REQUIRED_EVENTS = {"daemon_started", "file_detected", "job_claimed", "job_started", "approach_selected",
                   "job_succeeded", "input_moved", "job_finished", "daemon_stopped"}


def _stop(daemon) -> None:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_drop_by_rename_is_processed_and_logged(root, start_daemon):
    """A renamed-in dataset+mapping ends in processed/<job_id>/ with a complete outputs/<job_id>/."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_dataset("visits")
    wait_for(lambda: root.job_folders(root.processed, "visits"), timeout=20, message="processed")
    _stop(d)
    [done] = root.job_folders(root.processed, "visits")
    job_id = done.name
    assert sorted(os.listdir(done)) == ["visits.csv", "visits.mapping.json"]
    assert sorted(os.listdir(root.outputs / job_id)) == [
        "Modelfile", "fine_tuning_metadata.json", "job.log", "model_set_config.json"]
    job_lines = [json.loads(x) for x in (root.outputs / job_id / "job.log").read_text().splitlines()]
    assert {x["job_id"] for x in job_lines} == {job_id}
    assert (job_lines[0]["event"], job_lines[-1]["event"]) == ("job_started", "job_succeeded")
    lines = d.lines()
    assert REQUIRED_EVENTS <= {x["event"] for x in lines}
    [finished] = d.events("job_finished")
    assert (finished["job_id"], finished["status"]) == (job_id, "succeeded")
    assert isinstance(finished["duration_s"], float)
    assert [x["job_id"] for x in d.events("job_started")] == [job_id]
    assert MARKER not in all_log_text(root)
    assert leftovers(root.path) == []
    assert root.folders(root.inbox) == [".work", "failed", "processed"]
    assert os.listdir(root.inbox / ".work") == []
    assert oct(os.stat(root.outputs / job_id).st_mode & 0o777) == "0o700"


def test_slow_in_place_write_is_not_taken_half_written(root, start_daemon):
    """A dataset written in place with pauses longer than settle_s is claimed only after close."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    data = root.dataset_bytes(rows=40)
    root.drop_bytes("slow.mapping.json", json.dumps(MAPPING).encode())
    src = root.path / "source.csv"
    src.write_bytes(data)
    writer = textwrap.dedent(f"""
        import time
        data = open({str(src)!r}, "rb").read()
        with open({str(root.inbox / "slow.csv")!r}, "wb") as fh:
            for i in range(4):
                fh.write(data[i * len(data) // 4:(i + 1) * len(data) // 4]); fh.flush()
                time.sleep(0.5)
    """)
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=30)
    wait_for(lambda: root.job_folders(root.processed, "slow"), timeout=20, message="processed")
    _stop(d)
    [done] = root.job_folders(root.processed, "slow")
    assert hashlib.sha256((done / "slow.csv").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert [x["status"] for x in d.events("job_finished")] == ["succeeded"]


def test_a_writer_that_closes_mid_line_and_reopens_makes_one_job(root, start_daemon):
    """A dataset written in place, closed in the middle of a line and reopened after more than
    settle_s, is not taken half written: its unfinished last line holds it back, so the whole file
    becomes one job."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    data = root.dataset_bytes(rows=80)
    cut = data.index(b"\n", len(data) // 2) - 5  # inside a line
    root.drop_bytes("reopen.mapping.json", json.dumps(MAPPING).encode())
    writer = textwrap.dedent(f"""
        import time
        with open({str(root.inbox / "reopen.csv")!r}, "wb") as fh:
            fh.write({data[:cut]!r})
        time.sleep(1.0)
        with open({str(root.inbox / "reopen.csv")!r}, "ab") as fh:
            fh.write({data[cut:]!r})
    """)
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=30)
    wait_for(lambda: root.job_folders(root.processed, "reopen"), timeout=20, message="processed")
    _stop(d)
    [done] = root.job_folders(root.processed, "reopen")
    assert (done / "reopen.csv").read_bytes() == data
    assert [x["status"] for x in d.events("job_finished")] == ["succeeded"]


def test_mapping_after_dataset_and_dataset_after_mapping(root, start_daemon):
    """A mapping arriving within pair_timeout_s joins its dataset; an early mapping waits as an orphan."""
    root.write_config(watch={"pair_timeout_s": 30.0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("late.csv", root.dataset_bytes())
    wait_for(lambda: any(x["file"] == "late.csv" for x in d.events("file_detected")), message="detected")
    root.drop_bytes("late.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("early.mapping.json", json.dumps(MAPPING).encode())
    wait_for(lambda: root.job_folders(root.processed, "late"), timeout=20, message="late processed")
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--config", str(root.config),
                             "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [(o["name"], o["kind"]) for o in report["orphans"]] == [("early.mapping.json", "mapping")]
    assert [j["inputs"] for j in report["recent_succeeded"]] == [["late.csv", "late.mapping.json"]]
    root.drop_bytes("early.csv", root.dataset_bytes(seed=8))
    wait_for(lambda: root.job_folders(root.processed, "early"), timeout=20, message="early processed")
    _stop(d)
    for stem in ("late", "early"):
        [done] = root.job_folders(root.processed, stem)
        assert sorted(os.listdir(done)) == [f"{stem}.csv", f"{stem}.mapping.json"]


def test_job_file_settings_and_a_bad_job_file(root, start_daemon):
    """A job file's settings reach the job; a job file with an unknown key fails the job."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("asthma.job.yaml", b"topics: asthma\noutput_model: asthma-set\n")
    root.drop_dataset("asthma")
    root.drop_bytes("oops.job.yaml", b"topics: asthma\ncolour: blue\n")
    root.drop_dataset("oops", seed=9)
    wait_for(lambda: root.job_folders(root.processed, "asthma") and root.job_folders(root.failed, "oops"),
             timeout=20, message="both jobs done")
    _stop(d)
    [done] = root.job_folders(root.processed, "asthma")
    meta = json.loads((root.outputs / done.name / "fine_tuning_metadata.json").read_text())
    assert (meta["parameters"]["topics"], meta["parameters"]["output_model"]) == ("asthma", "asthma-set")
    [failed] = root.job_folders(root.failed, "oops")
    error = json.loads((failed / "error.json").read_text())
    assert error["error_type"] == "ConfigError"
    assert "colour: unknown key" in error["message"]
    assert (error["job_id"], error["attempts"]) == (failed.name, 1)
    assert sorted(os.listdir(failed)) == ["error.json", "job.log", "oops.csv", "oops.job.yaml", "oops.mapping.json"]
    last = json.loads((failed / "job.log").read_text().splitlines()[-1])
    assert (last["event"], last["job_id"], last["error_type"]) == ("job_failed", failed.name, "ConfigError")
    assert not (root.outputs / failed.name).exists()


def test_job_file_dropped_after_dataset_and_mapping_still_joins(root, start_daemon):
    """A job file arriving within job_wait_s after a complete dataset and mapping is part of the job."""
    root.write_config(watch={"job_wait_s": 2.0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_dataset("late")
    wait_for(lambda: any(x["file"] == "late.csv" for x in d.events("file_detected")), message="detected")
    root.drop_bytes("late.job.yaml", b"output_model: late-set\n")
    [done] = wait_for(lambda: root.job_folders(root.processed, "late"), timeout=20, message="processed")
    _stop(d)
    assert sorted(os.listdir(done)) == ["late.csv", "late.job.yaml", "late.mapping.json"]
    meta = json.loads((root.outputs / done.name / "fine_tuning_metadata.json").read_text())
    assert meta["parameters"]["output_model"] == "late-set"


def test_every_refused_kind_goes_to_failed_while_serving(root, start_daemon):
    """Symlinks, FIFOs, folders, unknown extensions and oversized files are refused; work goes on."""
    root.write_config(watch={"max_input_bytes": 200_000})
    secret = root.path / "outside.csv"
    secret.write_bytes(root.dataset_bytes())
    d = start_daemon()
    d.wait_event("daemon_ready")
    os.symlink(secret, root.inbox / "link.csv")
    os.mkfifo(root.inbox / "pipe.csv")
    (root.inbox / "folder").mkdir()
    root.drop_bytes("notes.txt", b"hello")
    root.drop_bytes("huge.csv", b"x" * 200_001)
    root.drop_dataset("fine")
    expected = {"link.csv": "symlink", "pipe.csv": "not_regular_file", "folder": "directory",
                "notes.txt": "unknown_extension", "huge.csv": "too_large"}
    wait_for(lambda: len(root.folders(root.failed)) == 5 and root.job_folders(root.processed, "fine"),
             timeout=20, message="refusals and the good job")
    _stop(d)
    seen = {}
    for folder in root.failed.iterdir():
        error = json.loads((folder / "error.json").read_text())
        [name] = [n for n in os.listdir(folder) if n != "error.json"]
        seen[name] = error["reason"]
        assert (error["error_type"], error["job_id"]) == ("RefusedInputError", folder.name)
    assert seen == expected
    assert os.path.islink(next(root.failed.glob("link.csv-*")) / "link.csv")
    assert secret.exists()
    assert MARKER not in all_log_text(root)


def test_bad_input_corpus_each_fails_with_its_error_and_the_daemon_keeps_serving(root, start_daemon):
    """Every corpus case ends in failed/<job_id>/ with its error class and fragment, never a cell value;
    a good dataset dropped after the corpus still succeeds."""
    root.write_config(watch={"pair_timeout_s": 0.3})
    cases = corpus.write_bad_inputs(root.path / "corpus")
    d = start_daemon()
    d.wait_event("daemon_ready")
    for case in cases:
        if case.mapping is not None:
            os.rename(case.mapping, root.inbox / case.mapping.name)
        os.rename(case.csv, root.inbox / case.csv.name)
    root.drop_dataset("good")
    stems = [case.csv.stem for case in cases]
    wait_for(lambda: all(root.job_folders(root.failed, stem) for stem in stems)
             and root.job_folders(root.processed, "good"),
             timeout=60, message="every corpus case failed and the good drop processed")
    _stop(d)
    seen = {}
    for case in cases:
        [folder] = root.job_folders(root.failed, case.csv.stem)
        error = json.loads((folder / "error.json").read_text())
        seen[case.name] = error["error_type"]
        # the corpus fragment is from str(exc), which is "message (hint)"
        assert case.fragment in f"{error['message']} ({error['hint']})", (case.name, error["message"])
        assert (error["job_id"], error["attempts"]) == (folder.name, 1)
        assert error["hint"]
        assert not (root.outputs / folder.name).exists()
    assert seen == {case.name: case.error.__name__ for case in cases}
    assert len(seen) == 22
    [good] = d.events("job_succeeded")
    assert good["job_id"].startswith("good-")
    text = all_log_text(root)
    assert corpus.MARKER not in text and MARKER not in text
    assert leftovers(root.path) == []


def test_same_content_twice_is_a_duplicate_unless_forced(root, start_daemon):
    """Dropping the same files again records a duplicate pointing at the first outputs; force redoes it."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_dataset("twice")
    wait_for(lambda: len(root.job_folders(root.processed, "twice")) == 1, timeout=20, message="first")
    first = root.job_folders(root.processed, "twice")[0].name
    root.drop_dataset("twice")
    wait_for(lambda: len(root.job_folders(root.processed, "twice")) == 2, timeout=20, message="second")
    second = next(p for p in root.job_folders(root.processed, "twice") if p.name != first)
    note = json.loads((second / "duplicate.json").read_text())
    assert (note["duplicate_of"], note["outputs"]) == (first, str(root.outputs / first))
    assert not (root.outputs / second.name).exists()
    root.drop_bytes("twice.job.yaml", b"force: true\n")
    root.drop_dataset("twice")
    wait_for(lambda: len(root.job_folders(root.processed, "twice")) == 3, timeout=20, message="forced")
    _stop(d)
    statuses = sorted(x["status"] for x in d.events("job_finished"))
    assert statuses == ["duplicate", "succeeded", "succeeded"]
    assert len(root.job_folders(root.outputs, "twice")) == 2


def test_dataset_warnings_and_a_missing_topic_are_logged_and_shown_in_status(root, start_daemon):
    """A job without a topic whose rows repeat a prompt with different ratings: each warning is a
    dataset_warning log line and is listed under the job in `fine-tuner status`."""
    root.write_config(defaults={"topics": ""})
    d = start_daemon()
    d.wait_event("daemon_ready")
    import csv
    import io

    from daemon.data.synthetic import HEADER, synthetic_rows

    rows = [list(r) for r in synthetic_rows(20, seed=7)]
    other = 0 if int(rows[0][3]) != 0 else 1
    label = next(k for k, v in MAPPING.items() if v == other)
    rows.append([rows[0][0] + "x", rows[0][1], label, str(other), rows[0][4]])  # same prompt, other rating
    buf = io.StringIO()
    csv.writer(buf).writerows([HEADER, *rows])
    root.drop_bytes("warn.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("warn.csv", buf.getvalue().encode())
    wait_for(lambda: root.job_folders(root.processed, "warn"), timeout=30, message="processed")
    _stop(d)
    warnings = [x["warning"] for x in d.events("dataset_warning")]
    assert any(w.startswith("no topic was given") for w in warnings)
    assert len(warnings) >= 2
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(root.config),
                             "--root", str(root.path)], cwd=REPO, capture_output=True, text=True)
    shown = [x.strip().removeprefix("warning: ") for x in status.stdout.splitlines() if x.startswith("    warning: ")]
    assert shown == [*warnings, "dataset has 21 usable rows; at least 50 are recommended for fine-tuning"]


def test_a_dataset_reopened_after_its_claim_is_reported(root, start_daemon):
    """A writer that closes a dataset at a line end and reopens the same name after it was claimed
    makes a second file: dataset_reappeared names the earlier job, so a truncated first job does not
    go unnoticed."""
    root.write_config(watch={"settle_s": 0.3, "pair_timeout_s": 0.3})
    d = start_daemon()
    d.wait_event("daemon_ready")
    data = root.dataset_bytes(rows=80)
    cut = data.index(b"\n", len(data) // 2) + 1  # a whole-line prefix: it looks complete
    root.drop_bytes("again.mapping.json", json.dumps(MAPPING).encode())
    (root.inbox / "again.csv").write_bytes(data[:cut])
    [claimed] = d.wait_event("job_claimed")
    (root.inbox / "again.csv").write_bytes(data[cut:])
    [warned] = d.wait_event("dataset_reappeared")
    _stop(d)
    assert (warned["file"], warned["earlier_job_id"]) == ("again.csv", claimed["job_id"])
    assert warned["level"] == "warning"


def _copied_in_place(root, name: str, data: bytes) -> None:
    """``cp x.csv inbox/`` the way users do it: the file is written under its final name (no rename)."""
    src = root.path / f"source-{name}"
    src.write_bytes(data)
    shutil.copyfile(src, root.inbox / name)
    src.unlink()


def _one_inferred_job(root, daemon, stem: str) -> None:
    """The dataset copied in place without a mapping ended as one job, in processed/ only, with the
    mapping inferred from its Expert Rating column."""
    [done] = wait_for(lambda: root.job_folders(root.processed, stem), timeout=30,
                      message=f"{stem} processed")
    _stop(daemon)
    assert os.listdir(done) == [f"{stem}.csv"]
    assert root.inputs_everywhere() == [f"{stem}.csv"]
    assert [(x["job_id"], x["status"]) for x in daemon.events("job_finished")] == [(done.name, "succeeded")]
    [loaded] = daemon.events("dataset_loaded")
    assert loaded["mapping_source"] == "inferred from 'Expert Rating'"


def test_a_dataset_copied_in_place_without_a_mapping_is_claimed(root, start_daemon):
    """A dataset copied into the inbox in place (no rename) and no mapping is claimed after
    pair_timeout_s: the daemon's own reads of the file do not restart its settle clock."""
    d = start_daemon()
    d.wait_event("daemon_ready")
    _copied_in_place(root, "visits.csv", root.dataset_bytes())
    _one_inferred_job(root, d, "visits")


def test_a_dataset_copied_in_place_before_a_start_is_claimed(root, start_daemon):
    """A dataset copied in place while the daemon was down is found by the start-up scan and
    claimed without a mapping, although the daemon reads it while it waits."""
    _copied_in_place(root, "visits.csv", root.dataset_bytes())
    d = start_daemon()
    _one_inferred_job(root, d, "visits")


def test_a_dataset_copied_in_place_is_claimed_when_the_inbox_is_polled(root, start_daemon):
    """With watch.polling (network file systems, where inotify sees nothing), a file written in
    place is seen as modified but never as closed: it settles by its size and time, and is claimed."""
    root.write_config(watch={"polling": True})
    d = start_daemon()
    d.wait_event("daemon_ready")
    data = root.dataset_bytes()
    with open(root.inbox / "visits.csv", "wb") as fh:  # written in place, in two parts a poll apart
        fh.write(data[: len(data) // 2])
        fh.flush()
        d.wait_event("file_detected")
        fh.write(data[len(data) // 2:])
    _one_inferred_job(root, d, "visits")
