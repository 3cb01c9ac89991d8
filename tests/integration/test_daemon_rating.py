"""Rating jobs through the daemon: a raw export trains a model set with the built-in template, a
rating job in the inbox rates new records with it, and a rating killed with kill -9 resumes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from daemon.data.synthetic import MAPPING, synthetic_rows
from daemon.quality.review import ORDER_RULE, REVIEW_COLUMNS
from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, REPO, all_log_text

RAW_HEADER = ["C_BioSense_ID", "ChiefComplaintOrig", "DischargeDiagnosis", "TriageNotes", "Age", "Sex",
              "Expert Rating", "Rationale_of_Rating"]
LABEL = {v: k for k, v in MAPPING.items()}


def raw_export(rows: int, seed: int, *, ratings: bool = True, unknown_dx: tuple[int, ...] = ()) -> bytes:
    """A syndromic-surveillance export: no prompt column, labels only (no Standardized_Rating).
    Records numbered in ``unknown_dx`` carry a diagnosis the scripted model cannot rate."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(RAW_HEADER if ratings else RAW_HEADER[:6])
    for i, (_row_id, prompt, _label, rating, rationale) in enumerate(synthetic_rows(rows, seed), start=1):
        cells = [f"B{seed}-{i}", prompt[:60], "xx" if i in unknown_dx else f"dx {rating}", f"{MARKER} note {i}",
                 str(20 + i % 60),
                 "F" if i % 2 else "M"]
        writer.writerow(cells + ([LABEL[int(rating)], rationale] if ratings else []))
    return buf.getvalue().encode()


class Scripted:
    """The fake's answers: the rating the record's discharge diagnosis gives away (dx <rating>),
    slowly, counting how often each record is asked."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.asked: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, model: str, messages: list) -> str:
        user = messages[-1]["content"]
        with self.lock:
            self.asked[user] += 1
        time.sleep(self.delay_s)
        for value in (-1, 0, 1):
            if f"dx {value}" in user:
                return json.dumps({"rating": value, "rationale": "scripted"})
        return "no idea"


def _model_set(root, start_daemon, fake_ollama) -> str:
    """Train a model set from a raw export through the inbox; returns its job id."""
    fake_ollama.chat_responder = Scripted()
    root.drop_bytes("raw.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("raw.csv", raw_export(80, seed=3))
    [done] = wait_for(lambda: root.job_folders(root.processed, "raw"), timeout=60, message="model set built")
    return done.name


def test_raw_export_builds_a_model_set_and_a_rating_job_rates_with_it(root, start_daemon, fake_ollama):
    """A raw export (built-in template, ratings from the labels) becomes a model set whose folder
    records the template; a `task: rate` job naming that folder rates new raw records into
    ratings.csv and rating_summary.json, with invalid answers marked; no cell value is logged."""
    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "auto",
                                                                "retries": 0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    job_id = _model_set(root, start_daemon, fake_ollama)
    meta = json.loads((root.outputs / job_id / "fine_tuning_metadata.json").read_text())
    assert meta["prompt_source"]["builtin"] is True and meta["prompt_source"]["ratings_from"] == "labels"
    config = json.loads((root.outputs / job_id / "model_set_config.json").read_text())
    assert config["prompt_template"] == meta["prompt_template"]
    # the model is 70 % sure of its "Does Not Match" ratings, 99 % of the others
    fake_ollama.probs_responder = lambda model, messages: (
        {0: 0.7, 1: 0.15, -1: 0.15} if "dx 0" in messages[-1]["content"]
        else {v: (0.99 if f"dx {v}" in messages[-1]["content"] else 0.005) for v in (-1, 0, 1)})
    root.drop_bytes("new.job.yaml", f"task: rate\nmodel: outputs/{job_id}\nreview_below: 0.9\n".encode())
    root.drop_bytes("new.csv", raw_export(30, seed=9, ratings=False, unknown_dx=(5,)))  # 5: a prose answer
    [rated] = wait_for(lambda: root.job_folders(root.processed, "new"), timeout=60, message="rated")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(root.config),
                             "--root", str(root.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    [line] = [x for x in status.stdout.splitlines() if x.startswith(f"  {job_id}")]
    # the scripted model reads the diagnosis: perfect; the bag-of-words baseline beside it
    meta = json.loads((root.outputs / job_id / "fine_tuning_metadata.json").read_text())
    [bow] = [m["kappa"] for m in meta["evaluation"]["models"] if m["model"] == "baseline"]
    assert line.endswith(f"kappa 1.00 (base 1.00, bag-of-words {bow:.2f}, random split)")
    out = root.outputs / rated.name
    rows = list(csv.DictReader((out / "ratings.csv").open()))
    assert [r["C_BioSense_ID"] for r in rows] == [f"B9-{i}" for i in range(1, 31)]
    assert rows[4]["valid"] == "false" and rows[4]["rating"] == ""
    assert all(r["valid"] == "true" for i, r in enumerate(rows) if i != 4)
    summary = json.loads((out / "rating_summary.json").read_text())
    assert (summary["rows"], summary["invalid"], summary["backend"]) == (30, 1, "ollama")
    assert sum(summary["counts"].values()) == 29
    # the invalid answer first, then the unsure ones (all equally unsure, "dx 0" is no code: in file order)
    unsure = ([r["C_BioSense_ID"] for r in rows if r["valid"] == "false"] +
              [r["C_BioSense_ID"] for r in rows if r["rating"] == "0"])
    assert {r["confidence"] for r in rows if r["rating"] == "0"} == {"0.7000"}
    review = list(csv.DictReader((out / "needs_review.csv").open()))
    assert [r["C_BioSense_ID"] for r in review] == unsure
    assert list(review[0]) == [*RAW_HEADER[:6], *REVIEW_COLUMNS]
    assert {(r["Expert Rating"], r["Rationale_of_Rating"]) for r in review} == {("", "")}
    assert [r["Review Rank"] for r in review] == [str(i) for i in range(1, len(unsure) + 1)]
    assert summary["needs_review"] == {
        "threshold": 0.9, "records": len(unsure), "invalid": 1, "without_confidence": 1, "order": ORDER_RULE,
        "grouped_by": {"column": None, "reason": "the diagnosis column 'DischargeDiagnosis' holds no ICD-10-style "
                                                 "codes (name a column with evaluation.group_by)"},
        "file": "needs_review.csv"}
    assert MARKER not in all_log_text(root)
    assert leftovers(root.path) == []


def test_a_rating_killed_with_kill_9_resumes_without_rating_a_record_twice(root, start_daemon, fake_ollama):
    """kill -9 in the middle of a 1,500-record rating job: after a restart the job resumes from its
    part file, every record is in ratings.csv exactly once, and records of the chunks finished
    before the kill are never asked again (only the chunk in flight is)."""
    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "auto",
                                                                "retries": 0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    job_id = _model_set(root, start_daemon, fake_ollama)
    scripted = Scripted(delay_s=0.004)
    fake_ollama.chat_responder = scripted
    root.drop_bytes("big.job.yaml", f"task: rate\nmodel: {job_id}\n".encode())
    root.drop_bytes("big.csv", raw_export(1500, seed=11, ratings=False))
    [claimed] = d.wait_event("job_claimed", count=2)[1:]
    part = root.outputs / f".tmp-{claimed['job_id']}" / "ratings.csv.part"
    wait_for(lambda: part.exists() and part.read_bytes().count(b"\n") >= 501, timeout=60, message="a chunk rated")
    d.kill()  # SIGKILL to the process group
    before = part.read_bytes().count(b"\n") - 1  # minus the header
    d2 = start_daemon(log_name="daemon-after.log")
    [done] = wait_for(lambda: root.job_folders(root.processed, "big"), timeout=120, message="rating finished")
    d2.signal(signal.SIGTERM)
    assert d2.wait_exit() == 0
    out = root.outputs / done.name
    ids = [r["C_BioSense_ID"] for r in csv.DictReader((out / "ratings.csv").open())]
    assert sorted(ids) == sorted(f"B11-{i}" for i in range(1, 1501)) and len(ids) == len(set(ids)) == 1500
    summary = json.loads((out / "rating_summary.json").read_text())
    assert summary["resumed_from"] == before and before >= 500 and before % 500 == 0
    repeated = sum(n - 1 for n in scripted.asked.values())
    assert len(scripted.asked) == 1500 and repeated <= 500
    assert MARKER not in all_log_text(root)


def test_a_rating_job_with_a_model_folder_starts_without_waiting_for_a_mapping(root, start_daemon, fake_ollama):
    """With pair_timeout_s at 300 s, a `task: rate` job file naming a model folder starts as soon as
    it and its CSV are complete (the folder brings its mapping), while a rating job with a bare
    Ollama name still waits for a mapping; once the timeout (reloaded to 0.5 s) passes, that job
    fails with a ConfigError whose hint says to fix the job file."""
    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "auto",
                                                                "retries": 0}, watch={"pair_timeout_s": 300.0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    job_id = _model_set(root, start_daemon, fake_ollama)
    root.drop_bytes("bare.job.yaml", b"task: rate\nmodel: llama3.2:1b\n")
    root.drop_bytes("bare.csv", raw_export(5, seed=4, ratings=False))
    root.drop_bytes("quick.job.yaml", f"task: rate\nmodel: outputs/{job_id}\n".encode())
    root.drop_bytes("quick.csv", raw_export(5, seed=5, ratings=False))
    [rated] = wait_for(lambda: root.job_folders(root.processed, "quick"), timeout=60, message="rated at once")
    assert [r["valid"] for r in csv.DictReader((root.outputs / rated.name / "ratings.csv").open())] == ["true"] * 5
    assert sorted(p.name for p in root.inbox.iterdir() if p.name.startswith("bare")) == ["bare.csv", "bare.job.yaml"]
    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "auto",
                                                                "retries": 0}, watch={"pair_timeout_s": 0.5})
    d.signal(signal.SIGHUP)
    [failed] = wait_for(lambda: root.job_folders(root.failed, "bare"), timeout=60, message="bare model failed")
    error = json.loads((failed / "error.json").read_text())
    assert (error["error_type"], error["message"], error["hint"]) == (
        "ConfigError", "invalid configuration in bare.job.yaml: model: llama3.2:1b is not an output folder of "
                       "this service, and a bare Ollama model needs a rating mapping: drop NAME.mapping.json with "
                       "the job or set defaults.mapping", "fix the job file and drop it again")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert MARKER not in all_log_text(root)


def test_a_rating_job_never_follows_a_link_to_a_model_folder(root, start_daemon, fake_ollama, tmp_path):
    """A `task: rate` job whose model is a link in outputs/ to a model folder outside the root (with
    its own system prompt), or a folder whose fine_tuning_metadata.json is a link to /etc/passwd,
    fails with a ModelFolderError naming the folder or the file; nothing is asked of the model with
    the outside prompt, and the daemon keeps serving."""
    import os
    import shutil

    root.write_config(defaults={"model": "llama3.2:1b"}, ollama={"host": fake_ollama.url, "register": "off",
                                                                "retries": 0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    job_id = _model_set(root, start_daemon, fake_ollama)
    outside = tmp_path / "outside-model"
    shutil.copytree(root.outputs / job_id, outside)
    config = json.loads((outside / "model_set_config.json").read_text())
    (outside / "model_set_config.json").write_text(json.dumps({**config, "system_prompt": "ZZOUTSIDEPROMPT"}))
    os.symlink(outside, root.outputs / "elsewhere")
    shadowed = root.outputs / "shadowed"
    shutil.copytree(root.outputs / job_id, shadowed)
    (shadowed / "fine_tuning_metadata.json").unlink()
    os.symlink("/etc/passwd", shadowed / "fine_tuning_metadata.json")
    asked_before = len(fake_ollama.requests_to("/api/chat"))
    for stem, model in (("vialink", "elsewhere"), ("viapasswd", "shadowed")):
        root.drop_bytes(f"{stem}.job.yaml", f"task: rate\nmodel: {model}\n".encode())
        root.drop_bytes(f"{stem}.csv", raw_export(10, seed=9, ratings=False))
    wait_for(lambda: root.job_folders(root.failed, "vialink") and root.job_folders(root.failed, "viapasswd"),
             timeout=60, message="both rating jobs failed")
    root.drop_bytes("after.job.yaml", f"task: rate\nmodel: {job_id}\n".encode())
    root.drop_bytes("after.csv", raw_export(5, seed=10, ratings=False))
    wait_for(lambda: root.job_folders(root.processed, "after"), timeout=60, message="a good rating job")
    assert d.proc.poll() is None
    errors = [json.loads((f / "error.json").read_text()) for stem in ("vialink", "viapasswd")
              for f in root.job_folders(root.failed, stem)]
    assert [(e["error_type"], e.get("file"), e["message"]) for e in errors] == [
        ("ModelFolderError", None, "the model folder elsewhere is a symbolic link or a file, not a folder of the "
                                   "outputs folder; links are never followed"),
        ("ModelFolderError", "fine_tuning_metadata.json", "fine_tuning_metadata.json in the model folder shadowed "
                                                          "is a symbolic link; links in a model folder are never "
                                                          "followed")]
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")][asked_before:]
    assert len(chats) == 5 and "ZZOUTSIDEPROMPT" not in json.dumps(chats)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert MARKER not in all_log_text(root)


def test_rate_on_the_command_line_and_an_inbox_rating_job_ask_the_same_prompts(root, start_daemon, fake_ollama,
                                                                               tmp_path):
    """`fine-tuner rate --model NAME` and a `task: rate` job with the same bare Ollama model ask it the
    same system and user messages for the same records: both take the configuration's topics,
    topic_definition, prompt_template and mapping."""
    definition = "ZZDEFINITION: a match names a cough or a fever"
    root.write_config(defaults={"model": "llama3.2:1b", "topic_definition": definition,
                                "mapping": str(root.path / "labels.json"),
                                "prompt_template": "Complaint: {ChiefComplaintOrig}; diagnosis: {DischargeDiagnosis}"},
                      ollama={"host": fake_ollama.url, "register": "off", "retries": 0})
    (root.path / "labels.json").write_text(json.dumps(MAPPING))
    fake_ollama.chat_responder = Scripted()
    records = raw_export(6, seed=12, ratings=False)

    def asked(since: int) -> list[tuple[str, str]]:
        chats = [r.body["messages"] for r in fake_ollama.requests_to("/api/chat")][since:]
        return sorted((m[0]["content"], m[-1]["content"]) for m in chats)

    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "new.csv").write_bytes(records)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")}
    res = subprocess.run([sys.executable, "-m", "daemon", "rate", "--config", str(root.config), "--root",
                          str(root.path), "--model", "llama3.2:1b", "--input", "new.csv"],
                         cwd=cli, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    from_cli = asked(0)
    d = start_daemon()
    d.wait_event("daemon_ready")
    before = len(fake_ollama.requests_to("/api/chat"))
    root.drop_bytes("new.job.yaml", b"task: rate\nmodel: llama3.2:1b\n")
    root.drop_bytes("new.csv", records)
    wait_for(lambda: root.job_folders(root.processed, "new"), timeout=60, message="rated through the inbox")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert asked(before) == from_cli
    assert len(from_cli) == 6 and all(f"How the experts decide:\n{definition}\n" in system for system, _ in from_cli)
    assert from_cli[0][1].startswith("Complaint: ")
