"""Real finished jobs for ``fine-tuner report``: each one planned and built by ``FineTuner`` from a
CSV of generated emergency-department visits, evaluated through the loopback fake Ollama, and
recorded in a real journal (``add_job``, ``start``, ``succeed``) whose finish time is then set to
the day the job stands for, so that the history spans months.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path

from daemon.config import load_config
from daemon.data.jobsettings import job_settings
from daemon.data.dataset import load_dataset
from daemon.data.visits import MAPPING, generate_visits, write_csv
from daemon.fine_tuner import FineTuner, JobInputs
from daemon.inbox.journal import InputFile, Journal
from daemon.inbox.paths import resolve_paths
from tests.fake_ollama import FakeOllama

BASE_MODEL = "llama3.2:1b"
BASE_RIGHT = 0.35  # the share of records the base model rates like the experts


@dataclass(frozen=True)
class PlannedJob:
    job_id: str
    topic: str
    visits: int
    right: float  # the share of records the new model rates like the experts
    finished_at: str
    group_by: str | None = None  # "none": a random split (no new-kinds figure)
    evaluated: bool = True


JOBS = (
    PlannedJob("visits-20260115T090000-0a1b2c3d", "respiratory infections", 120, 0.55, "2026-01-15T09:00:00.000+00:00"),
    PlannedJob("visits-20260316T090000-1b2c3d4e", "respiratory infections", 240, 0.80, "2026-03-16T09:00:00.000+00:00"),
    PlannedJob("injuries-20260410T090000-2c3d4e5f", "Injuries", 120, 0.70, "2026-04-10T09:00:00.000+00:00",
               group_by="none"),
    PlannedJob("visits-20260518T090000-3d4e5f6a", "respiratory infections", 360, 0.95, "2026-05-18T09:00:00.000+00:00"),
    PlannedJob("sepsis-20260601T090000-4e5f6a7b", "sepsis", 60, 0.0, "2026-06-01T09:00:00.000+00:00",
               evaluated=False),
)


class Answers:
    """The fake's chat answers: the new model rates a fixed share of records like the experts, the
    base model a smaller one; which records is decided by a hash of the record, so the answers do
    not depend on the order the concurrent requests arrive in."""

    def __init__(self) -> None:
        self.truth: dict[str, int] = {}
        self.right = 0.0

    def __call__(self, model: str, messages: list) -> str:
        if len(messages) < 2:
            return "no"
        record = messages[-1]["content"]
        expert = self.truth.get(record, 0)
        share = BASE_RIGHT if model == BASE_MODEL else self.right
        right = zlib.crc32(f"{model}|{record}".encode()) % 1000 < share * 1000
        rating = expert if right else (expert + 2) % 3 - 1  # another value of -1, 0, 1
        return json.dumps({"rating": rating, "rationale": "scripted"})


def build_history(root: Path, jobs: tuple[PlannedJob, ...] = JOBS) -> Path:
    """Run ``jobs`` under ``root`` (outputs in ``root/outputs/<job id>``, the journal in
    ``root/.fine-tuner``); returns the journal's path."""
    fake = FakeOllama()
    fake.add_model(BASE_MODEL, architecture="llama", quantization="Q4_K_M", parameter_size="1.2B")
    answers = Answers()
    fake.chat_responder = answers
    fake.start()
    try:
        paths = resolve_paths(load_config(None, {}, {"paths": {"root": str(root)}}))
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        with Journal(paths.journal) as journal:
            for job in jobs:
                answers.right = job.right
                _run(job, root, fake.url if job.evaluated else "http://127.0.0.1:9", answers, journal)
    finally:
        fake.stop()
    with sqlite3.connect(paths.journal) as db:
        db.executemany("UPDATE jobs SET finished_at = ?, updated_at = ? WHERE id = ?",
                       [(j.finished_at, j.finished_at, j.job_id) for j in jobs])
    db.close()
    return paths.journal


def _run(job: PlannedJob, root: Path, host: str, answers: Answers, journal: Journal) -> None:
    """One job as the daemon runs it: claimed (queued), started, built, succeeded."""
    inputs = root / "inputs" / job.job_id
    inputs.mkdir(parents=True)
    csv_path = Path(write_csv(inputs / "visits.csv", generate_visits(job.visits, seed=job.visits)))
    mapping = inputs / "visits.mapping.json"
    mapping.write_text(json.dumps(MAPPING))
    frame = load_dataset(csv_path, mapping=MAPPING, code_knowledge="off").frame
    answers.truth.update(zip(frame["prompt"], frame["rating"].astype(int)))
    cfg = load_config(None, {}, {"paths": {"root": str(root)},
                                 "ollama": {"host": host, "register": "auto" if job.evaluated else "off",
                                            "retries": 0, "connect_timeout_s": 2.0, "read_timeout_s": 5.0}})
    # the scripted answers depend on each record's prompt text (a hash of it): the codes are not
    # explained, so the prompts, and the figures the jobs are planned around, stay as designed
    settings = job_settings(cfg.defaults, {"model": BASE_MODEL, "topics": job.topic, "approach": "model_set",
                                           "group_by": job.group_by, "code_knowledge": "off"}, source="test")
    journal.add_job(job.job_id, "visits", [InputFile("dataset", "visits.csv", "0" * 64, csv_path.stat().st_size)],
                    job.job_id)
    journal.start(job.job_id)
    out = root / "outputs" / job.job_id
    ok, meta = FineTuner(config=cfg).run_job(JobInputs(csv_path=csv_path, mapping_path=mapping, settings=settings,
                                                       output_dir=out, stem="visits", job_id=job.job_id, staged=True))
    assert ok, meta
    journal.succeed(job.job_id, output_path=str(out), approach=meta["approach"])
