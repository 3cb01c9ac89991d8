"""needs_review.csv: its columns, the order the experts rate in (invalid first, least confident first,
spread over the kinds of records), each record's reason, and the file read back as training data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from daemon.data.csvfile import csv_text
from daemon.data.dataset import load_dataset
from daemon.data.visits import MAPPING as VISIT_MAPPING, generate_visits, write_csv
from daemon.quality.ratefile import OUTPUT_COLUMNS
from daemon.quality.review import (BLOCK_RULE, ORDER_RULE, REVIEW_COLUMNS, Candidate, Placed, review_order,
                                   write_needs_review)
from tests.conftest import leftovers

ROOT = Path(__file__).resolve().parents[2]
MARKER = "ZZPATIENTMARKER"
TAIL = ["Expert Rating", "Rationale_of_Rating", "Model Rating", "Model Label", "Model Confidence",
        "Model Rationale", "Review Rank", "Review Reason"]
BY_BLOCK = "DischargeDiagnosis's ICD-10-CM block"
# (diagnosis, valid, confidence) of each input row; the last one had an empty prompt (nobody asked)
ROWS = [("J21.9 Bronchiolitis", True, "0.4100"), ("J20.9 Acute bronchitis", True, "0.3000"),
        ("I10 Essential hypertension", True, "0.5000"), ("J06.9 Acute URI", False, ""),
        ("R05.9 Cough", True, "0.9500"), ("I10 Hypertension", True, "0.2000"), ("", True, "0.3300"),
        ("J11.1 Influenza", True, ""), ("Z99.89 Dependence", False, ""), ("J18.9 Pneumonia", True, None)]


def _files(folder: Path, rows=ROWS, *, site: bool = False) -> tuple[Path, Path]:
    """An input with an id, text, diagnosis, rating, rationale and Expert Rating column (and a Site
    column with ``site``), and its ratings.csv as rate_file writes it."""
    header = ["C_BioSense_ID", "ChiefComplaint", "DischargeDiagnosis", "Standardized_Rating", "Rationale_of_Rating",
              "Expert Rating", *(["Site"] if site else []), "Note"]
    records = [[f"B-{i}", f"-cough {MARKER} {i}", dx, "1", f"old reason {MARKER}", "Match",
                *([f"site {i % 2}"] if site else []), f"note {i}"] for i, (dx, _, _) in enumerate(rows)]
    rated = [[f"B-{i}", *(["", "", "", "false", "", ""] if sure is None else
                          ["1", "Match", f"-because {i}", "true", "m", sure] if valid else
                          ["", "", "", "false", "m", ""])] for i, (_, valid, sure) in enumerate(rows)]
    source, ratings = folder / "new.csv", folder / "ratings.csv"
    source.write_text(csv_text([header, *records]))
    ratings.write_text(csv_text([["C_BioSense_ID", *OUTPUT_COLUMNS], *rated]))
    return source, ratings


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_needs_review_keeps_the_inputs_columns_then_the_experts_and_the_models(tmp_path):
    """The input's own columns in its order (its Standardized_Rating, rationale and Expert Rating left
    out), then Expert Rating and Rationale_of_Rating empty, then the model's rating, label,
    confidence and rationale, the rank and the reason; read across chunks, nothing left behind."""
    source, ratings = _files(tmp_path)
    write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9, chunk_rows=3)
    with open(tmp_path / "needs_review.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == ["C_BioSense_ID", "ChiefComplaint", "DischargeDiagnosis", "Note", *TAIL]
    assert list(REVIEW_COLUMNS) == TAIL
    first = _read(tmp_path / "needs_review.csv")[0]
    assert first == {"C_BioSense_ID": "B-3", "ChiefComplaint": f"'-cough {MARKER} 3",
                     "DischargeDiagnosis": "J06.9 Acute URI", "Note": "note 3", "Expert Rating": "",
                     "Rationale_of_Rating": "", "Model Rating": "", "Model Label": "", "Model Confidence": "",
                     "Model Rationale": "", "Review Rank": "1",
                     "Review Reason": f"invalid answer (kind 1 of 6 by {BY_BLOCK})"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needs_review.csv", "new.csv", "ratings.csv"]
    assert leftovers(tmp_path) == []


def test_invalid_answers_first_then_least_confident_first_spread_over_the_kinds(tmp_path):
    """Invalid answers, then those without a confidence, then the least confident, one record of
    each ICD-10-CM block in turn (J20.9 and J21.9 are one kind, a cell without a code another);
    each reason names its kind by number and column only, and the summary holds no cell value."""
    source, ratings = _files(tmp_path)
    counts = write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9, chunk_rows=4)
    review = _read(tmp_path / "needs_review.csv")
    assert [(r["C_BioSense_ID"], r["Review Rank"], r["Review Reason"]) for r in review] == [
        ("B-3", "1", f"invalid answer (kind 1 of 6 by {BY_BLOCK})"),
        ("B-8", "2", f"invalid answer (kind 2 of 6 by {BY_BLOCK})"),
        ("B-7", "3", f"valid answer without a confidence (kind 3 of 6 by {BY_BLOCK})"),
        ("B-5", "4", f"confidence 0.20, the least sure of its kind (kind 4 of 6 by {BY_BLOCK})"),
        ("B-1", "5", f"confidence 0.30, the least sure of its kind (kind 5 of 6 by {BY_BLOCK})"),
        ("B-6", "6", f"confidence 0.33, the least sure of its kind (kind 6 of 6 by {BY_BLOCK})"),
        ("B-0", "7", f"confidence 0.41, the 2nd least sure of its kind (kind 5 of 6 by {BY_BLOCK})"),
        ("B-2", "8", f"confidence 0.50, the 2nd least sure of its kind (kind 4 of 6 by {BY_BLOCK})")]
    assert [(r["Model Rating"], r["Model Confidence"], r["Model Rationale"]) for r in review[3:5]] == [
        ("1", "0.2000", "'-because 5"), ("1", "0.3000", "'-because 1")]
    assert counts == {"threshold": 0.9, "records": 8, "invalid": 2, "without_confidence": 3, "order": ORDER_RULE,
                      "grouped_by": {"column": "DischargeDiagnosis", "rule": BLOCK_RULE,
                                     "chosen_by": "a known diagnosis column", "kinds": 6}}
    assert MARKER not in json.dumps(counts) and not any(
        word in r["Review Reason"] for r in review for word in (MARKER, "Bronch", "Hypertension", "J20", "I10"))


def test_without_a_column_to_group_by_the_order_is_by_confidence_alone(tmp_path):
    """group_by none: invalid first, then the least confident first, whatever the diagnosis; the
    summary says why there is no grouping."""
    source, ratings = _files(tmp_path)
    counts = write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9, group_by="none")
    review = _read(tmp_path / "needs_review.csv")
    assert [(r["C_BioSense_ID"], r["Review Reason"]) for r in review] == [
        ("B-3", "invalid answer"), ("B-8", "invalid answer"), ("B-7", "valid answer without a confidence"),
        ("B-5", "confidence 0.20, least confident first (no column to group the records by)"),
        ("B-1", "confidence 0.30, least confident first (no column to group the records by)"),
        ("B-6", "confidence 0.33, least confident first (no column to group the records by)"),
        ("B-0", "confidence 0.41, least confident first (no column to group the records by)"),
        ("B-2", "confidence 0.50, least confident first (no column to group the records by)")]
    assert counts["grouped_by"] == {"column": None, "reason": "turned off (group_by: none)"}


def test_a_named_group_by_column_groups_by_its_values_and_a_missing_one_falls_back(tmp_path):
    """group_by naming a column of plain values spreads the records over its values (as the held-out
    split groups them); one the file lacks falls back to the diagnosis column and says so."""
    source, ratings = _files(tmp_path, site=True)
    counts = write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9, group_by="SITE")
    review = _read(tmp_path / "needs_review.csv")
    assert [(r["C_BioSense_ID"], r["Review Reason"]) for r in review][3:] == [
        ("B-5", "confidence 0.20, the least sure of its kind (kind 1 of 2 by Site's value)"),
        ("B-6", "confidence 0.33, the least sure of its kind (kind 2 of 2 by Site's value)"),
        ("B-1", "confidence 0.30, the 2nd least sure of its kind (kind 1 of 2 by Site's value)"),
        ("B-0", "confidence 0.41, the 2nd least sure of its kind (kind 2 of 2 by Site's value)"),
        ("B-2", "confidence 0.50, the 3rd least sure of its kind (kind 2 of 2 by Site's value)")]
    assert counts["grouped_by"] == {"column": "Site", "rule": "the cell's value", "chosen_by": "evaluation.group_by",
                                    "kinds": 2}
    counts = write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9, group_by="Ward")
    assert counts["grouped_by"] == {"column": "DischargeDiagnosis", "rule": BLOCK_RULE,
                                    "chosen_by": "a known diagnosis column", "kinds": 6,
                                    "note": "the group_by column 'Ward' is not in the file"}


def test_review_order_without_kinds_ignores_the_candidates_kinds():
    """The ordering function the benchmark calls: with no grouping named, kinds are not spread."""
    candidates = [Candidate(0, False, 0.2, "a"), Candidate(1, False, 0.3, "a"), Candidate(2, False, 0.4, "b")]
    assert [p.row for p in review_order(candidates, "Dx's value")] == [0, 2, 1]
    assert review_order(candidates) == [
        Placed(0, 1, "confidence 0.20, least confident first (no column to group the records by)"),
        Placed(1, 2, "confidence 0.30, least confident first (no column to group the records by)"),
        Placed(2, 3, "confidence 0.40, least confident first (no column to group the records by)")]


def _fill_in(path: Path, labels: dict[str, str], reasons: dict[str, str], id_column: str) -> None:
    """What an expert does in a spreadsheet: Expert Rating and Rationale_of_Rating typed in, saved as is."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    at, label, why = (rows[0].index(c) for c in (id_column, "Expert Rating", "Rationale_of_Rating"))
    for row in rows[1:]:
        row[label], row[why] = labels[row[at]], reasons[row[at]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def test_a_reviewed_raw_export_loads_as_training_data_with_the_mapping(tmp_path):
    """Generated visits (a raw export: no prompt column) sent to review, Expert Rating filled in: the
    file loads with the mapping as the same records, prompts built by the built-in template as from
    the export itself, the experts' labels as ratings and their rationale; the model's and the
    review's columns are passed over."""
    visits = generate_visits(12, seed=5)
    source = Path(write_csv(tmp_path / "new.csv", visits))
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(csv_text([["C_BioSense_ID", *OUTPUT_COLUMNS],
                                 *([v["C_BioSense_ID"], "1", "Match", f"-model {i}", "true", "m", f"0.{i + 10}"]
                                   for i, v in enumerate(visits))]))
    counts = write_needs_review(source, ratings, tmp_path / "needs_review.csv", 0.9)
    assert counts["records"] == 12
    labels = {v["C_BioSense_ID"]: v["Expert Rating"] for v in visits}
    _fill_in(tmp_path / "needs_review.csv", labels, {k: f"expert on {k}" for k in labels}, "C_BioSense_ID")
    reviewed = load_dataset(tmp_path / "needs_review.csv", mapping=VISIT_MAPPING)
    original = load_dataset(source, mapping=VISIT_MAPPING)
    got = reviewed.frame.set_index("row_id")
    want = original.frame.set_index("row_id").loc[got.index]
    assert (got["prompt"].tolist(), got["rating"].tolist()) == (want["prompt"].tolist(), want["rating"].tolist())
    assert got["rationale"].tolist() == [f"expert on {k}" for k in got.index]
    assert sorted(got.index) == sorted(labels)
    assert reviewed.warnings == original.warnings


def test_rate_review_below_through_the_cli_ranks_records_and_reads_back_as_training_data(tmp_path, fake_ollama):
    """`python -m daemon rate --review-below 0.9` through the loopback Ollama: needs_review.csv has
    the contract's columns, ranks the invalid answer first and spreads the unsure records over the
    diagnosis blocks, rating_summary.json gives the counts and the rule, no cell value reaches a
    log line, stdout or the summary; filled in, the file loads as training data with the mapping."""
    dx = ["J21.9", "J20.9", "I10", "J06.9", "I10", "J21.9"]
    sure = [0.5, 0.4, 0.3, None, 0.35, 0.99]
    header = ["Row_ID", "formatted_prompt", "DischargeDiagnosis", "Standardized_Rating", "Rationale_of_Rating"]
    prompts = [f"visit {i} {MARKER}" for i in range(len(dx))]
    (tmp_path / "new.csv").write_text(csv_text([header, *([f"r{i}", p, d, "", f"{MARKER} old"]
                                                          for i, (p, d) in enumerate(zip(prompts, dx)))]))
    (tmp_path / "m.json").write_text(json.dumps({"Match": 1, "Does Not Match": 0, "Unknown": -1}))
    at = {p: i for i, p in enumerate(prompts)}
    fake_ollama.chat_responder = lambda model, messages: (
        "no idea" if sure[at[messages[-1]["content"]]] is None
        else json.dumps({"rationale": f"-model {MARKER}", "rating": 1}))
    fake_ollama.probs_responder = lambda model, messages: (
        None if sure[at[messages[-1]["content"]]] is None else
        {1: sure[at[messages[-1]["content"]]], 0: 1 - sure[at[messages[-1]["content"]]], -1: 0.0})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__RETRIES": "0",
           "FINE_TUNER_OLLAMA__HOST": fake_ollama.url, "LOGS_DIRECTORY": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "daemon", "rate", "--model", "llama3.2:1b", "--mapping", "m.json",
                          "--topics", "respiratory infections", "--input", "new.csv", "--backend", "ollama",
                          "--review-below", "0.9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    logged = (tmp_path / "fine_tuner.log").read_text()
    assert '"event": "review_routed"' in logged and MARKER not in res.stdout + res.stderr + logged
    review = _read(tmp_path / "new.needs_review.csv")
    assert list(review[0]) == ["Row_ID", "formatted_prompt", "DischargeDiagnosis", *TAIL]
    assert [(r["Row_ID"], r["Review Rank"], r["Model Rationale"]) for r in review] == [
        ("r3", "1", ""), ("r2", "2", f"'-model {MARKER}"), ("r1", "3", f"'-model {MARKER}"),
        ("r4", "4", f"'-model {MARKER}"), ("r0", "5", f"'-model {MARKER}")]
    assert [r["Review Reason"] for r in review][1:3] == [
        f"confidence 0.30, the least sure of its kind (kind 2 of 3 by {BY_BLOCK})",
        f"confidence 0.40, the least sure of its kind (kind 3 of 3 by {BY_BLOCK})"]
    summary_text = (tmp_path / "new.ratings.summary.json").read_text()
    assert MARKER not in summary_text
    assert json.loads(summary_text)["needs_review"] == {
        "threshold": 0.9, "records": 5, "invalid": 1, "without_confidence": 1, "order": ORDER_RULE,
        "grouped_by": {"column": "DischargeDiagnosis", "rule": BLOCK_RULE, "chosen_by": "a known diagnosis column",
                       "kinds": 3},
        "file": "new.needs_review.csv"}
    _fill_in(tmp_path / "new.needs_review.csv", {f"r{i}": "Unknown" for i in range(6)},
             {f"r{i}": f"expert {i}" for i in range(6)}, "Row_ID")
    frame = load_dataset(tmp_path / "new.needs_review.csv", tmp_path / "m.json").frame
    assert (frame["row_id"].tolist(), frame["prompt"].tolist(), frame["rating"].tolist(),
            frame["rationale"].tolist()) == (["r3", "r2", "r1", "r4", "r0"], [prompts[i] for i in (3, 2, 1, 4, 0)],
                                             [-1] * 5, [f"expert {i}" for i in (3, 2, 1, 4, 0)])
