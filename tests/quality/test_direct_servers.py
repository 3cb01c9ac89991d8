"""The rating as a direct decision through the servers: a model trained on both answer forms
(``training.answer_forms: both``) is asked for ``{"rating": N}`` only, held to the rating-only JSON
Schema with a few tokens, its confidence from the rating's log-probabilities (the loopback fakes of
Ollama and of an OpenAI-compatible server); the records sent to the experts get their rationale
afterwards (``explain_for_review``)."""

from __future__ import annotations

import csv
import json
import re
import threading
from dataclasses import replace
from pathlib import Path

from daemon.config import load_config
from daemon.data import prompts
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.quality.backends import DIRECT_MAX_TOKENS
from daemon.quality.ratefile import explain_for_review, model_from_name, rate_file, route_for_review
from tests.conftest import leftovers

MARKER = "ZZPATIENTMARKER"
VALUES = sorted(MAPPING.values())
DIRECT = prompts.direct_output_schema(VALUES)
REASONED = prompts.output_schema(VALUES)
CHAT = "/chat/completions"
OLLAMA_DOWN = {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5}


def _input_csv(path: Path, rows: int) -> Path:
    """New records, each prompt marked with its row (``#i``)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i, row in enumerate(synthetic_rows(rows, 11)):
            row[1] += f" {MARKER} #{i}"
            writer.writerow(row)
    return path


def _row(messages: list) -> int:
    return int(re.search(r"#(\d+)$", messages[-1]["content"]).group(1))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _direct_model():
    """A model trained on both answer forms (what ``model_from_folder`` reads from such a folder)."""
    return replace(model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING), direct=True)


def test_a_model_trained_on_both_forms_decides_through_ollama_held_to_the_rating_only_schema(fake_ollama, tmp_path):
    """Through Ollama every record is asked for the rating only: ``format`` is the rating-only schema
    (an enum of the allowed ratings), ``num_predict`` 16, ``logprobs`` with 20 alternatives; the
    rating is the answer's, its confidence the rating token's probability; no rationale."""
    src = _input_csv(tmp_path / "new.csv", 4)
    sure = {0: 0.9, 1: 0.6, 2: 0.75, 3: 0.5}  # the answered rating's (-1, the schema's first) probability
    fake_ollama.probs_responder = lambda name, messages: {-1: sure[_row(messages)], 0: 1 - sure[_row(messages)]}
    config = load_config(None, {}, overrides={"ollama": {"host": fake_ollama.url, "retries": 0, "register": "off"},
                                              "paths": {"root": str(tmp_path)}})
    summary = rate_file(_direct_model(), src, tmp_path / "ratings.csv", config)
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")]
    assert len(chats) == 4
    assert all((c["format"], c["options"], c["logprobs"], c["top_logprobs"]) == (
        DIRECT, {"temperature": 0, "seed": 42, "num_predict": DIRECT_MAX_TOKENS}, True, 20) for c in chats)
    rows = _rows(tmp_path / "ratings.csv")
    assert [(r["rating"], r["rationale"], r["valid"], r["confidence"]) for r in rows] == [
        ("-1", "", "true", "0.9000"), ("-1", "", "true", "0.6000"), ("-1", "", "true", "0.7500"),
        ("-1", "", "true", "0.5000")]
    assert (summary["answer_form"], summary["backend"], summary["confidence"]["rated_with_confidence_this_run"]) == (
        "direct", "ollama", 4)


def _openai_config(tmp_path: Path, fake_openai) -> object:
    return load_config(None, {}, overrides={"ollama": OLLAMA_DOWN, "paths": {"root": str(tmp_path)},
                                            "openai": {"base_url": fake_openai.url, "retries": 0}})


class Answers:
    """The fake OpenAI-compatible server's answers, by the schema asked for: the rating-only one
    gets ``{"rating": 0}``; the reasoned one the rationale and rating of ``reasoned`` (row ->
    (rationale, rating); prose when missing)."""

    def __init__(self, reasoned: dict[int, tuple[str, int]]) -> None:
        self.reasoned = reasoned
        self.asked: list[tuple[int, str, int]] = []  # (row, which schema, max_tokens)
        self.lock = threading.Lock()

    def __call__(self, model: str, messages: list, body: dict) -> str:
        schema = body["response_format"]["json_schema"]["schema"]
        form = "direct" if schema == DIRECT else "reasoned" if schema == REASONED else "other"
        row = _row(messages)
        with self.lock:
            self.asked.append((row, form, body["max_tokens"]))
        if form == "direct":
            return json.dumps({"rating": 0})
        if row not in self.reasoned:
            return f"It seems to match {MARKER}"
        rationale, rating = self.reasoned[row]
        return json.dumps({"rationale": rationale, "rating": rating})


def test_through_an_openai_compatible_server_the_rating_and_confidence_come_from_the_logprobs(fake_openai, tmp_path):
    """Through an OpenAI-compatible server (llama-server) every record is asked with the rating-only
    schema as a strict ``response_format``, ``max_tokens`` 16 and ``logprobs`` with 20 alternatives;
    the rating comes from the answer and the confidence from its token's log-probabilities."""
    src = _input_csv(tmp_path / "new.csv", 3)
    fake_openai.responder = answers = Answers({})
    sure = {0: 0.95, 1: 0.55, 2: 0.7}
    fake_openai.probs_responder = lambda name, messages: {0: sure[_row(messages)], 1: 1 - sure[_row(messages)]}
    summary = rate_file(_direct_model(), src, tmp_path / "ratings.csv", _openai_config(tmp_path, fake_openai),
                        backend="openai")
    chats = [r.body for r in fake_openai.requests_to(CHAT)]
    assert all((c["response_format"], c["max_tokens"], c["logprobs"], c["top_logprobs"]) == (
        {"type": "json_schema", "json_schema": {"name": "rating", "strict": True, "schema": DIRECT}},
        DIRECT_MAX_TOKENS, True, 20) for c in chats)
    assert sorted(answers.asked) == [(0, "direct", 16), (1, "direct", 16), (2, "direct", 16)]
    assert [(r["rating"], r["rationale"], r["confidence"]) for r in _rows(tmp_path / "ratings.csv")] == [
        ("0", "", "0.9500"), ("0", "", "0.5500"), ("0", "", "0.7000")]
    assert (summary["answer_form"], summary["backend"], summary["rated"]) == ("direct", "openai", 3)


def test_the_records_sent_to_review_get_the_rationale_of_a_reasoned_answer(fake_openai, tmp_path):
    """After a direct run, the records going to the experts with a rating (confidence under
    review_below) are asked again for the reasoned answer (its schema, the usual 96 tokens), and
    its rationale fills their rationale cell in ratings.csv before needs_review.csv is written;
    a reasoned answer that rates otherwise or is invalid leaves it empty; every other cell and the
    confident records stay as they were."""
    src = _input_csv(tmp_path / "new.csv", 6)
    sure = {0: 0.95, 1: 0.5, 2: 0.9, 3: 0.4, 4: 0.7, 5: 0.3}  # under 0.8: rows 1, 3, 4, 5
    fake_openai.probs_responder = lambda name, messages: {0: sure[_row(messages)], -1: 1 - sure[_row(messages)]}
    fake_openai.responder = answers = Answers({1: ("cough without fever", 0), 3: ("fever and cough", 1),
                                               5: ("no respiratory sign", 0), 0: ("never asked", 0)})
    config = _openai_config(tmp_path, fake_openai)
    model, out = _direct_model(), tmp_path / "ratings.csv"
    summary = rate_file(model, src, out, config, backend="openai")
    before = _rows(out)
    assert explain_for_review(model, summary, src, out, config, None) is summary  # no threshold, no pass
    explained = explain_for_review(model, summary, src, out, config, 0.8)
    assert explained["explained_for_review"] == {"records": 4, "rationales": 2, "other_rating": 1, "invalid": 1,
                                                 "status": "done"}
    assert sorted(a for a in answers.asked if a[1] == "reasoned") == [
        (1, "reasoned", 96), (3, "reasoned", 96), (4, "reasoned", 96), (5, "reasoned", 96)]
    after = _rows(out)
    rationales = {1: "cough without fever", 5: "no respiratory sign"}
    assert after == [{**row, "rationale": rationales.get(i, "")} for i, row in enumerate(before)]
    routed = route_for_review(explained, src, out, 0.8)
    assert routed["needs_review"]["records"] == 4
    assert leftovers(tmp_path) == []


def test_a_stopped_rationale_pass_leaves_the_ratings_as_they_were(fake_openai, tmp_path):
    """A stop during the rationale pass writes nothing: ratings.csv stays byte for byte, and the
    summary says the pass was stopped."""
    src = _input_csv(tmp_path / "new.csv", 3)
    fake_openai.probs_responder = lambda name, messages: {0: 0.5, 1: 0.5}
    fake_openai.responder = Answers({0: ("a reason", 0), 1: ("a reason", 0), 2: ("a reason", 0)})
    config = _openai_config(tmp_path, fake_openai)
    model, out = _direct_model(), tmp_path / "ratings.csv"
    summary = rate_file(model, src, out, config, backend="openai")
    text = out.read_bytes()
    stop = threading.Event()
    stop.set()
    explained = explain_for_review(model, summary, src, out, config, 0.8, stop_event=stop)
    assert explained["explained_for_review"] == {"records": 3, "rationales": 0, "other_rating": 0, "invalid": 0,
                                                 "status": "stopped"}
    assert out.read_bytes() == text and leftovers(tmp_path) == []
