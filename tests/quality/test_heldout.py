"""Evaluating a job's models on its held-out rows through the Ollama backend (a loopback fake)."""

from __future__ import annotations

import csv
import json
import threading
import time

import pandas as pd
import pytest

from daemon.data import prompts
from daemon.config import load_config
from daemon.errors import EvaluationError
from daemon.quality.heldout import EvaluationSkipped, evaluate_folder
from daemon.fine_tuner import FineTuner
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows

ROWS = 120
MARKER = "ZZPATIENTMARKER"


def _frame() -> pd.DataFrame:
    df = pd.DataFrame(list(synthetic_rows(ROWS, 7)), columns=HEADER)
    df["formatted_prompt"] = df["formatted_prompt"] + f" {MARKER}"
    return df


def _config(tmp_path, fake_ollama, **evaluation) -> dict:
    return {"ollama": {"host": fake_ollama.url, "connect_timeout_s": 2.0, "read_timeout_s": 5.0, "retries": 0,
                       "register": "auto", "parallel": 3},
            "evaluation": evaluation, "paths": {"root": str(tmp_path)}}


class ScriptedModels:
    """The fake's answers: the registered model set answers like the experts, the base model
    answers prose (invalid), and it records how many chats run at once."""

    def __init__(self, df: pd.DataFrame, good_model: str) -> None:
        self.truth = dict(zip(df["formatted_prompt"], df["Standardized_Rating"].astype(int)))
        self.good_model = good_model
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def __call__(self, model: str, messages: list) -> str:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.01)
            if messages[-1]["role"] != "user" or len(messages) < 2:
                return "no"
            if model == self.good_model:
                return json.dumps({"rating": self.truth.get(messages[-1]["content"], 0), "rationale": "x"})
            return f"It looks like a match to me {MARKER}"
        finally:
            with self.lock:
                self.in_flight -= 1


def test_model_set_is_evaluated_through_ollama_beside_the_base_model(fake_ollama, tmp_path):
    """A registered model set is rated on its held-out rows through /api/chat (schema as format,
    temperature 0, fixed seed, a shared prefix, bounded concurrency); the report files hold its
    metrics beside the base model's, whose prose answers all count as invalid."""
    df = _frame()
    scripted = ScriptedModels(df, good_model="llama3.2-1b-dataset:latest")
    fake_ollama.chat_responder = scripted
    out = tmp_path / "out"
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    assert ok is True and meta["registration"]["registered"] is True
    assert meta["evaluation"]["status"] == "done"
    report = json.loads((out / "evaluation.json").read_text())
    new, measured, base = report["models"]
    n = meta["split"]["validation_rows"]
    assert (report["n"], new["key"], measured["key"], base["key"]) == (n, "new", "baseline", "base")
    assert (measured["backend"], measured["model"], measured["invalid"]) == ("baseline", "baseline.json", 0)
    assert (new["accuracy"], new["kappa"], new["invalid"]) == (1.0, 1.0, 0)
    assert (base["accuracy"], base["invalid"], base["invalid_rate"]) == (0.0, n, 1.0)
    assert (new["backend"], new["model"], base["model"]) == ("ollama", "llama3.2-1b-dataset:latest", "llama3.2:1b")
    chats = [r.body for r in fake_ollama.requests_to("/api/chat")][1:]  # the first: registration's check
    assert len(chats) == 2 * n
    schema = prompts.output_schema(sorted(MAPPING.values()))
    options = {"temperature": 0, "seed": 42, "num_predict": 96}  # num_predict: evaluation.max_new_tokens
    assert all((c["format"], c["options"], c["stream"]) == (schema, options, False)
               for c in chats)
    by_model = {}
    for c in chats:
        by_model.setdefault(c["model"], []).append(c["messages"])
    # the registered model set holds its few-shot turns: it gets the system prompt and the record
    assert {len(m) for m in by_model["llama3.2-1b-dataset:latest"]} == {2}
    assert len({json.dumps(m[:-1]) for m in by_model["llama3.2:1b"]}) == 1  # one identical prefix
    assert 1 < scripted.most_in_flight <= 3
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [int(r["row"]) for r in rows] == meta["split"]["validation_source_rows"]
    assert {r["base_valid"] for r in rows} == {"false"} and {r["new_valid"] for r in rows} == {"true"}
    for name in ("evaluation.json", "evaluation.md", "predictions.csv"):
        assert MARKER not in (out / name).read_text()
    log_text = (tmp_path / "fine_tuner.log").read_text()
    events = [json.loads(line) for line in log_text.splitlines()]
    [started] = [e for e in events if e["event"] == "evaluation_started"]
    [finished] = [e for e in events if e["event"] == "evaluation_finished"]
    assert (started["backend"], started["rows"], started["models"]) == ("ollama", n, ["new", "base"])
    assert finished["models"] == [{"model": "new", "accuracy": 1.0, "kappa": 1.0, "invalid_rate": 0.0},
                                  {"model": "baseline", "accuracy": measured["accuracy"], "kappa": measured["kappa"],
                                   "invalid_rate": 0.0},
                                  {"model": "base", "accuracy": 0.0, "kappa": 0.0, "invalid_rate": 1.0}]
    assert finished["topic"] == "respiratory infections"  # the metrics' kappa label
    progress = [e for e in events if e["event"] == "evaluation_progress"]
    assert {(e["model"], e["done"], e["total"]) for e in progress} >= {("new", n, n), ("base", n, n)}
    assert MARKER not in log_text
    assert sorted(meta["artifacts"]) == sorted([
        "Modelfile", "baseline.json", "calibration.json", "confusion_matrix.png", "evaluation.json", "evaluation.md",
        "fine_tuning_metadata.json", "model_set_config.json", "predictions.csv", "validation_data.jsonl"])


def test_evaluate_again_later_and_cap_rows(fake_ollama, tmp_path):
    """evaluate_folder re-runs on a finished folder (here with max_rows), and the explicit local
    backend without weights is a skip naming the reason."""
    df = _frame()
    fake_ollama.chat_responder = ScriptedModels(df, good_model="llama3.2-1b-dataset:latest")
    out = tmp_path / "out"
    cfg = _config(tmp_path, fake_ollama)
    FineTuner(config=cfg).process_dataset(df, "llama3.2:1b", MAPPING, "flu", approach="model_set", output_dir=out)
    meta = json.loads((out / "fine_tuning_metadata.json").read_text())
    report = evaluate_folder(out, meta, load_config(None, {}, overrides=cfg), max_rows=5)
    assert [(m["key"], m["n"]) for m in report["models"]] == [("new", 5), ("baseline", 5), ("base", 5)]
    assert report["_predictions"]["rows"] == sorted(report["_predictions"]["rows"])
    with pytest.raises(EvaluationSkipped) as info:
        evaluate_folder(out, meta, load_config(None, {}, overrides=cfg), backend="local")
    assert info.value.reason.startswith("no backend can run the evaluation (local: ")


def test_required_evaluation_fails_the_job_when_no_backend_can_run(tmp_path):
    """evaluation.enabled: required with Ollama down and no weights on disk fails the job with an
    EvaluationError and leaves no output folder; auto records the skip and succeeds."""
    cfg = {"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
           "evaluation": {"enabled": "required"}, "paths": {"root": str(tmp_path)}}
    with pytest.raises(EvaluationError) as info:
        FineTuner(config=cfg).process_dataset(_frame(), "llama3.2:1b", MAPPING, "flu", approach="model_set",
                                              output_dir=tmp_path / "req")
    assert "no backend can run the evaluation" in str(info.value)
    assert MARKER not in str(info.value)
    assert not (tmp_path / "req").exists()
    cfg["evaluation"]["enabled"] = "auto"
    ok, meta = FineTuner(config=cfg).process_dataset(_frame(), "llama3.2:1b", MAPPING, "flu",
                                                     approach="model_set", output_dir=tmp_path / "auto")
    assert ok is True and meta["evaluation"]["status"] == "skipped"
    assert not (tmp_path / "auto" / "evaluation.json").exists()


@pytest.mark.parametrize("answer, valid", [
    ('{"rationale": "cough", "rating": 1}', True),
    ('{"rating": 1}', True),  # the rating-only form
    ('{"rationale": 5, "rating": 1}', True),  # the rating counts, not the rationale
    ('{"rationale": "", "rating": 7}', False),  # off the scale
    ("It looks like a match", False),
    ('{"rating": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}", False),  # JSON nested 5,000 deep
], ids=["reasoned", "rating_only", "rationale_not_text", "off_the_scale", "prose", "nested_json_bomb"])
def test_registration_check_and_evaluation_judge_an_answer_alike(fake_ollama, tmp_path, answer, valid):
    """Every chat answered with the same text: registration's check and the evaluation give it the
    same verdict (valid, or every held-out answer invalid), and a nested-JSON bomb fails neither."""
    reply = {"model": "m", "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": answer},
             "done": True, "done_reason": "stop"}
    fake_ollama.hostile["/api/chat"] = "body"  # sent as is: no num_predict cut, as a real server may
    fake_ollama.hostile_bodies["/api/chat"] = json.dumps(reply).encode()
    out = tmp_path / "out"
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama, compare="none")).process_dataset(
        _frame(), "llama3.2:1b", MAPPING, "flu", approach="model_set", output_dir=out)
    new = json.loads((out / "evaluation.json").read_text())["models"][0]
    n = meta["split"]["validation_rows"]
    assert (ok, meta["registration"]["check"]["ok"], new["key"]) == (True, valid, "new")
    assert new["invalid"] == (0 if valid else n)


def _visits_job(tmp_path, fake_ollama, **values):
    """A model-set job on 300 generated ED visits (raw export columns, ICD-10 diagnoses), planned
    from files as the daemon plans it, with the fake answering like the experts."""
    from daemon.data.jobsettings import job_settings
    from daemon.data.dataset import load_dataset
    from daemon.data.visits import MAPPING as VISIT_MAPPING, generate_visits, write_csv
    from daemon.fine_tuner import JobInputs

    csv_path = write_csv(tmp_path / "visits.csv", generate_visits(300, seed=3))
    (tmp_path / "visits.mapping.json").write_text(json.dumps(VISIT_MAPPING))
    frame = load_dataset(csv_path, mapping=VISIT_MAPPING).frame
    fake_ollama.chat_responder = lambda model, messages: json.dumps(
        {"rating": int(dict(zip(frame["prompt"], frame["rating"])).get(messages[-1]["content"], 0)), "rationale": ""})
    tuner = FineTuner(config=_config(tmp_path, fake_ollama, enabled="required"))
    settings = job_settings(tuner.config.defaults, {"model": "llama3.2:1b", "topics": "respiratory infections",
                                                    "approach": "model_set", **values}, source="test")
    plan = tuner.plan_job(JobInputs(csv_path=tmp_path / "visits.csv", mapping_path=tmp_path / "visits.mapping.json",
                                    settings=settings, output_dir=tmp_path / "out", stem="visits", staged=True))
    ok, meta = tuner.execute(plan)
    assert ok
    return frame, meta, tmp_path / "out"


def test_a_job_holds_out_whole_diagnosis_groups_and_reports_both_figures(fake_ollama, tmp_path):
    """By default the rows are grouped by the diagnosis' ICD-10 category: no held-out new-kinds row
    shares a category with a training row, and the report, the metadata and the status brief give
    the familiar and the new-kinds figures side by side."""
    from daemon.inbox.status import _evaluation_brief

    frame, meta, out = _visits_job(tmp_path, fake_ollama, topic_definition="Match: the diagnosis is a "
                                                                            "respiratory infection.")
    split = meta["split"]
    assert split["kind"] == "grouped" and split["grouping"]["column"] == "DischargeDiagnosis"
    group_of = dict(zip(frame["source_row"], frame["group"]))
    held = split["validation_source_rows"]
    familiar, new_kinds = held[:split["familiar_rows"]], held[split["familiar_rows"]:]
    assert len(new_kinds) == split["new_kinds_rows"] > 0
    trained = set(frame["source_row"]) - set(held)
    assert len(trained) == split["train_rows"]
    assert not {group_of[r] for r in new_kinds} & {group_of[r] for r in trained}
    report = json.loads((out / "evaluation.json").read_text())
    assert {name: report["figures"][name]["n"] for name in ("familiar", "new_kinds")} == {
        "familiar": len(familiar), "new_kinds": len(new_kinds)}
    learned = {g["key"]: g["learned_examples_more_than_rule"] for g in report["generalisation"]}
    assert (learned["new"], learned["base"]) == (False, False)
    assert "## Familiar records and new kinds of records" in (out / "evaluation.md").read_text()
    brief = _evaluation_brief(out, meta)
    assert brief["new"]["kappa_new_kinds"] == 1.0 and brief["split"]["kind"] == "grouped"
    system = json.loads((out / "model_set_config.json").read_text())["system_prompt"]
    assert "How the experts decide:\nMatch: the diagnosis is a respiratory infection." in system


def test_group_by_none_in_a_job_keeps_the_random_split(fake_ollama, tmp_path):
    _frame_, meta, out = _visits_job(tmp_path, fake_ollama, group_by="none")
    assert (meta["split"]["kind"], meta["split"]["new_kinds_rows"]) == ("random", 0)
    assert meta["split"]["grouping"] == {"column": None, "reason": "turned off (group_by: none)"}
    report = json.loads((out / "evaluation.json").read_text())
    assert "figures" not in report and report["split"]["kind"] == "random"


def test_every_evaluation_measures_the_bag_of_words_baseline_and_the_verdict_weighs_it(fake_ollama, tmp_path):
    """A job's baseline is fitted on exactly its training rows and scored beside the models on the same
    familiar and new-kinds rows; a model that answers no better than chance loses to it, and the
    verdict says to use the baseline."""
    from daemon.quality import baseline

    frame, meta, out = _visits_job(tmp_path, fake_ollama)
    assert (meta["baseline"]["fitted"], meta["baseline"]["train_rows"]) == (True, meta["split"]["train_rows"])
    report = json.loads((out / "evaluation.json").read_text())
    assert [m["key"] for m in report["models"]] == ["new", "baseline", "base"]
    measured = report["models"][1]
    # the same figures as a classifier fitted here on the same training rows and scored on the held-out ones
    held = set(meta["split"]["validation_source_rows"])
    train = frame[~frame["source_row"].isin(held)]
    rows = frame.set_index("source_row").loc[meta["split"]["validation_source_rows"]]
    refit = baseline.fit(train["prompt"].tolist(), train["rating"].astype(int).tolist())
    from sklearn.metrics import cohen_kappa_score
    assert measured["kappa"] == round(
        cohen_kappa_score(rows["rating"].astype(int), refit.predict(rows["prompt"].tolist())), 4)
    assert [m["key"] for m in report["figures"]["new_kinds"]["models"]] == ["new", "baseline", "base"]
    assert measured["backend"] == "baseline" and measured["invalid"] == 0
    assert "bag-of-words baseline" in (out / "evaluation.md").read_text()
    # a model answering 0 to everything: the baseline agrees better, the verdict says to use it
    fake_ollama.chat_responder = lambda model, messages: json.dumps({"rating": 0, "rationale": ""})
    from daemon.config import load_config
    report = evaluate_folder(out, json.loads((out / "fine_tuning_metadata.json").read_text()),
                             load_config(None, {}, overrides=_config(tmp_path, fake_ollama)), backend="ollama")
    verdict = report["verdict"]
    assert verdict["recommended"] is False and verdict["use_baseline"] is True
    assert any(p.startswith("a bag-of-words classifier trained on the same rows (kappa ") and
               p.endswith(") agrees better with the experts") for p in verdict["problems"])
    assert verdict["headline"].endswith("Use the bag-of-words classifier instead: it agrees better than every "
                                        "model measured (fine-tuner rate --backend baseline).")


def test_rate_with_the_baseline_needs_no_server_and_gives_its_probabilities_as_confidence(fake_ollama, tmp_path):
    """`fine-tuner rate --backend baseline` rates new visits with the folder's bag-of-words classifier
    while no model server answers: every record valid, its confidence the classifier's probability."""
    import subprocess
    import sys

    from daemon.data.visits import generate_visits, write_csv
    from daemon.quality.baseline import Baseline

    _, _, out = _visits_job(tmp_path, fake_ollama)
    visits = generate_visits(50, seed=21, vocabulary="b")
    write_csv(tmp_path / "new.csv", visits)
    config = tmp_path / "offline.yaml"
    config.write_text(f"ollama:\n  host: http://127.0.0.1:9\npaths:\n  root: {tmp_path}\n")
    res = subprocess.run([sys.executable, "-m", "daemon", "rate", "--config", str(config), "--model", str(out),
                          "--input", str(tmp_path / "new.csv"), "--backend", "baseline"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "new.ratings.csv", newline="", encoding="utf-8") as fh:
        rated = list(csv.DictReader(fh))
    summary = json.loads((tmp_path / "new.ratings.summary.json").read_text())
    assert (summary["backend"], summary["rated"], summary["invalid"]) == ("baseline", 50, 0)
    assert [r["C_BioSense_ID"] for r in rated] == [v["C_BioSense_ID"] for v in visits]
    from daemon.data.dataset import load_dataset
    from daemon.data.visits import MAPPING as VISIT_MAPPING

    fitted = Baseline.from_json(json.loads((out / "baseline.json").read_text()))
    probs = fitted.probabilities(
        load_dataset(str(tmp_path / "new.csv"), mapping=VISIT_MAPPING).frame["prompt"].tolist())
    assert [int(r["rating"]) for r in rated] == [max(p, key=p.get) for p in probs]
    assert all(r["valid"] == "true" and abs(float(r["confidence"]) - max(p.values())) < 1e-3
               for r, p in zip(rated, probs))
    assert {r["model"] for r in rated} == {"bag-of-words baseline"}
