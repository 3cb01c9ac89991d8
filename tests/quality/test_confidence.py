"""Confidence per record: from a server's token log-probabilities (controlled through the loopback
fakes), calibrated by a temperature on the held-out rows, the coverage table, and the records
routed to the experts in needs_review.csv."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.fine_tuner import FineTuner
from daemon.quality import confidence as conf
from daemon.quality.evalreport import ModelResult, confidence_report
from daemon.quality.ratefile import model_from_folder, rate_file, route_for_review
from daemon.quality.review import ORDER_RULE, REVIEW_COLUMNS
from tests.fake_logprobs import token_logprobs, with_rating_logprob
from tests.quality.test_heldout import ScriptedModels, _config, _frame
from tests.quality.test_ratefile import FOLDER_HINT

VALUES = sorted(MAPPING.values())
ROOT = Path(__file__).resolve().parents[2]


def _entries(content: str, probs: dict[int, float] | None, top: int = 20):
    return conf.token_entries(token_logprobs(content, probs, top))


def test_the_rating_tokens_alternatives_give_each_allowed_ratings_probability():
    answer = json.dumps({"rationale": 'says "rating": 0 in prose', "rating": 1})
    probs = conf.probabilities_from_tokens(_entries(answer, {1: 0.6, 0: 0.3, -1: 0.05}), VALUES)
    assert probs == pytest.approx({-1: 0.05 / 0.95, 0: 0.3 / 0.95, 1: 0.6 / 0.95})
    # an alternative outside the allowed ratings is not a rating; one the server did not list is 0
    assert conf.probabilities_from_tokens(_entries(answer, {1: 0.5, 7: 0.5}), VALUES) == {-1: 0.0, 0: 0.0, 1: 1.0}
    assert conf.probabilities_from_tokens(_entries("It looks like a match", None), VALUES) is None
    assert conf.token_entries([{"token": "x", "logprob": "high"}]) is None  # a malformed reply: no confidence


def test_a_negative_rating_split_over_two_tokens_is_read_along_its_path():
    entries = [('{"rating": ', 0.0, []), ("-", math.log(0.5), [("1", math.log(0.3)), ("0", math.log(0.1))]),
               ("1", math.log(0.9), []), ("}", 0.0, [])]
    assert conf.probabilities_from_tokens(entries, [-1, 0, 1]) == pytest.approx(
        {-1: 0.5 / 0.9, 0: 0.1 / 0.9, 1: 0.3 / 0.9})
    # with -1 and -2 both allowed, "-" alone does not say which: -1 is known along the path taken
    assert conf.probabilities_from_tokens(entries, [-2, -1, 0, 1]) == pytest.approx(
        {-2: 0.0, -1: 0.45 / 0.85, 0: 0.1 / 0.85, 1: 0.3 / 0.85})


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model():
    """A model that is right 70 % of the time but always 99 % sure: the fitted temperature softens
    it (T > 1) and the expected calibration error falls from about 0.29 to under 0.05."""
    rng = random.Random(3)
    probs, expert, ratings = [], [], []
    for _ in range(200):
        truth = rng.choice(VALUES)
        answer = truth if rng.random() < 0.7 else rng.choice([v for v in VALUES if v != truth])
        probs.append({v: (0.99 if v == answer else 0.005) for v in VALUES})
        expert.append(truth)
        ratings.append(answer)
    correct = [a == e for a, e in zip(ratings, expert)]
    before = conf.ece([p[a] for p, a in zip(probs, ratings)], correct)
    t = conf.fit_temperature(probs, expert, ratings)
    after = conf.ece([conf.with_temperature(p, t)[a] for p, a in zip(probs, ratings)], correct)
    assert t > 1 and before == pytest.approx(0.29, abs=0.04) and after < 0.05
    assert conf.fit_temperature(probs[:9], expert[:9], ratings[:9]) is None  # too few rows to fit


def test_the_coverage_table_counts_what_each_threshold_accepts():
    expert = [1, 1, 0, 0, -1, 1, 0, -1, 1, 0]
    ratings = [1, 1, 0, 1, -1, None, 0, 0, 1, 0]
    confidences = [0.99, 0.95, 0.92, 0.55, 0.85, None, 0.75, 0.6, 0.97, 0.91]
    table = {r["threshold"]: r for r in conf.coverage(confidences, ratings, expert, seed=1)}
    assert [(t, table[t]["accepted"], table[t]["share"]) for t in (0.5, 0.8, 0.9, 0.95)] == [
        (0.5, 9, 0.9), (0.8, 6, 0.6), (0.9, 5, 0.5), (0.95, 3, 0.3)]
    assert (table[0.9]["accuracy"], table[0.9]["kappa"]) == (1.0, 1.0)
    assert table[0.5]["accuracy"] == pytest.approx(7 / 9, abs=1e-4)


def test_a_backend_without_probabilities_says_so_and_invents_nothing():
    result = ModelResult("new", "model set", "m", [1, 0], [0.1, 0.1], 1.0, "ollama", probs=None)
    info, per_row = confidence_report(result, [1, 1], seed=1)
    assert info == {"available": 0, "source": None,
                    "note": "the ollama backend gave no probabilities for these answers: no confidence is "
                            "reported (it is never guessed)"}
    assert per_row == [None, None]


def _probs_for(truth: dict[str, int], sure: float):
    """The fake's probabilities: ``sure`` on the expert's rating, the rest spread evenly."""
    def probs(model, messages):
        right = truth.get(messages[-1]["content"])
        return None if right is None else {v: sure if v == right else (1 - sure) / (len(VALUES) - 1) for v in VALUES}
    return probs


def test_the_evaluation_through_ollama_reports_known_confidences_and_coverage(fake_ollama, tmp_path):
    """Scripted log-probabilities: the registered model set is right on every held-out row and 80 %
    sure of it; the report, predictions.csv and calibration.json carry exactly that."""
    df = _frame()
    truth = dict(zip(df["formatted_prompt"], df["Standardized_Rating"].astype(int)))
    fake_ollama.chat_responder = ScriptedModels(df, good_model="llama3.2-1b-dataset:latest")
    fake_ollama.probs_responder = _probs_for(truth, 0.8)
    out = tmp_path / "out"
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    assert ok
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")][1:]
    assert {(c["logprobs"], c["top_logprobs"]) for c in chats} == {(True, 20)}
    report = json.loads((out / "evaluation.json").read_text())
    by_key = {m["key"]: m for m in report["models"]}
    new, base = by_key["new"], by_key["base"]
    n = report["n"]
    assert (new["confidence"]["available"], new["confidence"]["source"]) == (
        n, "Ollama's token log-probabilities (/api/chat logprobs)")
    assert new["confidence"]["calibration"]["ece_before"] == pytest.approx(0.2)  # 80 % sure, always right
    t = new["confidence"]["calibration"]["temperature"]
    assert t < 1 and new["confidence"]["calibration"]["ece_after"] < 0.2  # right every time: sharpened
    assert base["confidence"]["available"] == 0  # prose answers: no rating, no confidence
    coverage = {r["threshold"]: r for r in new["confidence"]["coverage"]}
    assert (coverage[0.5]["accepted"], coverage[0.5]["share"], coverage[0.5]["kappa"]) == (n, 1.0, 1.0)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    calibrated = conf.with_temperature({1: 0.8, 0: 0.1, -1: 0.1}, t)[1]
    assert {r["new_confidence"] for r in rows} == {str(round(calibrated, 4))}
    assert {r["base_confidence"] for r in rows} == {""}
    assert json.loads((out / "calibration.json").read_text())["temperature"] == t
    md = (out / "evaluation.md").read_text()
    assert "| accept when confidence ≥ |" in md and f"| 0.50 | {n} (100%) | 1.00" in md


def test_a_build_whose_evaluation_gets_a_log_probability_of_710_publishes_its_model_set(fake_ollama, tmp_path):
    """Ollama answering the held-out rows with a log-probability of 710 at the rating (which raised
    OverflowError and stopped the job): the model set is built and evaluated, with no confidence."""
    df = _frame()
    truth = dict(zip(df["formatted_prompt"], df["Standardized_Rating"].astype(int)))
    fake_ollama.chat_responder = ScriptedModels(df, good_model="llama3.2-1b-dataset:latest")
    fake_ollama.probs_responder = _probs_for(truth, 0.8)
    fake_ollama.logprobs_edit = lambda tokens: with_rating_logprob(tokens, 710.0)
    out = tmp_path / "out"
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    assert (ok, meta["approach"], meta["evaluation"]["status"]) == (True, "model_set", "done")
    new = json.loads((out / "evaluation.json").read_text())["models"][0]
    assert (new["confidence"]["available"], new["kappa"]) == (0, 1.0)
    assert not (out / "calibration.json").exists()


def test_rating_applies_the_calibration_and_sends_unsure_records_to_review(fake_openai, tmp_path):
    """A model set folder with calibration.json rated through the openai backend with scripted
    log-probabilities: the confidence column is each record's calibrated probability, and
    --review-below's needs_review.csv holds exactly the invalid and the unsure records, with the
    input's own columns, the model's rating and an empty Expert Rating for the experts."""
    df = _frame().head(40)
    folder = tmp_path / "model"
    ok, _ = FineTuner(config={"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5,
                                         "register": "off"}, "evaluation": {"enabled": "off"},
                              "paths": {"root": str(tmp_path)}}).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=folder)
    assert ok
    (folder / "calibration.json").write_text(json.dumps({"temperature": 2.0}))
    rows = list(synthetic_rows(12, 23))
    source = tmp_path / "new.csv"
    with open(source, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    sure = {row[1]: (0.97 if i % 3 else 0.6) for i, row in enumerate(rows)}
    fake_openai.models = ["llama3.2:1b"]
    fake_openai.responder = lambda model, messages, body: (
        "no idea" if messages[-1]["content"] == rows[4][1]
        else json.dumps({"rationale": "r",
                         "rating": int(rows[[r[1] for r in rows].index(messages[-1]["content"])][3])}))
    fake_openai.probs_responder = lambda model, messages: {
        v: (sure[messages[-1]["content"]] if v == int(next(r for r in rows if r[1] == messages[-1]["content"])[3])
            else (1 - sure[messages[-1]["content"]]) / 2) for v in VALUES}
    cfg = load_config(None, {}, overrides={"openai": {"base_url": fake_openai.url},
                                           "ollama": {"host": "http://127.0.0.1:9", "retries": 0},
                                           "paths": {"root": str(tmp_path)}})
    model = model_from_folder(folder)
    assert model.temperature == 2.0
    output = tmp_path / "new.ratings.csv"
    summary = route_for_review(rate_file(model, source, output, cfg, backend="openai"), source, output, 0.8)
    rated = list(csv.DictReader(output.open()))

    def calibrated(p):
        return conf.with_temperature({1: p, 0: (1 - p) / 2, -1: (1 - p) / 2}, 2.0)[1]
    expected = ["" if i == 4 else f"{calibrated(sure[row[1]]):.4f}" for i, row in enumerate(rows)]
    assert [r["confidence"] for r in rated] == expected
    review = list(csv.DictReader((tmp_path / "new.needs_review.csv").open()))
    # the invalid answer first, then the unsure ones (all equally unsure: in file order)
    unsure = sorted((i for i, c in enumerate(expected) if c == "" or float(c) < 0.8), key=lambda i: i != 4)
    assert [r["Row_ID"] for r in review] == [rows[i][0] for i in unsure]
    assert list(review[0]) == ["Row_ID", "formatted_prompt", *REVIEW_COLUMNS]
    assert {r["Expert Rating"] for r in review} == {""}
    assert [r["formatted_prompt"] for r in review] == [rows[i][1] for i in unsure]
    assert summary["needs_review"] == {
        "threshold": 0.8, "records": len(unsure), "invalid": 1, "without_confidence": 1, "order": ORDER_RULE,
        "grouped_by": {"column": None, "reason": "no known diagnosis column (name a column with evaluation.group_by)"},
        "file": "new.needs_review.csv"}
    assert summary["confidence"]["source"] == "the server's token log-probabilities (logprobs)"


def test_an_impossible_log_probability_gives_no_confidence_and_a_huge_one_no_overflow():
    """A server's log-probability above 0, huge, infinite or NaN makes the answer's tokens unusable
    (no confidence; the rating stands); the softmax itself is scaled by the largest term, so
    log-probabilities of 710 or of -800 give the values' probabilities rather than an
    OverflowError or nothing."""
    answer = json.dumps({"rationale": "r", "rating": 1})
    for bad in (710.0, 1e308, math.inf, math.nan, 0.5):
        assert conf.token_entries(with_rating_logprob(token_logprobs(answer, {1: 0.6, 0: 0.4}, 20), bad)) is None
    assert conf.token_entries(token_logprobs(answer, {1: 0.6, 0: 0.4}, 20)) is not None
    big = [('{"rating": ', 0.0, []), ("1", 710.0, [("0", 709.0), ("-1", 0.0)]), ("}", 0.0, [])]
    z = 1 + math.exp(-1) + math.exp(-710)
    assert conf.probabilities_from_tokens(big, VALUES) == pytest.approx(
        {-1: math.exp(-710) / z, 0: math.exp(-1) / z, 1: 1 / z}, rel=1e-12)
    tiny = [('{"rating": ', 0.0, []), ("0", -800.0, [("1", -801.0)]), ("}", 0.0, [])]
    assert conf.probabilities_from_tokens(tiny, VALUES) == pytest.approx(
        {-1: 0.0, 0: 1 / (1 + math.exp(-1)), 1: math.exp(-1) / (1 + math.exp(-1))}, rel=1e-12)


def _rate_cli(tmp_path, backend: str, url: str, model: str = "llama3.2:1b") -> subprocess.CompletedProcess:
    """`rate` through the named backend's fake, as a user runs it: a bare model (with the mapping
    and topic) or an output folder."""
    source = tmp_path / "new.csv"
    with open(source, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([HEADER, *synthetic_rows(6, 5)])
    (tmp_path / "m.json").write_text(json.dumps(MAPPING))
    bare = ["--mapping", str(tmp_path / "m.json"), "--topics", "respiratory infections"] if ":" in model else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__RETRIES": "0",
           "FINE_TUNER_OLLAMA__HOST": url if backend == "ollama" else "http://127.0.0.1:9",
           **({"FINE_TUNER_OPENAI__BASE_URL": url} if backend == "openai" else {})}
    return subprocess.run([sys.executable, "-m", "daemon", "rate", "--model", model, *bare, "--input", str(source),
                           "--backend", backend], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("logprob", [710.0, 1e308, math.nan], ids=["710", "1e308", "nan"])
@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_rate_through_a_server_sending_impossible_log_probabilities_rates_every_record(
        tmp_path, fake_ollama, fake_openai, backend, logprob):
    """Ollama or an OpenAI-compatible server answering with a log-probability of 710, 1e308 or NaN
    at the rating: `rate` exits 0 with every record rated, an empty confidence column and the plain
    note, and no traceback."""
    rows = list(synthetic_rows(6, 5))
    truth = {row[1]: int(row[3]) for row in rows}
    fake_openai.models = ["llama3.2:1b"]
    fake_openai.responder = lambda model, messages, body: json.dumps(
        {"rationale": "r", "rating": truth[messages[-1]["content"]]})
    fake_ollama.chat_responder = lambda model, messages: json.dumps(
        {"rationale": "r", "rating": truth[messages[-1]["content"]]})
    for fake in (fake_ollama, fake_openai):
        fake.probs_responder = lambda model, messages: {v: 0.9 if v == truth[messages[-1]["content"]] else 0.05
                                                        for v in VALUES}
        fake.logprobs_edit = lambda tokens: with_rating_logprob(tokens, logprob)
    res = _rate_cli(tmp_path, backend, fake_ollama.url if backend == "ollama" else fake_openai.url)
    assert (res.returncode, "Traceback" in res.stderr) == (0, False), res.stderr
    assert res.stdout.splitlines()[0] == f"rated: 6 of 6 records with llama3.2:1b ({backend})"
    assert f"confidence: the {backend} backend gave no probabilities: the confidence column is empty" in res.stdout
    with open(tmp_path / "new.ratings.csv", newline="", encoding="utf-8") as fh:
        rated = [(r["rating"], r["confidence"]) for r in csv.DictReader(fh)]
    assert rated == [(str(int(row[3])), "") for row in rows]


def test_a_calibration_temperature_outside_0001_to_1000_is_refused_by_name(tmp_path, fake_ollama):
    """calibration.json with a temperature of 1e-320 (which made every confidence NaN) or 1e6:
    the model folder is refused with the file, the key and the range, before anything is rated."""
    from daemon.quality.ratefile import ModelFolderError

    folder = tmp_path / "model"
    ok, _ = FineTuner(config={"ollama": {"host": fake_ollama.url, "retries": 0, "register": "off"},
                              "evaluation": {"enabled": "off"}, "paths": {"root": str(tmp_path)}}).process_dataset(
        _frame().head(40), "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=folder)
    assert ok
    for bad in (1e-320, 1e6):
        (folder / "calibration.json").write_text(json.dumps({"temperature": bad}))
        with pytest.raises(ModelFolderError) as info:
            model_from_folder(folder)
        assert (info.value.file, info.value.key, info.value.message) == (
            "calibration.json", "temperature",
            "calibration.json in the model folder model: temperature: must be a number from 0.001 to 1000")
    (folder / "calibration.json").write_text(json.dumps({"temperature": 1e-320}))
    res = _rate_cli(tmp_path, "ollama", fake_ollama.url, model=str(folder))
    assert (res.returncode, res.stdout, res.stderr) == (1, "", (
        "fine-tuner: error: calibration.json in the model folder model: temperature: must be a number from 0.001 "
        f"to 1000 ({FOLDER_HINT})\n"))
    assert fake_ollama.requests_to("/api/chat") == []
    with pytest.raises(ValueError, match="a calibration temperature must be a number from 0.001 to 1000"):
        conf.with_temperature({1: 0.9, 0: 0.1}, 1e-320)
