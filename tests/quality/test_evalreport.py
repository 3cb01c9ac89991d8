"""Agreement metrics and the report files (daemon/quality/evalreport.py)."""

from __future__ import annotations

import csv
import json

import pytest

from daemon.quality.evalreport import (
    adapter_effect,
    ModelResult,
    evaluation_report,
    markdown,
    metadata_summary,
    score,
    summary_line,
    table_text,
    write_report,
)
from daemon.data.synthetic import MAPPING

EXPERT = [1, 1, 1, 0, 0, 0, -1, -1]
PREDICTED = [1, 1, 0, 0, 0, None, -1, 1]  # 5 right, one invalid, two wrong


def _report(**kw):
    result = ModelResult("new", "model set", "tiny:latest", PREDICTED, [0.1] * 7 + [0.5], 2.0, "local")
    base = ModelResult("base", "base model (zero-shot)", "tiny:latest", [None] * 8, [0.2] * 8, 4.0, "local")
    return evaluation_report([result, base], EXPERT, list(range(1, 9)), MAPPING, seed=7, source="test",
                             created_at="2026-11-29T00:00:00Z", **kw)


def test_metrics_equal_hand_computed_values():
    """Accuracy, kappa, macro-F1, per-label scores and the confusion matrix match the values worked
    out by hand for a fixed 8-row table (invalid answers count as wrong)."""
    report = _report()
    new = report["models"][0]
    assert (new["n"], new["accuracy"], new["kappa"], new["macro_f1"]) == (8, 0.625, 0.4545, 0.6667)
    assert (new["invalid"], new["invalid_rate"]) == (1, 0.125)
    assert new["per_label"] == [
        {"label": "Unknown", "rating": -1, "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
        {"label": "Does Not Match", "rating": 0, "precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3},
        {"label": "Match", "rating": 1, "precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3},
    ]
    assert new["confusion_matrix"] == {"rows": ["Unknown", "Does Not Match", "Match"],
                                       "columns": ["Unknown", "Does Not Match", "Match", "invalid"],
                                       "counts": [[1, 0, 1, 0], [0, 2, 0, 1], [0, 1, 2, 0]]}
    assert report["majority_class"] == {"label": "Match", "rating": 1, "accuracy": 0.375}
    assert (new["latency_s"], new["records_per_s"]) == ({"p50": 0.1, "p95": 0.36}, 4.0)
    lo, hi = new["accuracy_ci95"]
    assert lo < 0.625 < hi and 0.0 <= lo and hi <= 1.0


def test_all_invalid_answers_score_zero_and_bootstrap_is_seeded():
    """A model that never answers validly has accuracy 0 and invalid rate 1; the same seed gives
    the same intervals."""
    first, second = _report(), _report()
    base = first["models"][1]
    assert (base["accuracy"], base["invalid"], base["invalid_rate"], base["macro_f1"]) == (0.0, 8, 1.0, 0.0)
    assert base["kappa"] == 0.0
    assert first["models"][0]["kappa_ci95"] == second["models"][0]["kappa_ci95"]


FORTY_EXPERT = [-1, 1, 1, -1, 0, 1, 0, 1, 1, -1, 1, -1, 0, 0, 1, -1, -1, 1, 0, 1, 1, 0, 0, 1, -1, -1, 1, -1,
                1, 0, 1, -1, 1, -1, -1, 1, -1, 0, -1, 0]
FORTY_PREDICTED = [-1, None, None, -1, None, 0, -1, 1, 1, -1, 1, 1, 0, 1, 1, -1, -1, 1, -1, 0, 1, 0, 0, 1, -1,
                   -1, 1, 1, 1, 0, None, -1, None, -1, -1, -1, -1, 0, -1, 1]


@pytest.mark.parametrize("expert, predicted, seed, accuracy_ci, kappa_ci", [
    (EXPERT, PREDICTED, 7, [0.25, 0.875], [-0.0435, 0.8222]),
    (FORTY_EXPERT, FORTY_PREDICTED, 42, [0.5, 0.8], [0.283, 0.6893]),
    ([1, 1, 1, 1, 0], [1, 1, 1, 1, 0], 5, [1.0, 1.0], [1.0, 1.0]),  # one-class resamples have no kappa
    (EXPERT, [None] * 8, 7, [0.0, 0.0], [0.0, 0.0]),
])
def test_bootstrap_intervals_are_the_per_round_scikit_learn_numbers(expert, predicted, seed, accuracy_ci, kappa_ci):
    """The bootstrap intervals are the numbers that scikit-learn's accuracy and kappa over the whole
    scale gave in each of the 1,000 seeded rounds (values recorded from that implementation)."""
    result = ModelResult("new", "model set", "tiny:latest", predicted, [0.1] * len(expert), 1.0, "local")
    scored = score(result, expert, MAPPING, seed=seed)
    assert (scored["accuracy_ci95"], scored["kappa_ci95"]) == (accuracy_ci, kappa_ci)


def test_report_files_hold_no_text_and_read_back(tmp_path):
    """The four report files are written; predictions.csv has ratings, validity and confidence only
    (empty: these results carry no probabilities)."""
    names = write_report(_report(), tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert [m["title"] for m in data["models"]] == ["model set", "base model (zero-shot)"]
    assert "_predictions" not in data
    rows = list(csv.reader((tmp_path / "predictions.csv").open()))
    assert rows[0] == ["row", "expert_rating", "new_rating", "new_valid", "new_confidence", "base_rating",
                       "base_valid", "base_confidence"]
    assert rows[6] == ["6", "0", "", "false", "", "", "false", ""]
    assert rows[1] == ["1", "1", "1", "true", "", "", "false", ""]
    md = (tmp_path / "evaluation.md").read_text()
    assert "| accuracy (95% CI) | 0.62 (" in md and "| Cohen's kappa (95% CI) | 0.45 (" in md
    assert "| Unknown | 1 | 0 | 1 | 0 |" in md
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HOSTILE = {"Match|<img src=x onerror=alert(1)>": 1, "[x](javascript:alert(1))": 0,
           "two\nlines $\\nosuchcommand$ *b* _i_ & more": -1}


def test_hostile_labels_titles_and_file_names_are_escaped_in_markdown(tmp_path):
    """Labels, a model title and the source file name with pipes, newlines, HTML, link and math
    syntax become escaped text in evaluation.md and the console table; the figure draws a label
    with $...$ as written instead of failing on it as mathtext."""
    result = ModelResult("new", "fine|tune\n## injected", "tiny:latest", PREDICTED, [0.1] * 8, 2.0, "local")
    report = evaluation_report([result], EXPERT, list(range(1, 9)), HOSTILE, seed=7, source="val<1>|x.jsonl",
                               created_at="2026-11-29T00:00:00Z")
    write_report(report, tmp_path)
    a = "Match\\|&lt;img src=x onerror=alert(1)&gt;"
    b = "\\[x\\](javascript:alert(1))"
    c = "two lines \\$\\\\nosuchcommand\\$ \\*b\\* \\_i\\_ &amp; more"
    md = (tmp_path / "evaluation.md").read_text().splitlines()
    assert md[2] == ("8 held-out rows the models never saw in training (val&lt;1&gt;\\|x.jsonl). Always answering "
                     f"the most common expert rating (\"{a}\") would score accuracy 0.38.")
    assert md[4] == "| | fine\\|tune ## injected |"
    start = md.index("## fine\\|tune ## injected: confusion matrix (rows: expert, columns: model)")
    assert md[start + 2:start + 13] == [
        f"| expert \\ model | {c} | {b} | {a} | invalid |",
        "|---|---|---|---|---|",
        f"| {c} | 1 | 0 | 1 | 0 |",
        f"| {b} | 0 | 2 | 0 | 1 |",
        f"| {a} | 0 | 1 | 2 | 0 |",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        f"| {c} | 1.00 | 0.50 | 0.67 | 2 |",
        f"| {b} | 0.67 | 0.67 | 0.67 | 3 |",
        f"| {a} | 0.67 | 0.67 | 0.67 | 3 |"]
    assert table_text(report).splitlines()[4] == "| | fine\\|tune ## injected |"
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_csv_writes_formula_like_row_ids_as_text(tmp_path):
    """A row id a spreadsheet would run as a formula gets a leading single quote in predictions.csv;
    numbers, negative ratings included, stay numbers."""
    rows = ["=cmd|' /C calc'!A0", "-3", "+1.5", "@SUM(A1)", "5", "6", "7", "\t=1"]
    report = evaluation_report([ModelResult("new", "model set", "tiny", PREDICTED, [0.1] * 8, 2.0, "local")],
                               EXPERT, rows, MAPPING, seed=7, source="test", created_at="2026-11-29T00:00:00Z")
    write_report(report, tmp_path)
    with open(tmp_path / "predictions.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [
            ["row", "expert_rating", "new_rating", "new_valid", "new_confidence"],
            ["'=cmd|' /C calc'!A0", "1", "1", "true", ""], ["-3", "1", "1", "true", ""],
            ["+1.5", "1", "0", "true", ""], ["'@SUM(A1)", "0", "0", "true", ""], ["5", "0", "0", "true", ""],
            ["6", "0", "", "false", ""], ["7", "-1", "-1", "true", ""], ["'\t=1", "-1", "1", "true", ""]]


def test_an_adapter_that_changed_nothing_is_flagged_in_the_report():
    """A fine-tune whose answers equal the base model's on every row is flagged, in evaluation.json
    and at the top of evaluation.md; one differing row clears it."""
    same = adapter_effect(['{"rating": 1}', '{"rating": 0}'], ['{"rating": 1}', '{"rating": 0}'])
    differs = adapter_effect(['{"rating": 1}', '{"rating": 1}'], ['{"rating": 1}', '{"rating": 0}'])
    assert (same["ignored"], same["identical_answers"], differs["ignored"], differs["identical_answers"]) == (
        True, 2, False, 1)
    labels = {"No": 0, "Yes": 1}
    result = ModelResult("new", "fine-tune", "m", [1, 0], [0.1, 0.1], 0.2, "local")
    report = evaluation_report([result], [1, 0], [1, 2], labels, seed=1, source="v.jsonl", created_at="t",
                               adapter_check=same)
    assert report["adapter_effect"] == same
    assert markdown(report).splitlines()[2] == (
        "**Warning: the fine-tune answered exactly like the base model on all 2 held-out rows: its adapter "
        "had no effect (not loaded, or trained to nothing); do not use this model.**")


def _two_kinds_report():
    """60 familiar rows the fine-tune gets right and 60 new kinds it mostly gets wrong; the base
    model is as poor on both."""
    expert = [1, 0, -1] * 40
    sets = ["familiar"] * 60 + ["new_kinds"] * 60
    shift = {1: 0, 0: -1, -1: 1}  # a wrong rating for three rows in four
    fine = expert[:60] + [shift[e] if i % 4 else e for i, e in enumerate(expert[60:])]
    base = [0] * 120
    results = [ModelResult("new", "fine-tune", "m", fine, [0.1] * 120, 1.0, "local"),
               ModelResult("base", "base model (zero-shot)", "m", base, [0.1] * 120, 1.0, "local")]
    split = {"kind": "grouped", "familiar_rows": 60, "new_kinds_rows": 60, "groups": 24, "held_out_groups": 3,
             "grouping": {"column": "DischargeDiagnosis", "rule": "ICD-10 category",
                          "chosen_by": "a known diagnosis column"},
             "duplicate_rows": 5, "duplicates_set_aside": 2}
    return evaluation_report(results, expert, list(range(1, 121)), MAPPING, seed=42, source="validation_data.jsonl",
                             created_at="2026-01-01T00:00:00Z", sets=sets, split=split)


def test_familiar_and_new_kinds_are_scored_apart_and_a_gap_is_said_in_plain_words(tmp_path):
    """Each model gets a kappa on each set, equal to scoring that set alone; a fine-tune perfect on
    familiar rows and poor on new kinds is flagged as having learned the examples more than the rule."""
    report = _two_kinds_report()
    fig = report["figures"]
    assert (fig["familiar"]["n"], fig["new_kinds"]["n"]) == (60, 60)
    alone = score(ModelResult("new", "fine-tune", "m", report["_predictions"]["models"]["new"][60:], [], 1.0, "local"),
                  report["_predictions"]["expert"][60:], MAPPING, seed=42)
    assert fig["new_kinds"]["models"][0]["kappa"] == alone["kappa"]
    assert fig["familiar"]["models"][0]["kappa"] == 1.0
    gap = {g["key"]: g for g in report["generalisation"]}
    assert gap["new"]["learned_examples_more_than_rule"] is True
    assert "learned the examples more than the rule" in gap["new"]["message"]
    assert gap["base"]["learned_examples_more_than_rule"] is False
    write_report(report, tmp_path)
    md = (tmp_path / "evaluation.md").read_text()
    assert "## Familiar records and new kinds of records" in md
    assert "60 new kinds of records (3 of 24 groups of the column \"DischargeDiagnosis\"" in md
    assert "2 held-out copies were set aside" in md
    assert "## Familiar records" in table_text(report) and "confusion matrix" not in table_text(report)
    line = {m["model"]: m for m in summary_line(report)}
    assert line["new"]["kappa_familiar"] == 1.0 and line["new"]["kappa_new_kinds"] == alone["kappa"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["split"]["kind"] == "grouped"
    summary = metadata_summary(report, [])
    assert (summary["split"], summary["learned_examples_more_than_rule"]) == ("grouped", ["new"])


def test_a_random_split_has_one_figure_and_says_why():
    result = ModelResult("new", "model set", "m", PREDICTED, [0.1] * 8, 2.0, "local")
    report = evaluation_report([result], EXPERT, list(range(1, 9)), MAPPING, seed=42, source="v", created_at="t",
                               split={"kind": "random",
                                      "grouping": {"column": None, "reason": "no known diagnosis column"},
                                      "duplicate_rows": 0, "duplicates_set_aside": 0})
    assert "figures" not in report and "generalisation" not in report
    assert "Held-out rows: a random split only (no known diagnosis column)" in markdown(report)
