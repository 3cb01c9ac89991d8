"""``status``, ``report`` and ``promote`` over output folders that hold something else than the
files the daemon wrote: a FIFO, a link to /dev/zero, an evaluation.json of the wrong shape. Each
command runs as a process with a timeout and must finish at once, saying which file cannot be read,
while the other jobs are listed as usual; ``report --output`` refuses what ``rate --output`` refuses."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.inbox import history
from daemon.inbox.journal import InputFile, Journal
from daemon.inbox.status import status

ROOT = Path(__file__).resolve().parents[2]
FIFO = "a FIFO (named pipe), not a regular file"
LINK = "a symbolic link, not a file"
GOOD_EVALUATION = {"n": 40, "models": [{"key": "new", "model": "m:latest", "kappa": 0.71, "accuracy": 0.8,
                                        "invalid_rate": 0.0},
                                       {"key": "base", "model": "llama3.2:1b", "kappa": 0.2, "accuracy": 0.5,
                                        "invalid_rate": 0.1}],
                   "verdict": {"recommended": True, "headline": "recommended"}}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a process; a read that blocked on a FIFO would run into the timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")} | {
        "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9", "FINE_TUNER_OLLAMA__RETRIES": "0"}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def _succeeded(journal: Journal, root: Path, job_id: str, evaluation: object = None) -> Path:
    """A succeeded model-set job with its metadata and, unless None, this evaluation.json."""
    out = root / "outputs" / job_id
    out.mkdir(parents=True)
    (out / "fine_tuning_metadata.json").write_text(json.dumps({
        "target_topics": ["falls"], "model": "llama3.2:1b", "approach": "model_set", "rows": {"used": 80},
        "registration": {"registered": True, "name": "m:latest"}, "warnings": []}))
    if evaluation is not None:
        (out / "evaluation.json").write_text(json.dumps(evaluation))
    journal.add_job(job_id, job_id, [InputFile("dataset", f"{job_id}.csv", "ab" * 32, 10)], job_id)
    journal.start(job_id)
    journal.succeed(job_id, output_path=str(out), approach="model_set")
    return out


def _root(tmp_path: Path) -> Path:
    """Jobs whose output folders hold a FIFO as evaluation.json, a link to /dev/zero as the
    metadata, and a good job; a failed job whose job.log is a FIFO."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / ".fine-tuner").mkdir()
    with Journal(tmp_path / ".fine-tuner" / "journal.sqlite3") as journal:
        _succeeded(journal, tmp_path, "good", GOOD_EVALUATION)
        os.mkfifo(_succeeded(journal, tmp_path, "fifo") / "evaluation.json")
        zero = _succeeded(journal, tmp_path, "zero", GOOD_EVALUATION) / "fine_tuning_metadata.json"
        zero.unlink()
        zero.symlink_to("/dev/zero")
        journal.add_job("broken", "broken", [], "kb")
        journal.fail("broken", {"error_type": "DatasetError", "message": "no rows", "hint": "add rows"})
    with sqlite3.connect(tmp_path / ".fine-tuner" / "journal.sqlite3") as db:  # each took 2 min 5 s
        db.execute("UPDATE jobs SET started_at = '2026-01-01T00:00:00.000+00:00', "
                   "finished_at = '2026-01-01T00:02:05.000+00:00'")
    db.close()
    (tmp_path / "inbox" / "failed" / "broken").mkdir(parents=True)
    os.mkfifo(tmp_path / "inbox" / "failed" / "broken" / "job.log")
    return tmp_path


def test_status_says_which_file_cannot_be_read_and_lists_the_others(tmp_path):
    """`status` finishes at once over a FIFO evaluation.json and a metadata link to /dev/zero,
    saying so on those jobs' lines, with the good job's kappa as usual."""
    root = _root(tmp_path)
    res = run_cli("status", "--root", str(root), cwd=tmp_path)
    assert (res.returncode, res.stderr) == (0, "")
    lines = res.stdout.splitlines()
    out = root / "outputs"
    assert lines[lines.index("recent successes:") + 1:lines.index("recent failures:")] == [
        f"  zero  model_set -> {out / 'zero'}  kappa 0.71 (base 0.20)",
        "    took 2 min",
        f"    fine_tuning_metadata.json cannot be read: {LINK}",
        "    recommended",
        f"  fifo  model_set -> {out / 'fifo'}  evaluation unreadable",
        "    topic falls; base llama3.2:1b; 80 rows; took 2 min; in Ollama as m:latest",
        f"    evaluation.json cannot be read: {FIFO}",
        f"  good  model_set -> {out / 'good'}  kappa 0.71 (base 0.20)",
        "    topic falls; base llama3.2:1b; 80 rows; took 2 min; in Ollama as m:latest",
        "    recommended"]


def test_status_of_a_job_whose_log_is_a_fifo_says_so(tmp_path):
    """`status JOB_ID` of a failed job whose job.log is a FIFO finishes at once and says the log
    cannot be read; --json has the same reason."""
    root = _root(tmp_path)
    res = run_cli("status", "broken", "--root", str(root), cwd=tmp_path)
    assert (res.returncode, res.stderr) == (0, "")
    assert f"    job.log cannot be read: {FIFO}" in res.stdout.splitlines()
    detail = json.loads(run_cli("status", "broken", "--root", str(root), "--json", cwd=tmp_path).stdout)
    assert (detail["events"], detail["unreadable"]) == ([], [f"job.log cannot be read: {FIFO}"])


def test_report_gives_the_reason_on_each_unreadable_job(tmp_path):
    """`report --format json` finishes at once: the good job's two models, and the reason (with
    the folder) on each job whose file cannot be read (jobs that finished together: by id)."""
    root = _root(tmp_path)
    res = run_cli("report", "--root", str(root), "--format", "json", cwd=tmp_path)
    assert (res.returncode, res.stderr) == (0, "")
    rows = json.loads(res.stdout)
    out = root / "outputs"
    assert [(r["job_id"], r["model"], r["kappa"], r["note"]) for r in rows] == [
        ("fifo", None, None, f"evaluation.json cannot be read: {FIFO} (in {out / 'fifo'})"),
        ("good", "new", 0.71, None), ("good", "base", 0.2, None),
        ("zero", None, None, f"fine_tuning_metadata.json cannot be read: {LINK} (in {out / 'zero'})")]


def test_promote_refuses_a_job_whose_files_cannot_be_read(tmp_path):
    """`promote` finishes at once: an unreadable metadata file is refused; an unreadable
    evaluation.json is refused unless --force; nothing is recorded as current until then."""
    root = _root(tmp_path)
    res = run_cli("promote", "zero", "--root", str(root), cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (
        1, "", f"fine-tuner: error: job zero's fine_tuning_metadata.json cannot be read: {LINK} "
               "(put the job's own file back)\n")
    res = run_cli("promote", "fifo", "--root", str(root), cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (
        1, "", f"fine-tuner: error: job fifo's evaluation.json cannot be read: {FIFO} "
               "(put the job's own file back, or promote it anyway with --force)\n")
    assert status(load_config(None, {}, {"paths": {"root": str(root)}}))["current_models"] == {}
    res = run_cli("promote", "fifo", "--root", str(root), "--force", cwd=tmp_path)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines()[0] == "current model for 'falls': job fifo, m:latest"


def test_an_evaluation_json_of_the_wrong_shape_is_unreadable_for_its_job_only(tmp_path):
    """A kappa that is a text, models that are texts, a verdict that is a list: status and report
    say which key is wrong on that job and list the good job as usual."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / ".fine-tuner").mkdir()
    with Journal(tmp_path / ".fine-tuner" / "journal.sqlite3") as journal:
        _succeeded(journal, tmp_path, "good", GOOD_EVALUATION)
        _succeeded(journal, tmp_path, "text", {"models": [{"key": "new", "kappa": "0.9"}]})
        _succeeded(journal, tmp_path, "names", {"models": ["new", "base"]})
        _succeeded(journal, tmp_path, "verdict", {**GOOD_EVALUATION, "verdict": ["recommended"]})
        _succeeded(journal, tmp_path, "list", [1, 2])
    cfg = load_config(None, {}, {"paths": {"root": str(tmp_path)}})
    expected = {"list": "evaluation.json cannot be read: it holds a list, not an object",
                "verdict": "evaluation.json cannot be read: verdict must be an object, not a list",
                "names": "evaluation.json cannot be read: models[0] must be an object, not a text",
                "text": "evaluation.json cannot be read: models[0].kappa must be a number, not a text"}
    jobs = status(cfg)["recent_succeeded"]
    assert {j["job_id"]: j["evaluation"] for j in jobs} == {
        **{job: {"status": "unreadable", "reason": why} for job, why in expected.items()},
        "good": {"new": {"kappa": 0.71, "accuracy": 0.8, "invalid_rate": 0.0},
                 "base": {"kappa": 0.2, "accuracy": 0.5, "invalid_rate": 0.1},
                 "recommended": True, "verdict": "recommended"}}
    res = run_cli("status", "--root", str(tmp_path), cwd=tmp_path)
    assert (res.returncode, res.stderr) == (0, "")
    assert sorted(line.strip() for line in res.stdout.splitlines() if "cannot be read" in line) == sorted(
        expected.values())
    rows = history.report_rows(cfg)  # jobs finished in the same millisecond: in any order
    assert sorted((r["job_id"], r["note"] or "") for r in rows) == sorted(
        [("good", ""), ("good", ""),
         *((job, f"{why} (in {tmp_path / 'outputs' / job})") for job, why in expected.items())])


def test_report_output_refuses_a_fifo_and_the_journal(tmp_path):
    """`report --output` naming a FIFO, the journal or a link to it is a one-line usage error as
    `rate --output` gives: the FIFO stays a FIFO, the journal is unchanged, and nothing is written."""
    root = _root(tmp_path)
    journal = root / ".fine-tuner" / "journal.sqlite3"
    kept = journal.read_bytes()
    os.mkfifo(tmp_path / "report.fifo")
    (tmp_path / "journal-link").symlink_to(journal)
    for target, problem in ((tmp_path / "report.fifo", f"is {FIFO}"),
                            (journal, f"is the input file {journal} itself"),
                            (tmp_path / "journal-link", f"is the input file {journal} itself")):
        res = run_cli("report", "--root", str(root), "--output", str(target), cwd=tmp_path)
        assert (res.returncode, res.stdout, res.stderr) == (
            2, "", f"fine-tuner: error: {target} {problem}; pass another --output\n")
    assert (stat.S_ISFIFO(os.lstat(tmp_path / "report.fifo").st_mode), journal.read_bytes()) == (True, kept)
    assert (tmp_path / "journal-link").is_symlink()
