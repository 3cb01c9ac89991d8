"""Tests for daemon/data/visits.py: the rated respiratory-infection visits of the answer-quality benchmark."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from daemon.data.dataset import load_dataset
from daemon.data.synthetic import synthetic_rows
from daemon.data.visits import (
    DIAGNOSIS_COLUMN,
    HEADER,
    MAPPING,
    VOCABULARIES,
    generate_visits,
    label_counts,
    noisy_count,
    write_csv,
)

CODE = re.compile(r"\b[A-Z]\d{2}(?:\.[0-9A-Z]{1,4})?\b")  # an ICD-10-CM code: J18.9, U07.1, S93.401A, I10
LABEL_OF = {value: label for label, value in MAPPING.items()}
CHANGEABLE = {"Expert Rating", "Standardized_Rating", "Rationale_of_Rating"}


def ratings(rows: list[dict]) -> dict[int, int]:
    return dict(sorted(Counter(int(r["Standardized_Rating"]) for r in rows).items()))


def rendered(row: dict) -> str:
    """The prompt the built-in syndromic template makes of a row (empty cells leave their line out)."""
    lines = [("Age", "Age"), ("Sex", "Sex"), ("ChiefComplaintOrig", "Chief complaint"),
             ("TriageNotes", "Triage notes"), ("DischargeDiagnosis", "Discharge diagnosis")]
    return "\n".join(f"{name}: {row[c]}" for c, name in lines if row[c])


def negated(row: dict, vocabulary: str) -> bool:
    text = f"{row['ChiefComplaintOrig']} {row['TriageNotes']}".lower()
    return any(n.text.lower() in text for n in VOCABULARIES[vocabulary].negations)


def test_same_arguments_give_the_same_rows():
    """The same (n, seed, vocabulary) gives equal rows; another seed or vocabulary gives other rows."""
    first = generate_visits(200, seed=3, vocabulary="a", noise=0.1)
    assert generate_visits(200, seed=3, vocabulary="a", noise=0.1) == first
    assert generate_visits(200, seed=4, vocabulary="a", noise=0.1) != first
    assert generate_visits(200, seed=3, vocabulary="b", noise=0.1) != first
    assert len(first) == 200
    assert len({r["C_BioSense_ID"] for r in first}) == 200


def test_rows_hold_exactly_the_syndromic_export_columns():
    """Every row has the built-in template's columns plus the rating columns, every value a string."""
    assert HEADER == ("C_BioSense_ID", "Age", "Sex", "ChiefComplaintOrig", "TriageNotes", "DischargeDiagnosis",
                      "Expert Rating", "Standardized_Rating", "Rationale_of_Rating")
    assert DIAGNOSIS_COLUMN == "DischargeDiagnosis"
    assert MAPPING == {"Match": 1, "Does Not Match": 0, "Unknown": -1}
    for vocabulary in ("a", "b"):
        rows = generate_visits(300, seed=1, vocabulary=vocabulary, noise=0.1)
        assert {tuple(r) for r in rows} == {HEADER}
        assert {type(v) for r in rows for v in r.values()} == {str}
        assert [r for r in rows if MAPPING[r["Expert Rating"]] != int(r["Standardized_Rating"])] == []


@pytest.mark.parametrize("vocabulary", ["a", "b"])
def test_written_csv_loads_through_the_product_loader(tmp_path, vocabulary):
    """A written CSV loads through load_dataset with the built-in template (codes as written): all 300 rows usable, the
    exact ratings, ids, rationales and prompts, no conflicts, no leftover temporary file."""
    rows = generate_visits(300, seed=8, vocabulary=vocabulary, noise=0.1)
    path = tmp_path / f"visits-{vocabulary}.csv"
    assert write_csv(path, rows) == str(path)
    ds = load_dataset(path, mapping=MAPPING, code_knowledge="off")
    assert (ds.rows_read, ds.rows_used) == (300, 300)
    assert ds.dropped == {"empty_prompt": 0, "empty_rating": 0}
    assert ds.label_distribution == ratings(rows)
    assert sum(ds.label_distribution.values()) == 300
    assert ds.columns == {"prompt": "formatted_prompt", "rating": "Standardized_Rating",
                          "rationale": "Rationale_of_Rating", "id": "C_BioSense_ID"}
    assert ds.prompt_source["builtin"] is True
    assert ds.warnings == ["the prompts were built from the built-in syndromic-surveillance template (the file "
                           "has no formatted_prompt or Prompt column)"]
    assert ds.conflicting_duplicates == 0
    assert ds.frame["row_id"].tolist() == [r["C_BioSense_ID"] for r in rows]
    assert ds.frame["rating"].tolist() == [int(r["Standardized_Rating"]) for r in rows]
    assert ds.frame["rationale"].tolist() == [r["Rationale_of_Rating"] for r in rows]
    assert ds.frame["prompt"].tolist() == [rendered(r) for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_clean_labels_follow_the_unknown_share_exactly():
    """Without noise the rating counts are exact: round(n * unknown_share) Unknown, the rest split
    between Match (the odd one) and Does Not Match."""
    assert label_counts(500, 0.1) == {1: 225, 0: 225, -1: 50}
    assert label_counts(501, 0.25) == {1: 188, 0: 188, -1: 125}
    for vocabulary in ("a", "b"):
        assert ratings(generate_visits(500, seed=2, vocabulary=vocabulary)) == {-1: 50, 0: 225, 1: 225}
        assert ratings(generate_visits(501, seed=2, vocabulary=vocabulary, unknown_share=0.25)) == {
            -1: 125, 0: 188, 1: 188}
        assert ratings(generate_visits(40, seed=2, vocabulary=vocabulary, unknown_share=0.0)) == {0: 20, 1: 20}


@pytest.mark.parametrize(("vocabulary", "expected"), [("a", {-1: 185, 0: 403, 1: 412}),
                                                      ("b", {-1: 209, 0: 392, 1: 399})])
def test_noise_changes_exactly_its_share_of_labels(vocabulary, expected):
    """noise=0.2 changes exactly 200 of 1000 labels and nothing else of those rows; each changed row
    gets a second reviewer's rationale, and the Unknown count stays within the bounds the changes allow."""
    clean = generate_visits(1000, seed=4, vocabulary=vocabulary)
    noisy = generate_visits(1000, seed=4, vocabulary=vocabulary, noise=0.2)
    changed = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a["Standardized_Rating"] != b["Standardized_Rating"]]
    assert noisy_count(1000, 0.2) == len(changed) == 200
    assert [i for i, (a, b) in enumerate(zip(clean, noisy))
            if {k: v for k, v in a.items() if k not in CHANGEABLE} != {k: v for k, v in b.items()
                                                                        if k not in CHANGEABLE}] == []
    assert [i for i in changed if not noisy[i]["Rationale_of_Rating"].startswith("On second review")] == []
    assert [i for i in range(1000) if i not in changed and noisy[i] != clean[i]] == []
    unknown = ratings(clean)[-1]
    assert unknown == 100
    assert unknown - min(200, unknown) <= ratings(noisy)[-1] <= unknown + 200
    assert ratings(noisy) == expected


@pytest.mark.parametrize("vocabulary", ["a", "b"])
def test_every_row_has_a_rationale_naming_its_diagnosis(vocabulary):
    """Every rationale is one non-empty sentence, and one that rates a coded visit names its primary code."""
    rows = generate_visits(600, seed=6, vocabulary=vocabulary)
    assert [r for r in rows if not r["Rationale_of_Rating"].strip()] == []
    assert [r for r in rows if not r["Rationale_of_Rating"].endswith(".")] == []
    coded = [r for r in rows if r[DIAGNOSIS_COLUMN]]
    assert [r for r in coded if CODE.findall(r[DIAGNOSIS_COLUMN])[0] not in r["Rationale_of_Rating"]] == []
    uncoded = {r["Expert Rating"] for r in rows if not r[DIAGNOSIS_COLUMN]}
    assert uncoded == ({"Unknown"} if vocabulary == "b" else set())


def test_vocabularies_share_no_diagnosis_code_and_no_chief_complaint():
    """Vocabularies a and b write disjoint diagnosis codes and chief complaints, each every code it
    declares, and neither reuses a chief complaint of the tiny test model's synthetic data."""
    a = generate_visits(2000, seed=11, vocabulary="a", noise=0.1)
    b = generate_visits(2000, seed=11, vocabulary="b", noise=0.1)
    codes_a = {c for r in a for c in CODE.findall(r[DIAGNOSIS_COLUMN])}
    codes_b = {c for r in b for c in CODE.findall(r[DIAGNOSIS_COLUMN])}
    assert (codes_a, codes_b) == (VOCABULARIES["a"].codes(), VOCABULARIES["b"].codes())
    assert codes_a & codes_b == set()
    assert {"J18.9", "J06.9", "U07.1", "S93.401A", "N39.0"} <= codes_a
    complaints_a = {r["ChiefComplaintOrig"] for r in a}
    complaints_b = {r["ChiefComplaintOrig"] for r in b}
    assert complaints_a & complaints_b == set()
    assert VOCABULARIES["a"].complaints() & VOCABULARIES["b"].complaints() == set()
    synthetic = {re.search(r"chief complaint: (.*?)\. Triage", row[1]).group(1) for row in synthetic_rows(2000)}
    assert (complaints_a | complaints_b) & synthetic == set()


@pytest.mark.parametrize(("vocabulary", "expected"), [("a", {"Does Not Match": 472, "Match": 180}),
                                                      ("b", {"Does Not Match": 502, "Match": 156})])
def test_negated_findings_appear_under_both_ratings(vocabulary, expected):
    """Negations ("denies fever or cough", "no SOB", "neg for flu") appear in rows rated Does Not Match,
    whose rationale starts from the denial, and in rows a respiratory diagnosis still makes a Match."""
    rows = generate_visits(2000, seed=11, vocabulary=vocabulary)
    with_negation = [r for r in rows if negated(r, vocabulary)]
    assert dict(Counter(r["Expert Rating"] for r in with_negation)) == expected
    denials = tuple(n.denied[0].upper() + n.denied[1:] for n in VOCABULARIES[vocabulary].negations)
    assert [r for r in with_negation
            if r["Expert Rating"] == "Does Not Match" and not r["Rationale_of_Rating"].startswith(denials)] == []
    assert [r for r in with_negation if r["Expert Rating"] == "Match"
            and "is a respiratory infection" not in r["Rationale_of_Rating"]] == []


def test_vocabulary_a_writes_shorthand_and_misspellings():
    """Vocabulary a writes shorthand negations, abbreviations and misspellings of real triage text."""
    rows = generate_visits(2000, seed=11, vocabulary="a")
    text = " ".join(f"{r['ChiefComplaintOrig']} {r['TriageNotes']}" for r in rows)
    missing = [w for w in ("denies fever or cough", "no SOB", "neg for flu", "c/o", "x3d", "URI", "r/o", "w/",
                         "b/l", "hx", "feaver", "cought", "diffculty breathing") if w not in text]
    assert missing == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 5, "vocabulary": "c"}, "vocabulary must be one of a, b"),
    ({"n": -1}, "n must be a non-negative integer"),
    ({"n": 5, "unknown_share": 1.5}, "unknown_share must be between 0 and 1"),
    ({"n": 5, "noise": -0.1}, "noise must be between 0 and 1"),
])
def test_bad_arguments_are_refused(kwargs, message):
    """An unknown vocabulary, a negative n or a share outside [0, 1] is a ValueError saying which."""
    with pytest.raises(ValueError) as info:
        generate_visits(seed=1, **kwargs)
    assert str(info.value) == message
