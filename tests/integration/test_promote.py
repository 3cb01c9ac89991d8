"""A current model per topic: promote (journal + Ollama alias through the loopback fake), the
--force rule for a model that is not recommended, status, and rating with the topic's model from the
command line and from a ``task: rate`` job file."""

from __future__ import annotations

import csv
import io
import json

from daemon.data.synthetic import MAPPING
from daemon.inbox.journal import Journal
from tests.integration.conftest import MARKER, all_log_text
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
