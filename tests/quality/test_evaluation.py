"""Answer parsing, agreement metrics and the report files (daemon/quality/evaluation.py)."""

from __future__ import annotations

import csv
import json

import pytest

from daemon.quality.evaluation import ModelResult, evaluation_report, parse_answer, write_report
from daemon.data.synthetic import MAPPING

VALUES = sorted(MAPPING.values())
EXPERT = [1, 1, 1, 0, 0, 0, -1, -1]
PREDICTED = [1, 1, 0, 0, 0, None, -1, 1]  # 5 right, one invalid, two wrong


@pytest.mark.parametrize("text, expected", [
    ('{"rating": 1, "rationale": "cough"}', 1),
    ('  {"rating": -1}\n', -1),
    ('{"rating": 2, "rationale": ""}', None),  # not a mapping value
    ('{"rating": "1"}', None),  # a string, not an integer
    ('{"rating": true}', None),  # a bool is not a rating
    ('{"rating": 1.0}', None),
    ('[1]', None),
    ('Rating: 1', None),  # never dug out with a regex
    ('```json\n{"rating": 1}\n```', None),
    ('{"rationale": "no rating"}', None),
    ('', None),
    (None, None),
])
def test_parse_answer_is_strict(text, expected):
    """Only a JSON object whose rating is one of the mapping's values is valid."""
    assert parse_answer(text, VALUES) == expected


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


def test_report_files_hold_no_text_and_read_back(tmp_path):
    """The four report files are written; predictions.csv has ratings and validity only."""
    names = write_report(_report(), tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert [m["title"] for m in data["models"]] == ["model set", "base model (zero-shot)"]
    assert "_predictions" not in data
    rows = list(csv.reader((tmp_path / "predictions.csv").open()))
    assert rows[0] == ["row", "expert_rating", "new_rating", "new_valid", "base_rating", "base_valid"]
    assert rows[6] == ["6", "0", "", "false", "", "false"]
    assert rows[1] == ["1", "1", "1", "true", "", "false"]
    md = (tmp_path / "evaluation.md").read_text()
    assert "| accuracy (95% CI) | 0.62 (" in md and "| Cohen's kappa (95% CI) | 0.45 (" in md
    assert "| Unknown | 1 | 0 | 1 | 0 |" in md
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
