"""The verdict on an evaluation, in words from the measured figures, and the quality gate that keeps
a model below the floor out of Ollama (through the loopback fake)."""

from __future__ import annotations

import json

import pytest

from daemon.errors import EvaluationError
from daemon.fine_tuner import FineTuner
from daemon.inbox.status import format_status
from daemon.quality.trust import Thresholds, band, quality_gate, verdict
from tests.quality.test_heldout import ScriptedModels, _config, _frame
from daemon.data.synthetic import MAPPING


def _model(key, title, kappa, ci, accuracy, acc_ci, invalid_rate=0.0):
    return {"key": key, "title": title, "kappa": kappa, "kappa_ci95": ci, "accuracy": accuracy,
            "accuracy_ci95": acc_ci, "invalid_rate": invalid_rate}


def _report(new, base, n=80, figures=None, **extra):
    return {"n": n, "models": [new, base], "majority_class": {"label": "Match", "rating": 1, "accuracy": 0.5},
            **({"figures": figures} if figures else {}), **extra}


GOOD = _model("new", "fine-tune", 0.72, [0.6, 0.83], 0.85, [0.77, 0.92])
BASE = _model("base", "base model (zero-shot)", 0.02, [-0.1, 0.15], 0.4, [0.3, 0.5], 0.3)


def test_a_model_beyond_every_bar_is_recommended_with_its_reasons():
    v = verdict(_report(GOOD, BASE))
    assert v["recommended"] is True
    assert v["headline"] == (
        "Recommended: the fine-tune shows substantial agreement with the experts on all held-out rows (80): "
        "kappa 0.72 (0.60–0.83); accuracy 0.85 beats always answering \"Match\" (0.50); better than the base "
        "model (kappa 0.02 (-0.10–0.15)), the intervals apart; 0 % of its answers were invalid.")


def test_the_report_that_made_a_new_user_trust_a_bad_model_is_not_recommended():
    """kappa -0.03, accuracy 0.29 where always answering Match scores 0.50, 29 % invalid."""
    bad = _model("new", "fine-tune", -0.03, [-0.2, 0.12], 0.29, [0.2, 0.39], 0.29)
    v = verdict(_report(bad, BASE))
    assert v["recommended"] is False
    assert v["problems"] == [
        "no agreement beyond chance with the experts on all held-out rows (80): kappa -0.03 (-0.20–0.12), below "
        "the 0.60 a recommended model needs",
        "accuracy 0.29 does not beat always answering \"Match\" (0.50) beyond its interval",
        "not better than the base model beyond their intervals (kappa 0.02 (-0.10–0.15))",
        "29 % of its answers were invalid (at most 5 % for a recommended model)"]
    assert v["headline"].startswith("Not recommended: the fine-tune: no agreement beyond chance")


def test_the_verdict_rests_on_the_new_kinds_of_records_when_there_are_enough():
    figures = {"familiar": {"n": 36, "models": [GOOD, BASE]},
               "new_kinds": {"n": 46, "models": [_model("new", "fine-tune", 0.57, [0.38, 0.76], 0.7, [0.6, 0.8]),
                                                 BASE]}}
    v = verdict(_report(GOOD, BASE, n=82, figures=figures))
    assert (v["recommended"], v["basis"], v["kappa"], v["band"]) == (
        False, "new kinds of records (46 rows)", 0.57, "moderate agreement")
    figures["new_kinds"]["n"] = 12  # too few to rest on: all rows
    assert verdict(_report(GOOD, BASE, n=82, figures=figures))["basis"] == "all held-out rows (82)"


def test_too_few_rows_gives_no_verdict_and_the_thresholds_come_from_the_config():
    v = verdict(_report(GOOD, BASE, n=12))
    assert v["recommended"] is None and v["headline"].startswith("Cannot tell yet: only 12 held-out rows")
    strict = verdict(_report(GOOD, BASE), Thresholds(min_kappa=0.8))
    assert strict["recommended"] is False and "below the 0.80 a recommended model needs" in strict["problems"][0]
    assert [band(k) for k in (0.95, 0.7, 0.5, 0.3, 0.1, -0.1, None)] == [
        "almost perfect agreement", "substantial agreement", "moderate agreement", "fair agreement",
        "slight agreement", "no agreement beyond chance", "no measurable agreement"]


def test_an_ignored_adapter_or_examples_learned_over_the_rule_on_all_rows_is_not_recommended():
    v = verdict(_report(GOOD, BASE, adapter_effect={"ignored": True},
                        generalisation=[{"key": "new", "learned_examples_more_than_rule": True}]))
    assert v["recommended"] is False and v["problems"] == [
        "its adapter had no effect: it answered exactly like the base model",
        "it agrees less on new kinds of records than on familiar ones: it learned the examples more than the rule"]


def test_a_gap_between_familiar_records_and_new_kinds_is_a_caution_when_the_verdict_rests_on_the_new_kinds():
    """Perfect on familiar records (an interval of 1.00-1.00) and 0.86 on 46 new kinds: the gap is
    beyond the intervals, but the verdict already rests on the new kinds, so the model is
    recommended on them with the gap said in words; on all held-out rows the gap still withholds it."""
    new_kinds = _model("new", "head", 0.86, [0.74, 0.96], 0.92, [0.85, 0.98])
    figures = {"familiar": {"n": 36, "models": [_model("new", "head", 1.0, [1.0, 1.0], 1.0, [1.0, 1.0]), BASE]},
               "new_kinds": {"n": 46, "models": [new_kinds, BASE]}}
    gap = [{"key": "new", "learned_examples_more_than_rule": True}]
    v = verdict(_report(GOOD, BASE, n=82, figures=figures, generalisation=gap))
    assert (v["recommended"], v["basis"], v["kappa"]) == (True, "new kinds of records (46 rows)", 0.86)
    assert v["headline"].endswith(
        "It agrees less on new kinds of records than on familiar ones (it learned the examples more than the "
        "rule): expect records unlike the training rows to score like the new kinds.")
    figures["new_kinds"]["n"] = 12  # too few to rest on: all rows, where the gap is a reason not to trust it
    v = verdict(_report(GOOD, BASE, n=82, figures=figures, generalisation=gap))
    assert v["recommended"] is False and v["problems"][-1].endswith("it learned the examples more than the rule")


def test_the_gate_is_off_unless_set_and_names_each_failure():
    assert quality_gate(_report(GOOD, BASE), None, None) == {"status": "off"}
    failed = quality_gate(_report(_model("new", "x", 0.4, None, 0.6, None, 0.1), BASE), 0.6, 0.05)
    assert (failed["status"], failed["reason"]) == (
        "failed", "kappa 0.40 on all held-out rows (80) is below evaluation.min_kappa 0.60; 10 % invalid answers "
                  "is above evaluation.max_invalid_rate 5 %")
    assert quality_gate(_report(GOOD, BASE), 0.6, 0.05)["status"] == "passed"


def _always_no(df):
    """The fake's answers: every model answers 'Does Not Match' with a valid answer."""
    no = MAPPING["Does Not Match"]
    return lambda model, messages: json.dumps({"rationale": "x", "rating": no})


def test_a_model_below_the_floor_is_withdrawn_from_ollama_and_the_job_succeeds_saying_so(fake_ollama, tmp_path):
    df = _frame()
    fake_ollama.chat_responder = _always_no(df)
    out = tmp_path / "out"
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama, min_kappa=0.5)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    name = "llama3.2-1b-dataset:latest"
    assert ok is True
    assert (meta["quality_gate"]["status"], meta["quality_gate"]["withdrawn"]) == ("failed", True)
    assert meta["quality_gate"]["reason"].endswith("is below evaluation.min_kappa 0.50")
    assert (meta["registration"]["registered"], meta["registration"]["withdrawn"]) == (False, True)
    assert fake_ollama.get_model(name) is None
    assert [r.body for r in fake_ollama.requests_to("/api/delete")] == [{"model": name}]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["quality_gate"]["status"] == "failed"
    assert "**Quality gate failed: kappa" in (out / "evaluation.md").read_text()
    events = [json.loads(line) for line in (tmp_path / "fine_tuner.log").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "model_withdrawn"] == [name]
    assert [e["event"] for e in events if e["event"].startswith("quality_gate")] == ["quality_gate_failed"]


def test_with_required_evaluation_the_gate_fails_the_job(fake_ollama, tmp_path):
    df = _frame()
    fake_ollama.chat_responder = _always_no(df)
    with pytest.raises(EvaluationError) as info:
        FineTuner(config=_config(tmp_path, fake_ollama, min_kappa=0.5, enabled="required")).process_dataset(
            df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=tmp_path / "o")
    assert info.value.message.startswith("the model did not pass the quality gate: kappa")
    assert fake_ollama.get_model("llama3.2-1b-dataset:latest") is None


def test_a_model_above_the_floor_stays_registered(fake_ollama, tmp_path):
    df = _frame()
    fake_ollama.chat_responder = ScriptedModels(df, good_model="llama3.2-1b-dataset:latest")
    ok, meta = FineTuner(config=_config(tmp_path, fake_ollama, min_kappa=0.5)).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=tmp_path / "o")
    assert (ok, meta["quality_gate"]["status"], meta["registration"]["registered"]) == (True, "passed", True)
    assert fake_ollama.get_model("llama3.2-1b-dataset:latest") is not None
    assert fake_ollama.requests_to("/api/delete") == []


def test_status_shows_the_verdict_and_a_failed_gate():
    report = {"inbox": "inbox", "counts": {"succeeded": 1}, "recent_succeeded": [
        {"job_id": "j1", "approach": "model_set", "output_path": "outputs/j1",
         "evaluation": {"new": {"kappa": -0.03}, "base": {"kappa": 0.02}, "recommended": False,
                        "verdict": "Not recommended: the model set: 29 % of its answers were invalid.",
                        "quality_gate": {"status": "failed",
                                         "reason": "kappa -0.03 is below evaluation.min_kappa 0.60"}}}]}
    assert format_status(report).splitlines()[-3:] == [
        "  j1  model_set -> outputs/j1  kappa -0.03 (base 0.02)",
        "    quality gate failed: kappa -0.03 is below evaluation.min_kappa 0.60",
        "    Not recommended: the model set: 29 % of its answers were invalid."]


def test_too_few_rows_with_the_whole_interval_below_the_bar_is_not_recommended():
    """12 held-out rows are too few to recommend a model, but a kappa interval wholly below the bar
    says enough: not recommended, naming the interval and the bar; one reaching it stays undecided."""
    weak = _model("new", "fine-tune", 0.1, [-0.15, 0.4], 0.5, [0.3, 0.7])
    v = verdict(_report(weak, BASE, n=12))
    problem = ("slight agreement with the experts on all held-out rows (12): kappa 0.10 (-0.15–0.40), the whole "
               "interval below the 0.60 a recommended model needs, even with only 12 held-out rows")
    assert (v["recommended"], v["problems"], v["headline"]) == (
        False, [problem], f"Not recommended: the fine-tune: {problem}.")
    reaching = _model("new", "fine-tune", 0.3, [0.0, 0.6], 0.6, [0.4, 0.8])
    assert verdict(_report(reaching, BASE, n=12))["recommended"] is None
