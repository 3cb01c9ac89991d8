"""The analyst's loop through the daemon and the command line: a model set is built, it rates new
records, the unsure ones go to the experts (needs_review.csv), their ratings come back through
``fine-tuner retrain`` and through the inbox, each time the topic's rows grow (duplicates kept once,
the newest rating winning and the conflict counted), the same reviewed file adds nothing a second
time, and ``report --curve`` shows the topic's agreement over the expert-rated rows."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys

from daemon.data.synthetic import MAPPING
from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text
from tests.integration.test_daemon_rating import Scripted, raw_export

TOPIC = "respiratory infections"
LABEL = {v: k for k, v in MAPPING.items()}


def cli(root, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")}
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(root.config), "--root",
                           str(root.path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def training_sets(root) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(root.path / ".fine-tuner" / "journal.sqlite3")) as db:
        return db.execute("SELECT job_id, topic, rows, reviewed_rows, rows_before, rows_added, duplicates, conflicts,"
                          " unreviewed_skipped, base_job FROM training_sets ORDER BY recorded_at").fetchall()


def training_rows(root, job_id: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(root.path / ".fine-tuner" / "journal.sqlite3")) as db:
        return db.execute("SELECT row_key, rating, reviewed, added_by FROM training_rows WHERE job_id = ?"
                          " ORDER BY rowid", (job_id,)).fetchall()


def rating_input() -> tuple[bytes, str]:
    """30 new records, then the first training record rated 0 ("dx 0") by the experts, again;
    and that record's id."""
    training = list(csv.reader(io.StringIO(raw_export(80, seed=3).decode())))
    again = next(r for r in training[1:] if r[2] == "dx 0")
    buf = io.StringIO()
    csv.writer(buf).writerow(again[:6])
    return raw_export(30, seed=9, ratings=False) + buf.getvalue().encode(), again[0]


def filled(review: list[dict], ratings: dict[str, int]) -> bytes:
    """needs_review.csv with the experts' labels filled in for the records in ``ratings``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(review[0]))
    writer.writeheader()
    for row in review:
        writer.writerow({**row, "Expert Rating": LABEL[ratings[row["C_BioSense_ID"]]]
                         if row["C_BioSense_ID"] in ratings else ""})
    return buf.getvalue().encode()


def test_reviewed_ratings_come_back_through_the_cli_and_the_inbox_and_grow_the_topics_rows(
        root, start_daemon, fake_ollama, tmp_path):
    """A model set of 80 rows rates 31 records; the unsure ones (rated 0 at 70 % confidence) go to
    needs_review.csv. ``fine-tuner retrain`` with 3 new records and a conflicting rating for a
    training record builds a model on 83 rows (80 before, 3 added, 1 duplicate, 1 conflict, the rest
    skipped as not reviewed), with the expert's rating winning; the same file dropped again into the
    inbox builds nothing; a second reviewed file dropped back on its own adds 2 more;
    ``report --curve`` shows the topic's three points, oldest first. No cell value is logged."""
    root.write_config(defaults={"model": "llama3.2:1b", "topics": TOPIC},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0})
    fake_ollama.chat_responder = Scripted()
    fake_ollama.probs_responder = lambda model, messages: (
        {0: 0.7, 1: 0.15, -1: 0.15} if "dx 0" in messages[-1]["content"]
        else {v: (0.99 if f"dx {v}" in messages[-1]["content"] else 0.005) for v in (-1, 0, 1)})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("raw.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("raw.csv", raw_export(80, seed=3))
    [built] = wait_for(lambda: root.job_folders(root.processed, "raw"), timeout=60, message="model set built")
    first = built.name
    assert training_sets(root) == [(first, TOPIC, 80, 0, 0, 80, 0, 0, 0, None)]

    records, again = rating_input()
    root.drop_bytes("new.job.yaml", f"task: rate\nmodel: {first}\nreview_below: 0.9\n".encode())
    root.drop_bytes("new.csv", records)
    [rated] = wait_for(lambda: root.job_folders(root.processed, "new"), timeout=60, message="rated")
    review = list(csv.DictReader((root.outputs / rated.name / "needs_review.csv").open()))
    ids = [r["C_BioSense_ID"] for r in review]
    new_ids = [i for i in ids if i != again]
    assert again in ids and len(new_ids) >= 5
    # three new records rated as the diagnosis says, and the training record given another rating
    reviewed = tmp_path / "needs_review.csv"
    reviewed.write_bytes(filled(review, {new_ids[0]: 0, new_ids[1]: 0, new_ids[2]: 1, again: -1}))

    done = cli(root, "retrain", "--topic", "Respiratory  Infections", str(reviewed), "--wait", "90")
    assert done.returncode == 0, done.stderr
    [second] = [s[0] for s in training_sets(root) if s[0] != first]
    skipped = len(review) - 4
    assert done.stdout.splitlines()[1] == (f"{second}: 83 training rows (80 before, 3 added, 1 duplicates, "
                                           f"1 conflicts, {skipped} not reviewed and skipped)")
    assert training_sets(root)[1] == (second, TOPIC, 83, 4, 80, 3, 1, 1, skipped, first)
    rows = training_rows(root, second)
    assert [(rating, reviewed_, by) for key, rating, reviewed_, by in rows if key == f"id:{_sha(again)}"] == [
        (-1, 1, second)]
    assert sum(1 for r in rows if r[2]) == 4 and len({r[0] for r in rows}) == 83
    meta = json.loads((root.outputs / second / "fine_tuning_metadata.json").read_text())
    assert (meta["approach"], meta["rows"]["used"], meta["retrain"]["conflicts"]) == ("model_set", 83, 1)
    assert meta["evaluation"]["status"] == "done"

    # the same reviewed file again, dropped by hand with a job file of its own: nothing new
    root.drop_bytes("again.job.yaml", b"task: retrain\ntopic: respiratory infections\n")
    root.drop_bytes("again.csv", reviewed.read_bytes())
    [dup] = wait_for(lambda: [p for p in root.job_folders(root.processed, "again") if (p / "duplicate.json").exists()],
                     timeout=60, message="duplicate")
    note = json.loads((dup / "duplicate.json").read_text())
    assert (note["duplicate_of"], note["counts"]["rows_added"], note["counts"]["duplicates"]) == (second, 0, 4)
    assert len(training_sets(root)) == 2

    # two more records reviewed, the file dropped back into the inbox on its own (no job file, no
    # mapping): its review columns make it a retrain of the configured topic
    more = tmp_path / "more.csv"
    more.write_bytes(filled(review, {new_ids[0]: 0, new_ids[1]: 0, new_ids[2]: 1, again: -1,
                                     new_ids[3]: 0, new_ids[4]: 0}))
    root.drop_bytes("more.csv", more.read_bytes())
    [third_folder] = wait_for(lambda: root.job_folders(root.processed, "more"), timeout=60, message="retrained")
    third = third_folder.name
    assert training_sets(root)[2] == (third, TOPIC, 85, 6, 83, 2, 4, 0, skipped - 2, second)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0

    curve = cli(root, "report", "--curve", "--format", "json")
    assert curve.returncode == 0, curve.stderr
    points = json.loads(curve.stdout)
    assert [(p["topic"], p["job_id"], p["rated_rows"], p["reviewed_rows"]) for p in points] == [
        (TOPIC, first, 80, 0), (TOPIC, second, 83, 4), (TOPIC, third, 85, 6)]
    for p in points:
        evaluation = json.loads((root.outputs / p["job_id"] / "evaluation.json").read_text())
        kappas = {m["key"]: m["kappa"] for m in evaluation["models"]}
        assert (p["kappa_familiar"], p["baseline_kappa_familiar"]) == (kappas["new"], kappas["baseline"])
    text = cli(root, "report", "--curve").stdout.splitlines()
    assert text[0] == "Learning curve: agreement with the experts over the expert-rated rows each model learned from"
    assert [line.split()[-8:-6] for line in text[2:]] == [["80", "0"], ["83", "4"], ["85", "6"]]

    store = list((root.path / ".fine-tuner" / "topic_rows").iterdir())
    assert len(store) == 1 and stat.S_IMODE(store[0].stat().st_mode) == 0o600
    assert not (root.path / ".fine-tuner" / "retrain").exists() or not any(
        (root.path / ".fine-tuner" / "retrain").iterdir())
    assert MARKER not in all_log_text(root)
    assert leftovers(root.path) == []


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
