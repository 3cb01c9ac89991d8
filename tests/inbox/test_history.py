"""``fine-tuner report``: real jobs (built, evaluated through the fake Ollama, recorded in a real
journal) side by side over time, as rows, text, CSV, JSON and HTML, filtered and escaped."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.text import printable
from daemon.errors import JournalError
from daemon.inbox import history
from daemon.inbox.journal import InputFile, Journal
from tests.inbox.history_jobs import JOBS, PlannedJob, build_history

ROOT = Path(__file__).resolve().parents[2]
EVALUATED = [j for j in JOBS if j.evaluated]
HOSTILE_ID = "<img src=x onerror=alert(1)>\x1b[2J\u202e-20260101T000000-deadbeef"
HOSTILE_TOPIC = '=1+2 <script>alert("t")</script>'


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Five real jobs over five months: three on respiratory infections with more rated rows each
    time, one on injuries (a random split), one on sepsis that could not be evaluated."""
    path = tmp_path_factory.mktemp("history")
    build_history(path)
    return path


def cfg_for(root: Path):
    return load_config(None, {}, {"paths": {"root": str(root)}})


def files_of(root: Path, job: PlannedJob) -> tuple[dict, dict]:
    folder = root / "outputs" / job.job_id
    return (json.loads((folder / "fine_tuning_metadata.json").read_text()),
            json.loads((folder / "evaluation.json").read_text()))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_one_row_per_job_and_model_in_finish_order(root):
    """Each evaluated job gives a row for its new model, one for the bag-of-words baseline and one for
    the base model, oldest job first; the job that was not evaluated gives one row."""
    rows = history.report_rows(cfg_for(root))
    expected = []
    for job in JOBS:
        expected += ([(job.job_id, "new"), (job.job_id, "baseline"), (job.job_id, "base")] if job.evaluated
                     else [(job.job_id, None)])
    assert [(r["job_id"], r["model"]) for r in rows] == expected
    assert [list(r) for r in rows] == [list(history.COLUMNS)] * len(rows)


def test_a_row_holds_the_figures_of_the_jobs_files(root):
    """The new model's row of a grouped-split job holds its metadata's topic, base model and rows,
    and its evaluation.json's kappa, interval, new-kinds kappa, F1, invalid rate and verdict."""
    job = JOBS[1]
    meta, report = files_of(root, job)
    new = report["models"][0]
    [kinds] = [m for m in report["figures"]["new_kinds"]["models"] if m["key"] == "new"]
    [row] = [r for r in history.report_rows(cfg_for(root)) if r["job_id"] == job.job_id and r["model"] == "new"]
    assert row == {
        "job_id": job.job_id, "finished_at": job.finished_at, "topic": "respiratory infections",
        "approach": "model_set", "base_model": "llama3.2:1b", "rows": 240, "train_rows": meta["split"]["train_rows"],
        "held_out": report["n"], "model": "new", "model_name": new["model"], "kappa": new["kappa"],
        "kappa_ci_low": new["kappa_ci95"][0], "kappa_ci_high": new["kappa_ci95"][1],
        "kappa_new_kinds": kinds["kappa"], "accuracy": new["accuracy"], "macro_f1": new["macro_f1"],
        "invalid_rate": new["invalid_rate"], "recommended": report["verdict"]["recommended"],
        "verdict": report["verdict"]["headline"], "note": None, "output_path": str(root / "outputs" / job.job_id)}
    assert (new["key"], meta["rows"]["used"], row["recommended"]) == ("new", 240, True)


def test_the_verdict_is_on_the_new_models_row_only_and_a_random_split_has_no_new_kinds(root):
    """The base model's and the baseline's rows carry no verdict; a job with a random split has no
    new-kinds kappa."""
    rows = history.report_rows(cfg_for(root))
    others = [r for r in rows if r["model"] in ("base", "baseline")]
    assert {(r["recommended"], r["verdict"]) for r in others} == {(None, None)}
    injuries = [r["kappa_new_kinds"] for r in rows if r["topic"] == "Injuries"]
    assert injuries == [None, None, None]


def test_a_job_not_evaluated_has_empty_figures_and_the_reason(root):
    """The sepsis job (Ollama unreachable) is one row without figures, its note the recorded reason."""
    job = JOBS[4]
    meta = json.loads((root / "outputs" / job.job_id / "fine_tuning_metadata.json").read_text())
    [row] = [r for r in history.report_rows(cfg_for(root)) if r["job_id"] == job.job_id]
    figures = ("model", "model_name", "kappa", "kappa_ci_low", "kappa_ci_high", "kappa_new_kinds", "accuracy",
               "macro_f1", "invalid_rate", "recommended", "verdict", "held_out")
    assert {k: row[k] for k in figures} == dict.fromkeys(figures)
    assert row["note"] == f"not evaluated (skipped): {meta['evaluation']['reason']}"
    assert (row["topic"], row["rows"]) == ("sepsis", 60)


def test_topic_and_since_filter_the_jobs(root):
    """--topic keeps the jobs of that topic whatever the case and spacing; --since the jobs finished
    at or after a date; both together; nothing matching gives empty reports."""
    cfg = cfg_for(root)

    def ids(**kw) -> list[str]:
        return list(dict.fromkeys(r["job_id"] for r in history.report_rows(cfg, **kw)))
    respiratory = [j.job_id for j in JOBS if j.topic == "respiratory infections"]
    assert ids(topic="  Respiratory   INFECTIONS ") == respiratory
    assert ids(since="2026-04-10") == [j.job_id for j in JOBS[2:]]
    assert ids(since="2026-04-10T09:00:01+00:00") == [j.job_id for j in JOBS[3:]]
    assert ids(topic="respiratory infections", since="2026-02-01") == respiratory[1:]
    assert ids(topic="respiratory") == []
    assert (history.render([], "text"), history.render([], "csv"), history.render([], "json")) == (
        "no finished jobs to report\n", ",".join(history.COLUMNS) + "\n", "[]\n")


def test_csv_and_json_hold_the_rows(root):
    """JSON is the list of rows; CSV has the columns as header and each row with numbers as
    measured, true/false and empty cells for none."""
    rows = history.report_rows(cfg_for(root))
    assert json.loads(history.render(rows, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(history.render(rows, "csv"))))
    meta, report = files_of(root, JOBS[3])
    new = report["models"][0]
    [kinds] = [m for m in report["figures"]["new_kinds"]["models"] if m["key"] == "new"]
    assert parsed[9] == {
        "job_id": JOBS[3].job_id, "finished_at": JOBS[3].finished_at, "topic": "respiratory infections",
        "approach": "model_set", "base_model": "llama3.2:1b", "rows": "360",
        "train_rows": str(meta["split"]["train_rows"]), "held_out": str(report["n"]), "model": "new",
        "model_name": new["model"], "kappa": str(new["kappa"]), "kappa_ci_low": str(new["kappa_ci95"][0]),
        "kappa_ci_high": str(new["kappa_ci95"][1]), "kappa_new_kinds": str(kinds["kappa"]),
        "accuracy": str(new["accuracy"]), "macro_f1": str(new["macro_f1"]), "invalid_rate": str(new["invalid_rate"]),
        "recommended": "true", "verdict": report["verdict"]["headline"], "note": "",
        "output_path": str(root / "outputs" / JOBS[3].job_id)}
    assert [r["job_id"] for r in parsed] == [r["job_id"] for r in rows]


def test_text_table_shows_each_job_once_with_its_verdict(root):
    """The text table: a header, a job's own cells on its first row only, the kappa with its
    interval, and the verdict (or the reason) under the job."""
    rows = history.report_rows(cfg_for(root))
    lines = history.render(rows, "text").splitlines()
    assert lines[0].split() == ["finished", "job", "topic", "approach", "base", "model", "rows", "model", "kappa",
                                "95%", "CI", "new", "kinds", "macro-F1", "invalid"]
    new, measured, base = rows[9], rows[10], rows[11]
    assert lines[13].split() == ["2026-05-18", "09:00", JOBS[3].job_id, "respiratory", "infections", "model_set",
                                "llama3.2:1b", "360", "new", f"{new['kappa']:.2f}",
                                f"{new['kappa_ci_low']:.2f}..{new['kappa_ci_high']:.2f}",
                                f"{new['kappa_new_kinds']:.2f}", f"{new['macro_f1']:.2f}", "0%"]
    assert lines[14].split() == ["baseline", f"{measured['kappa']:.2f}",
                                 f"{measured['kappa_ci_low']:.2f}..{measured['kappa_ci_high']:.2f}",
                                 f"{measured['kappa_new_kinds']:.2f}", f"{measured['macro_f1']:.2f}", "0%"]
    assert lines[15].split() == ["base", f"{base['kappa']:.2f}",
                                 f"{base['kappa_ci_low']:.2f}..{base['kappa_ci_high']:.2f}",
                                 f"{base['kappa_new_kinds']:.2f}", f"{base['macro_f1']:.2f}", "0%"]
    assert lines[16] == f"    {new['verdict']}"
    assert lines[-1] == f"    {rows[-1]['note']}"
    assert len(lines) == 1 + 4 * 4 + 2


def test_html_page_has_a_chart_per_topic_the_table_and_every_confusion_matrix(root):
    """The page: one SVG chart per topic with an evaluated new model, a table row per row, a
    verdict row per job, and each evaluated job's confusion_matrix.png inline, byte for byte."""
    rows = history.report_rows(cfg_for(root))
    page = history.render(rows, "html")
    assert page.count("<svg ") == 2
    assert re.findall(r"<figure><figcaption>([^<]*)</figcaption>\n<svg", page) == ["respiratory infections", "Injuries"]
    assert page.count('<tr class="first"') + page.count('<tr class="more"') == len(rows)
    assert page.count('<tr class="verdict">') == 5
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(i) for i in images] == [
        (root / "outputs" / j.job_id / "confusion_matrix.png").read_bytes() for j in EVALUATED]
    assert f'content="{history.CSP}"'.replace("'", "&#x27;") in page
    assert "<script" not in page


def test_hostile_job_id_and_topic_are_escaped_everywhere(tmp_path):
    """A job id and a topic holding markup, a terminal escape, a direction override and a
    spreadsheet formula: HTML-escaped (and shown as escapes) on the page, escaped in the text and
    in the CSV (no terminal escape in the file), the formula quoted in its CSV cell."""
    build_history(tmp_path, (PlannedJob(HOSTILE_ID, HOSTILE_TOPIC, 60, 0.0, "2026-01-01T00:00:00.000+00:00",
                                        evaluated=False),))
    rows = history.report_rows(cfg_for(tmp_path))
    assert [(r["job_id"], r["topic"]) for r in rows] == [(HOSTILE_ID, HOSTILE_TOPIC)]
    page = history.render(rows, "html")
    assert ("<img src=x" in page, "<script>" in page, "\x1b" in page, "\u202e" in page) == (False, False, False, False)
    assert page.count("&lt;img src=x onerror=alert(1)&gt;\\x1b[2J\\u202e-20260101T000000-deadbeef") == 2
    assert page.count("=1+2 &lt;script&gt;alert(&quot;t&quot;)&lt;/script&gt;") == 1
    text = history.render(rows, "text")
    assert ("\x1b" in text, "\u202e" in text, printable(HOSTILE_ID) in text) == (False, False, True)
    [row] = list(csv.DictReader(io.StringIO(history.render(rows, "csv"))))
    assert (row["job_id"], row["topic"]) == (printable(HOSTILE_ID), "'" + HOSTILE_TOPIC)
    assert ("\x1b" in history.render(rows, "csv"), "\u202e" in history.render(rows, "csv")) == (False, False)


def test_rating_jobs_are_left_out_and_a_missing_folder_is_a_reason(tmp_path):
    """A rating job is not a model and is not listed; a job whose output folder is gone is listed
    with the reason."""
    state = tmp_path / ".fine-tuner"
    state.mkdir()
    with Journal(state / "journal.sqlite3") as journal:
        for job_id, approach in (("rated-20260101T000000-00000001", "rate"),
                                 ("gone-20260101T000000-00000002", "model_set")):
            journal.add_job(job_id, "x", [InputFile("dataset", "x.csv", "0" * 64, 1)], job_id)
            journal.start(job_id)
            journal.succeed(job_id, output_path=str(tmp_path / "outputs" / job_id), approach=approach)
    [row] = history.report_rows(cfg_for(tmp_path))
    assert (row["job_id"], row["approach"], row["note"]) == (
        "gone-20260101T000000-00000002", "model_set", "its output folder has no readable fine_tuning_metadata.json "
        f"(moved or removed?): {tmp_path / 'outputs' / 'gone-20260101T000000-00000002'}")


def test_without_a_journal_the_report_says_where_it_looked_and_creates_nothing(tmp_path):
    """No journal: a JournalError naming the path, and no state folder is made."""
    with pytest.raises(JournalError) as err:
        history.report_rows(cfg_for(tmp_path))
    assert str(err.value).startswith(f"there is no job journal at {tmp_path / '.fine-tuner' / 'journal.sqlite3'}")
    assert list(tmp_path.iterdir()) == []


def test_command_writes_each_format_to_a_file_or_stdout(root, tmp_path):
    """`fine-tuner report --format F --output FILE` writes exactly the rendered report (no temporary
    file left), and without --output prints it; the default is the text table."""
    rows = history.report_rows(cfg_for(root))
    for fmt in ("csv", "json", "html"):
        out = tmp_path / f"report.{fmt}"
        res = run_cli("report", "--root", str(root), "--format", fmt, "--output", str(out), cwd=tmp_path)
        assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
        written = out.read_text(encoding="utf-8")
        if fmt == "html":  # the page says when it was made
            written = re.sub(r"generated [^<]+</p>", "generated X</p>", written)
            assert written == history.html_page(rows, generated_at="X")
        else:
            assert written == history.render(rows, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.html", "report.json"]
    res = run_cli("report", "--root", str(root), "--topic", "injuries", cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, history.render(rows[6:9], "text"), "")
