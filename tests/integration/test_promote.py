"""A current model per topic: promote (journal + Ollama alias through the loopback fake), the
--force rule for a model that is not recommended, status, and rating with the topic's model from the
command line and from a ``task: rate`` job file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys

from daemon.data.synthetic import MAPPING
from daemon.inbox.journal import Journal
from tests.integration.conftest import MARKER, REPO, all_log_text
from tests.integration.test_job_control import _cli

TOPIC = "respiratory infections"


def _truth(root, seeds) -> dict[str, int]:
    truth = {}
    for seed in seeds:
        for row in csv.DictReader(io.StringIO(root.dataset_bytes(100, seed).decode())):
            truth[row["formatted_prompt"]] = int(row["Standardized_Rating"])
    return truth


def _responder(truth, good_model):
    """The good model set answers like the experts; every other model always says the same."""
    def answer(model, messages):
        rating = truth.get(messages[-1]["content"], 0) if model == good_model else MAPPING["Does Not Match"]
        return json.dumps({"rationale": "x", "rating": rating})
    return answer


def test_promote_records_the_current_model_makes_the_alias_and_rate_uses_it(root, start_daemon, fake_ollama):
    """A recommended model is promoted (journal, `respiratory-infections:current` in Ollama, status);
    a not-recommended one is refused without --force and taken with it; `rate --topic` and a
    `task: rate` job with `topic:` rate with the current model."""
    fake_ollama.add_model("llama3.2:1b")
    fake_ollama.chat_responder = _responder(_truth(root, (11, 12, 13)), "llama3.2-1b-good:latest")
    root.write_config(defaults={"model": "llama3.2:1b", "topics": TOPIC, "approach": "model_set"},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      evaluation={"backend": "ollama", "verdict_min_rows": 10})
    root.drop_dataset("good", rows=100, seed=11)
    root.drop_dataset("bad", rows=100, seed=12)
    assert start_daemon("--once").wait_exit(timeout=120) == 0
    [good] = [p.name for p in root.job_folders(root.outputs, "good")]
    [bad] = [p.name for p in root.job_folders(root.outputs, "bad")]

    refused = _cli(root, "promote", bad, code=1)
    assert refused.startswith(f"fine-tuner: error: job {bad}'s model is not recommended: Not recommended")
    assert refused.rstrip().endswith("(promote it anyway with --force, or promote a better job)")
    out = _cli(root, "promote", good)
    assert out.splitlines() == [f"current model for '{TOPIC}': job {good}, llama3.2-1b-good:latest",
                                "ollama: respiratory-infections:current now points at it",
                                f'rate with it: fine-tuner rate --topic "{TOPIC}" --input CSV']
    assert [r.body for r in fake_ollama.requests_to("/api/copy")] == [
        {"source": "llama3.2-1b-good:latest", "destination": "respiratory-infections:current"}]
    assert fake_ollama.get_model("respiratory-infections:current") is not None
    status = _cli(root, "status").splitlines()
    assert status[status.index("current models:") + 1] == (
        f"  {TOPIC}: job {good}, llama3.2-1b-good:latest (alias respiratory-infections:current)")

    new = root.path / "new.csv"
    new.write_bytes(root.dataset_bytes(100, 13))
    rated = _cli(root, "rate", "--topic", "Respiratory  Infections", "--input", str(new), "--backend", "ollama")
    assert rated.splitlines()[0] == "rated: 100 of 100 records with llama3.2-1b-good:latest (ollama)"
    expert = [int(r["Standardized_Rating"]) for r in csv.DictReader(io.StringIO(new.read_text()))]
    rows = list(csv.DictReader(open(root.path / "new.ratings.csv", encoding="utf-8")))
    assert [int(r["rating"]) for r in rows] == expert

    root.drop_bytes("again.job.yaml", f"task: rate\ntopic: {TOPIC}\n".encode())
    root.drop_bytes("again.csv", root.dataset_bytes(100, 13))
    assert start_daemon("--once", log_name="daemon-rate.log").wait_exit(timeout=120) == 0
    [job] = root.job_folders(root.outputs, "again")
    summary = json.loads((job / "rating_summary.json").read_text())
    assert (summary["model"], summary["rated"]) == ("llama3.2-1b-good:latest", 100)

    assert _cli(root, "promote", bad, "--force").splitlines()[0] == (
        f"current model for '{TOPIC}': job {bad}, llama3.2-1b-bad:latest")
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        current = journal.current_model(TOPIC.upper())
        assert (current["job_id"], current["forced"]) == (bad, True)
        assert [e["event"] for e in journal.events(good)] == ["promoted"]
    assert "[promoted with --force]" in _cli(root, "status")
    assert MARKER not in all_log_text(root)


def _two_good_and_a_withdrawn(root, start_daemon, fake_ollama) -> tuple[str, str, str]:
    """Three model sets built by a daemon run: `good1` and `good2` rate like the experts, `bad`
    always says the same and is withdrawn from Ollama by the quality gate."""
    fake_ollama.add_model("llama3.2:1b")
    truth = _truth(root, (11, 12, 13, 14))
    good = {"llama3.2-1b-good1:latest", "llama3.2-1b-good2:latest"}
    fake_ollama.chat_responder = lambda model, messages: json.dumps({
        "rationale": "x", "rating": truth.get(messages[-1]["content"], 0) if model in good
        else MAPPING["Does Not Match"]})
    root.write_config(defaults={"model": "llama3.2:1b", "topics": TOPIC, "approach": "model_set"},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      evaluation={"backend": "ollama", "verdict_min_rows": 10, "min_kappa": 0.6})
    for stem, seed in (("good1", 11), ("good2", 12), ("bad", 13)):
        root.drop_dataset(stem, rows=100, seed=seed)
    assert start_daemon("--once").wait_exit(timeout=120) == 0
    return tuple(root.job_folders(root.outputs, stem)[0].name for stem in ("good1", "good2", "bad"))


def test_promote_refuses_a_withdrawn_model_and_a_gone_folder_and_spellings_name_one_topic(
        root, start_daemon, fake_ollama):
    """promote refuses, even with --force, a model the quality gate withdrew and a job whose output
    folder is gone (one line, exit 1); two spellings of a topic make one current model, the latest,
    which status lists once and `rate --topic` in a third spelling rates with."""
    good1, good2, bad = _two_good_and_a_withdrawn(root, start_daemon, fake_ollama)
    gate = json.loads((root.outputs / bad / "fine_tuning_metadata.json").read_text())["quality_gate"]
    assert (gate["status"], gate["withdrawn"]) == ("failed", True)
    assert _cli(root, "promote", bad, "--force", code=1).splitlines() == [
        f"fine-tuner: error: job {bad}'s model did not pass the quality gate and was removed from Ollama: "
        f"{gate['reason']} (promote a job whose model passed it)"]

    assert _cli(root, "promote", good1, "--topic", "Respiratory Infections").splitlines()[0] == (
        f"current model for 'respiratory infections': job {good1}, llama3.2-1b-good1:latest")
    assert _cli(root, "promote", good2, "--topic", "respiratory  infections").splitlines()[0] == (
        f"current model for 'respiratory infections': job {good2}, llama3.2-1b-good2:latest")
    status = _cli(root, "status").splitlines()
    assert status[status.index("current models:"):] == [
        "current models:", f"  {TOPIC}: job {good2}, llama3.2-1b-good2:latest (alias respiratory-infections:current)"]
    new = root.path / "new.csv"
    new.write_bytes(root.dataset_bytes(100, 14))
    rated = _cli(root, "rate", "--topic", "RESPIRATORY INFECTIONS", "--input", str(new), "--backend", "ollama")
    assert rated.splitlines()[0] == "rated: 100 of 100 records with llama3.2-1b-good2:latest (ollama)"

    shutil.rmtree(root.outputs / good1)
    assert _cli(root, "promote", good1, "--topic", TOPIC, code=1).splitlines() == [
        f"fine-tuner: error: job {good1}'s output folder {root.outputs / good1} is gone (put the folder back, "
        "or promote another job)"]
    with Journal(root.path / ".fine-tuner" / "journal.sqlite3") as journal:
        assert (list(journal.current_models()), journal.current_model(TOPIC)["job_id"]) == ([TOPIC], good2)
        assert [e["event"] for e in journal.events(bad)] == []


def _cli_at(path, *args: str, code: int = 0) -> str:
    """A command on the root at ``path`` (its own config and --root), like an operator runs it there."""
    proc = subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(path / "config.yaml"),
                           "--root", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return proc.stdout if code == 0 else proc.stderr


def _read_by_commands(path, good: str, older: str) -> None:
    """status, status JOB_ID, report, promote and rate --topic on the root at ``path`` work and name
    only that root's folders."""
    report = json.loads(_cli_at(path, "status", "--json"))
    assert [(j["job_id"], j["output_path"], j["topics"], j["ollama_name"])
            for j in report["recent_succeeded"]] == [
        (good, str(path / "outputs" / good), [TOPIC], "llama3.2-1b-good:latest"),
        (older, str(path / "outputs" / older), [TOPIC], "llama3.2-1b-older:latest")]
    detail = json.loads(_cli_at(path, "status", older, "--json"))
    assert (detail["folder"], "fine_tuning_metadata.json" in {f["name"] for f in detail["files"]}) == (
        str(path / "outputs" / older), True)
    rows = json.loads(_cli_at(path, "report", "--format", "json"))
    assert sorted({(r["job_id"], r["output_path"]) for r in rows}) == sorted(
        [(good, str(path / "outputs" / good)), (older, str(path / "outputs" / older))])
    assert sorted((r["job_id"], r["kappa"] is not None) for r in rows if r["model"] == "new") == sorted(
        [(good, True), (older, True)])
    assert _cli_at(path, "promote", older).splitlines()[0] == (
        f"current model for '{TOPIC}': job {older}, llama3.2-1b-older:latest")
    assert _cli_at(path, "promote", good).splitlines()[0] == (
        f"current model for '{TOPIC}': job {good}, llama3.2-1b-good:latest")
    new = path.with_name(f"{path.name}-new.csv")  # outside the root: it is copied with it otherwise
    shutil.copyfile(path / "inbox" / "processed" / good / "good.csv", new)
    rated = _cli_at(path, "rate", "--topic", TOPIC, "--input", str(new), "--backend", "ollama")
    assert rated.splitlines()[0] == "rated: 100 of 100 records with llama3.2-1b-good:latest (ollama)"


def test_a_moved_and_a_copied_root_keep_their_jobs_and_read_their_own_folders(
        root, start_daemon, fake_ollama, tmp_path):
    """A root whose journal holds a job recorded relative to the root and one recorded with the
    absolute path older versions wrote: after `mv`, and in a `cp -r` of it with the original gone,
    status, status JOB_ID, report, promote and rate --topic work on the jobs' folders there."""
    fake_ollama.add_model("llama3.2:1b")
    truth = _truth(root, (11, 12))
    good_models = {"llama3.2-1b-good:latest", "llama3.2-1b-older:latest"}
    fake_ollama.chat_responder = lambda model, messages: json.dumps({
        "rationale": "x", "rating": truth.get(messages[-1]["content"], 0) if model in good_models
        else MAPPING["Does Not Match"]})
    root.write_config(defaults={"model": "llama3.2:1b", "topics": TOPIC, "approach": "model_set"},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0},
                      evaluation={"backend": "ollama", "verdict_min_rows": 10})
    root.drop_dataset("older", rows=100, seed=12)
    assert start_daemon("--once").wait_exit(timeout=120) == 0
    root.drop_dataset("good", rows=100, seed=11)
    assert start_daemon("--once", log_name="daemon-1.log").wait_exit(timeout=120) == 0
    [good] = [p.name for p in root.job_folders(root.outputs, "good")]
    [older] = [p.name for p in root.job_folders(root.outputs, "older")]
    journal = root.path / ".fine-tuner" / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(journal)) as db, db:
        assert db.execute("SELECT id, output_path FROM jobs ORDER BY id").fetchall() == [
            (good, f"outputs/{good}"), (older, f"outputs/{older}")]
        db.execute("UPDATE jobs SET output_path = ? WHERE id = ?", (str(root.outputs / older), older))

    moved = tmp_path / "moved"
    os.rename(root.path, moved)
    _read_by_commands(moved, good, older)
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied, symlinks=True)
    shutil.rmtree(moved)
    _read_by_commands(copied, good, older)
