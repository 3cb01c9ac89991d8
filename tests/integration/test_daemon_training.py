"""Fine-tuning through the daemon: the training lane, status while waiting, give-back on SIGTERM, restart.

A real LoRA run of the tiny Llama (``tests/tiny_model.py``) on the CPU, registered in the fake Ollama.
The first daemon's trainer children hang (``FT_TRAINER_TEST_HOOK=hang``, set only in that daemon's
environment), so the test controls when training is in progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from daemon.inbox.journal import Journal
from tests.conftest import leftovers, machine_paths_in, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

FT_JOB = b"approach: fine_tune\nmodel: tiny-llama\nepochs: 1\nlearning_rate: 0.002\nbatch_size: 4\n"


def _status(root, *flags: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "daemon", "status", *flags, "--config", str(root.config),
                           "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_fine_tunes_run_in_their_lane_are_given_back_on_sigterm_and_finish_after_restart(
        root, start_daemon, fake_ollama, tiny_model_dir):
    """Two fine-tune drops: one trains, one waits (status shows it) while a model-set drop still
    succeeds; SIGTERM gives both back (exit 0, inputs in .work/, journal queued, attempt not counted);
    a restart trains both into outputs/<job_id>/adapter with progress lines bound to the job id."""
    fake_ollama.add_model("tiny-llama:latest", architecture="llama")
    root.write_config(ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      base_models={"tiny-llama:latest": str(tiny_model_dir)},
                      training={"sequence_len": 512, "device": "cpu", "grace_s": 2.0})
    d = start_daemon(env={"FT_TRAINER_TEST_HOOK": "hang"})
    d.wait_event("daemon_ready")
    for i, stem in enumerate(("ft1", "ft2")):
        root.drop_bytes(f"{stem}.job.yaml", FT_JOB)
        root.drop_dataset(stem, rows=60, seed=300 + i)
    d.wait_event("job_waiting_for_training", count=2, timeout=30)
    d.wait_event("training_started", timeout=30)
    [trained_first] = {x["job_id"] for x in d.events("training_started")}

    root.drop_dataset("quick", seed=400)  # the pool is not blocked by training
    wait_for(lambda: root.job_folders(root.processed, "quick"), timeout=20, message="model set while training")
    report = json.loads(_status(root, "--json"))
    assert [(j["job_id"], j["approach"]) for j in report["running"]] == [(trained_first, "fine_tune")]
    [waiting] = report["queued"]
    assert (waiting["waiting_for"], waiting["attempts"]) == ("training", 1)
    text = _status(root).splitlines()
    assert f"  {waiting['job_id']}  waiting for training" in text
    assert f"  {trained_first}  fine_tune" in text
    job_ids = sorted([trained_first, waiting["job_id"]])

    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    assert sorted(os.listdir(root.inbox / ".work")) == job_ids
    for job_id in job_ids:
        stem = job_id.split("-")[0]
        assert sorted(os.listdir(root.inbox / ".work" / job_id)) == [
            f"{stem}.csv", f"{stem}.job.yaml", f"{stem}.mapping.json"]
        assert not (root.outputs / job_id).exists()
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert [(journal.get(j).state, journal.get(j).attempts) for j in job_ids] == [("queued", 0)] * 2
    assert sorted(x["job_id"] for x in d.events("job_requeued")) == job_ids
    assert sorted((x["job_id"], x["status"]) for x in d.events("job_finished")
                  if x["job_id"] in job_ids) == [(j, "queued") for j in job_ids]
    assert d.events("training_interrupted")[0]["job_id"] == trained_first

    again = start_daemon(log_name="daemon-restart.log")
    wait_for(lambda: len(root.folders(root.processed)) == 3, timeout=180, message="both fine-tunes done")
    again.signal(signal.SIGTERM)
    assert again.wait_exit(timeout=30) == 0
    assert sorted((x["job_id"], x["status"]) for x in again.events("job_finished")) == [
        (j, "succeeded") for j in job_ids]
    progress = again.events("training_progress")
    assert {x["job_id"] for x in progress} == set(job_ids)
    for job_id in job_ids:
        out = root.outputs / job_id
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "training_log.jsonl",
                     "training_data.jsonl", "Modelfile", "fine_tuning_metadata.json", "job.log"):
            assert (out / name).is_file(), (job_id, name)
        meta = json.loads((out / "fine_tuning_metadata.json").read_text())
        assert (meta["approach"], meta["registration"]["registered"]) == ("fine_tune", True)
        assert fake_ollama.get_model(meta["fine_tune"]["model_name"]) is not None
        events = [json.loads(line) for line in (out / "job.log").read_text().splitlines()]
        assert {x["job_id"] for x in events} == {job_id}
        names = [x["event"] for x in events]
        # job.log spans both phases: planned on the pool, trained in the lane, which read the files
        # again (a queued plan drops its rows) and ends with the outcome
        assert {"job_started", "approach_selected", "training_lane_started", "dataset_reloaded",
                "training_progress", "adapter_registered", "dataset_processed"} <= set(names)
        assert names.index("training_lane_started") < names.index("dataset_reloaded") < names.index("training_progress")
        assert names[-1] == "job_succeeded"
        assert (root.processed / job_id).is_dir()
        # the folder is meant to be handed on: no file in it names a folder of this machine
        assert machine_paths_in(out, root.path, tiny_model_dir) == []
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert [(journal.get(j).state, journal.get(j).attempts) for j in job_ids] == [("succeeded", 1)] * 2
    assert os.listdir(root.inbox / ".work") == []
    assert leftovers(root.path) == []
    assert MARKER not in all_log_text(root)


def test_a_crashing_trainer_fails_the_job_and_keeps_its_stderr_log(root, start_daemon, tiny_model_dir, tmp_path):
    """Weights that pass the capability checks but cannot be loaded: with fallback off the job fails
    with TrainingFailedError, and the trainer's stderr log is kept beside error.json in failed/."""
    import shutil

    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    root.write_config(ollama={"register": "off"}, base_models={"tiny-llama:latest": str(broken)},
                      training={"sequence_len": 512, "device": "cpu"})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("crash.job.yaml", FT_JOB + b"fallback: false\n")
    root.drop_dataset("crash", rows=60)
    [folder] = wait_for(lambda: root.job_folders(root.failed, "crash"), timeout=120, message="failed")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    error = json.loads((folder / "error.json").read_text())
    assert (error["error_type"], error["stderr_path"]) == ("TrainingFailedError", "trainer_stderr.log")
    assert error["exit_code"] != 0
    assert (folder / "trainer_stderr.log").stat().st_size > 0
    assert error["message"].endswith(f"see {folder / 'trainer_stderr.log'}")  # where it is, not the build
    [failed_line] = d.events("job_failed")
    assert failed_line["message"] == error["message"]
    assert not root.job_folders(root.outputs, "crash")
    assert leftovers(root.path) == []
    assert MARKER not in all_log_text(root)


def test_daemons_sharing_a_state_directory_train_one_at_a_time(root, start_daemon, tiny_model_dir):
    """Two daemons on one root (so one state directory): while one trains (its trainer hangs), the
    other's fine-tune waits for the training lock instead of training beside it, and gives its job
    back on SIGTERM. (A state directory serves one root only: see test_daemon_lifecycle.)"""
    root.write_config(ollama={"register": "off"}, base_models={"tiny-llama:latest": str(tiny_model_dir)},
                      training={"sequence_len": 512, "device": "cpu", "grace_s": 2.0})
    a = start_daemon(env={"FT_TRAINER_TEST_HOOK": "hang"})
    a.wait_event("daemon_ready")
    root.drop_bytes("first.job.yaml", FT_JOB)
    root.drop_dataset("first", rows=60)
    a.wait_event("training_started", timeout=60)
    a.signal(signal.SIGSTOP)  # it keeps the training lock and its claim, and takes no more drops
    try:
        b = start_daemon(log_name="daemon-b.log", env={"FT_TRAINER_TEST_HOOK": "hang"})
        b.wait_event("daemon_ready")
        root.drop_bytes("second.job.yaml", FT_JOB)
        root.drop_dataset("second", rows=60)
        b.wait_event("training_lock_wait", timeout=60)
        assert b.events("training_started") == []
        b.signal(signal.SIGTERM)
        assert b.wait_exit(timeout=30) == 0
        assert [x["status"] for x in b.events("job_finished")] == ["queued"]
    finally:
        a.signal(signal.SIGCONT)
    a.signal(signal.SIGTERM)
    assert a.wait_exit(timeout=30) == 0
