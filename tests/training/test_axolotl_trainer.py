"""The axolotl trainer child under supervision: the service's stop and the death of its parent
end every process of an axolotl run (the child, accelerate launch and axolotl's worker), and
nothing of the run is left in the job folder.

The job folder holds what a fine-tune job writes before training (the JSONL files and
training_config.yaml, built with the product's own functions); axolotl trains the tiny model on
the CPU and is stopped right after its first progress record. ``make test`` installs axolotl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import structlog
import yaml

from daemon.config import TrainingConfig
from daemon.errors import TrainingInterruptedError
from daemon.data.prompts import system_prompt
from daemon.data.synthetic import MAPPING, synthetic_rows
from daemon.training.supervisor import BASE_MODEL_PLACEHOLDER, group_members, resolve_base_weights, run_training
from daemon.data.trainingdata import chat_record, training_config
from tests.conftest import THIRD_PARTY_ENV, wait_for
from tests.tiny_model import TINY_NAME

# its own xdist worker: the hand-off tests (tests/training/test_handoff.py) run axolotl on another
pytestmark = pytest.mark.xdist_group("axolotl-supervision")

TRAINING = TrainingConfig(backend="axolotl", device="cpu", sequence_len=512, grace_s=5.0)


def write_job(job: Path) -> Path:
    """120 synthetic rows as a fine-tune job writes them: 108 to train, 12 held out."""
    job.mkdir(parents=True)
    system = system_prompt("respiratory infections", MAPPING)
    records = [chat_record(system, r[1], int(r[3]), r[4]) for r in synthetic_rows(120, 5)]
    for name, part in (("training_data.jsonl", records[:108]), ("validation_data.jsonl", records[108:])):
        (job / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    config = training_config(base_model=BASE_MODEL_PLACEHOLDER, dataset_path="training_data.jsonl",
                             validation_path="validation_data.jsonl", output_dir="trainer-output",
                             training=TRAINING, epochs=2, learning_rate=1e-2, micro_batch_size=8, seed=42)
    (job / "training_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return job


def _running(spec: Path) -> list[int]:
    """The processes whose command line names ``spec`` (the trainer child)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(spec).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # it ended meanwhile
            continue
    return found


def test_stopping_an_axolotl_run_ends_every_process_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """The stop signal (service shutdown) during axolotl's training: TrainingInterruptedError,
    accelerate and its worker gone with the child, no adapter, spec or work folder left."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = write_job(tmp_path / "job")
    base = resolve_base_weights(TINY_NAME, {TINY_NAME: str(tiny_model_dir)})
    stop, progress, outcome = threading.Event(), [], {}

    def target() -> None:
        try:
            run_training(job, base=base, training=TRAINING, on_progress=progress.append, stop_event=stop)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=target, name="axolotl-run")
        thread.start()
        wait_for(lambda: progress, timeout=180, message="axolotl's first progress record")
        pgid = next(e["pid"] for e in logs if e["event"] == "training_started")
        assert len(group_members(pgid)) >= 3  # this child, accelerate launch, the axolotl worker
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and isinstance(outcome.get("error"), TrainingInterruptedError)
    assert group_members(pgid) == []
    assert [e["event"] for e in logs] == ["training_started", "training_interrupted"]
    for name in ("adapter", ".tmp-adapter", ".trainer-work", "run_spec.json"):
        assert not (job / name).exists(), name


def test_an_axolotl_run_whose_parent_dies_stops_by_itself(tiny_model_dir, tmp_path):
    """kill -9 of the process supervising an axolotl run: the child notices, and no process of
    its group is left training."""
    job = write_job(tmp_path / "job")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from daemon.config import TrainingConfig
        from daemon.training.supervisor import resolve_base_weights, run_training
        base = resolve_base_weights({TINY_NAME!r}, {{{TINY_NAME!r}: {str(tiny_model_dir)!r}}})
        run_training({str(job)!r}, base=base, training=TrainingConfig(backend="axolotl", device="cpu",
                                                                      sequence_len=512, grace_s=5.0))
        """)], cwd=Path.cwd(), env={**os.environ, **THIRD_PARTY_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log_file = job / "training_log.jsonl"
        wait_for(lambda: log_file.exists() and log_file.read_text(), timeout=180,
                 message="axolotl's first progress record")
        [child] = _running(job / "run_spec.json")
        assert len(group_members(child)) >= 3
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: group_members(child) == [], timeout=60, message="the orphaned axolotl run to stop")
    assert not (job / "adapter").exists()
