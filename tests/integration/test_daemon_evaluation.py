"""A job's evaluation as the analyst follows it: the time it will take, estimated up front from a
measurement; its progress in `status` and job.log; the comparisons a job asks for; and the
record ids in predictions.csv."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys

from daemon.data.synthetic import MAPPING
from tests.conftest import wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text
from tests.integration.test_daemon_rating import Scripted, raw_export

PROGRESS_LINE = re.compile(r"    evaluation \(new\) \d+ % \(record \d+ of 20\), \d+\.\d records/s, about \d+ s left")


def _events(path, name: str | None) -> list[dict]:
    """The JSON lines of a log (those of event ``name``; None: all)."""
    return [e for e in map(json.loads, path.read_text().splitlines()) if name is None or e.get("event") == name]


def _status(root) -> str:
    res = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(root.config),
                          "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_evaluation_is_estimated_followed_in_status_and_shrunk_by_compare(root, start_daemon, fake_ollama):
    """A model set's evaluation logs its estimate (rows, models, seconds measured on the first
    answers), shows percent, records/s and the time left in `status` while it runs, and logs the
    same in job.log; predictions.csv starts with the records' C_BioSense_ID; a job file with
    `compare: none` measures the new model and the baseline only, and status says so."""
    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "auto",
                                                                "retries": 0, "parallel": 1})
    fake_ollama.chat_responder = Scripted(delay_s=0.3)
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("slow.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("slow.csv", raw_export(200, seed=3))
    [line] = wait_for(lambda: [x for x in _status(root).splitlines() if PROGRESS_LINE.fullmatch(x)],
                      timeout=120, interval=0.2, message="evaluation progress in status")
    [done] = wait_for(lambda: root.job_folders(root.processed, "slow"), timeout=120, message="slow job done")
    log = root.outputs / done.name / "job.log"
    [estimate] = _events(log, "evaluation_estimated")  # the root's first evaluation: measured only
    assert (estimate["rows"], estimate["models"], estimate["measured_records"], estimate["backend"],
            estimate["basis"]) == (20, 2, 1, "ollama", "this evaluation's first answers")
    assert estimate["seconds"] > 0 and estimate["records_per_s"] > 0
    last = {e["model"]: e for e in _events(log, "evaluation_progress")}
    assert {k: (e["done"], e["total"], e["percent"], e["eta_s"]) for k, e in last.items()} == {
        "new": (20, 20, 100.0, 0.0), "base": (20, 20, 100.0, 0.0)}
    assert last["new"]["evaluation_eta_s"] > 0 and last["base"]["evaluation_eta_s"] == 0.0
    assert all(e["records_per_s"] > 0 for e in last.values())
    with open(root.outputs / done.name / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:3] == ["C_BioSense_ID", "row", "expert_rating"]
    assert [r["C_BioSense_ID"] for r in rows] == [f"B3-{r['row']}" for r in rows]

    fake_ollama.chat_responder = Scripted()
    root.drop_bytes("lean.job.yaml", b"compare: none\n")
    root.drop_bytes("lean.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("lean.csv", raw_export(200, seed=4))
    [lean] = wait_for(lambda: root.job_folders(root.processed, "lean"), timeout=120, message="lean job done")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    lean_log = root.outputs / lean.name / "job.log"
    [started] = _events(lean_log, "evaluation_started")
    assert (started["models"], started["compare"]) == (["new"], "none")
    # the next evaluation on this root estimates before its first question, at the rate measured before
    events = [e["event"] for e in _events(lean_log, None)]
    first = _events(lean_log, "evaluation_estimated")[0]
    assert events.index("evaluation_estimated") < events.index("evaluation_progress")
    assert (first["basis"], first["measured_records"], first["rows"], first["models"]) == (
        "earlier evaluations", 0, 20, 1)
    rates = json.loads((root.path / ".fine-tuner" / "evaluation_rates.json").read_text())
    assert list(rates) == ["ollama:llama3.2:1b"] and rates["ollama:llama3.2:1b"] > 0
    report = json.loads((root.outputs / lean.name / "evaluation.json").read_text())
    assert ([m["key"] for m in report["models"]], report["compare"]) == (["new", "baseline"], "none")
    [brief] = [x for x in _status(root).splitlines() if x.startswith(f"  {lean.name}")]
    assert re.search(r"kappa 1\.00 \(base not compared, bag-of-words \d\.\d\d, random split\)$", brief), brief
    assert MARKER not in all_log_text(root)
