"""Tests for daemon/data/dataset.py: validation, load_dataset end to end, the bad-input corpus."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daemon.data.dataset import Dataset, load_dataset, validate_frame
from daemon.errors import (
    DatasetError,
    DatasetFormatError,
    LabelRatingMismatchError,
    MappingError,
    MissingColumnError,
    UnmappedRatingError,
)
from daemon.data.mapping import RatingMapping, load_mapping
from daemon.data.synthetic import MAPPING, synthetic_rows
from tests.conftest import write
from tests.corpus import MARKER, write_bad_inputs

# one xdist worker runs the whole module (make test runs the suite on several), so that its
# module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("dataset")

ROOT = Path(__file__).resolve().parents[2]

CORPUS_NAMES = [
    "empty-file", "header-only", "binary-junk", "wrong-delimiter", "missing-columns", "non-numeric-ratings",
    "unmapped-ratings", "invalid-json-mapping", "invalid-yaml-mapping", "yaml-tags", "non-integer-mapping",
    "empty-mapping", "reversed-mapping", "no-mapping", "not-utf8-or-cp1252", "utf16", "unclosed-quote",
    "extra-fields", "no-usable-rows", "inferred-conflict", "wide-header", "huge-cell",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return {case.name: case for case in write_bad_inputs(tmp_path_factory.mktemp("corpus"))}


# --- the bad-input corpus ----------------------------------------------------------------------

def test_corpus_lists_every_case(corpus):
    """write_bad_inputs produces exactly the cases this file checks, with distinct file names."""
    assert sorted(corpus) == sorted(CORPUS_NAMES)
    names = [c.csv.name for c in corpus.values()] + [c.mapping.name for c in corpus.values() if c.mapping]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_case_fails_with_its_error(corpus, name):
    """Each bad input raises exactly its DatasetError subclass with its fragment and no cell value."""
    case = corpus[name]
    with pytest.raises(DatasetError) as info:
        load_dataset(case.csv, case.mapping)
    exc = info.value
    assert type(exc) is case.error
    assert case.fragment in str(exc)
    assert MARKER not in str(exc)
    assert MARKER not in json.dumps(exc.to_dict())
    assert exc.file in {case.csv.name, case.mapping.name if case.mapping else None}


def test_huge_cell_and_wide_header_fail_with_bounded_memory(corpus):
    """A 50 MB cell and a 100k-column header fail while peak RSS grows by less than 40 MiB."""
    files = [(str(corpus[n].csv), str(corpus[n].mapping)) for n in ("huge-cell", "wide-header")]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import pandas, numpy, yaml
        from daemon.data.dataset import load_dataset
        from daemon.errors import DatasetFormatError
        def kib(key):
            for line in open('/proc/self/status'):
                if line.startswith(key + ':'):
                    return int(line.split()[1])
        before = kib('VmRSS')
        for csv_path, mapping in {files!r}:
            try:
                load_dataset(csv_path, mapping)
            except DatasetFormatError:
                pass
            else:
                raise SystemExit('no error')
        print(kib('VmHWM') - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    grown_kib = int(out.stdout.strip())
    assert grown_kib < 40 * 1024, grown_kib


# --- loading and validating files --------------------------------------------------------------

def test_synthetic_dataset_loads_with_exact_counts(synthetic_csv):
    """A generated dataset loads with every row, its label counts, columns, encoding and hash."""
    path = synthetic_csv(rows=120)
    ds = load_dataset(path, mapping=MAPPING)
    expected = [row for row in synthetic_rows(120)]
    assert ds.rows_read == 120
    assert ds.rows_used == 120
    assert ds.dropped == {"empty_prompt": 0, "empty_rating": 0}
    counts: dict[int, int] = {}
    for row in expected:
        counts[int(row[3])] = counts.get(int(row[3]), 0) + 1
    assert ds.label_distribution == dict(sorted(counts.items()))
    assert ds.columns == {"prompt": "formatted_prompt", "rating": "Standardized_Rating",
                          "rationale": "Rationale of Rating", "id": "Row_ID"}
    assert ds.frame["prompt"].tolist() == [row[1] for row in expected]
    assert ds.frame["rating"].tolist() == [int(row[3]) for row in expected]
    assert ds.frame["rationale"].tolist() == [row[4] for row in expected]
    assert ds.frame["row_id"].tolist() == [row[0] for row in expected]
    assert ds.frame["source_row"].tolist() == list(range(1, 121))
    assert ds.frame.index.tolist() == list(range(120))
    assert ds.read_info.encoding == "utf-8"
    assert ds.read_info.delimiter == ","
    assert ds.read_info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.read_info.size_bytes == path.stat().st_size
    assert ds.source == "visits.csv"
    assert ds.warnings == []


def test_rating_spellings_are_accepted(tmp_path):
    """Ratings written 1, 1.0, ' 1 ', -1 and +0 all parse to integers."""
    text = "Prompt,Standardized_Rating\na,1\nb,1.0\nc, 1 \nd,-1\ne,+0\n"
    ds = load_dataset(write(tmp_path / "r.csv", text), mapping=MAPPING)
    assert ds.frame["rating"].tolist() == [1, 1, 1, -1, 0]
    assert str(ds.frame["rating"].dtype) == "int64"
    assert ds.columns["prompt"] == "Prompt"


def test_formatted_prompt_wins_over_prompt(tmp_path):
    """With both prompt columns present, formatted_prompt is used; alternative names are found."""
    text = "C_BioSense_ID,Prompt,formatted_prompt,Standardized_Rating,Rationale_of_Rating\nB1,short,long one,1,why\n"
    ds = load_dataset(write(tmp_path / "both.csv", text), mapping=MAPPING)
    assert ds.columns == {"prompt": "formatted_prompt", "rating": "Standardized_Rating",
                          "rationale": "Rationale_of_Rating", "id": "C_BioSense_ID"}
    assert ds.frame["prompt"].tolist() == ["long one"]
    assert ds.frame["rationale"].tolist() == ["why"]
    assert ds.frame["row_id"].tolist() == ["B1"]


def test_empty_prompts_and_ratings_are_dropped_and_counted(tmp_path):
    """Rows with an empty prompt or rating are dropped, counted by reason and warned about."""
    text = ("formatted_prompt,Standardized_Rating\n"
            "a,1\n  ,1\n,0\nb,\nc,  \nd,0\n")
    ds = load_dataset(write(tmp_path / "drops.csv", text), mapping=MAPPING)
    assert ds.rows_read == 6
    assert ds.rows_used == 2
    assert ds.dropped == {"empty_prompt": 2, "empty_rating": 2}
    assert ds.frame["prompt"].tolist() == ["a", "d"]
    assert ds.frame["source_row"].tolist() == [1, 6]
    assert ds.warnings == ["dropped 2 row(s) with an empty prompt (rows 2, 3)",
                           "dropped 2 row(s) with an empty rating (rows 4, 5)"]
    assert ds.problem_rows == {"empty_prompt": [2, 3], "empty_rating": [4, 5], "conflicting_rating": []}
    assert ds.has_rationale is False
    assert ds.frame["rationale"].tolist() == ["", ""]


def test_conflicting_duplicates_are_counted_and_their_rows_named(tmp_path):
    """Prompts repeated with different ratings are counted once each and their source rows named; agreeing
    repeats are not; an earlier dropped row does not shift the numbers."""
    text = "formatted_prompt,Standardized_Rating\nx,1\n,1\nx,0\ny,1\ny,1\nz,-1\nz,0\nz,1\n"
    ds = load_dataset(write(tmp_path / "dup.csv", text), mapping=MAPPING)
    assert ds.conflicting_duplicates == 2
    assert ds.warnings == ["dropped 1 row(s) with an empty prompt (row 2)",
                           "2 prompt(s) appear more than once with different ratings (rows 1, 3, 6, 7, 8); "
                           "check those rows before training"]
    assert ds.problem_rows == {"empty_prompt": [2], "empty_rating": [], "conflicting_rating": [1, 3, 6, 7, 8]}


def test_row_lists_stop_at_ten_and_hold_no_cell_value(tmp_path):
    """A warning names the first 10 rows then "and N more"; problem_rows keeps them all; no cell text appears."""
    rows = [f"{MARKER} a,1", f"{MARKER} a,0"] + [f" ,{MARKER}"] * 14 + [f"{MARKER} b,0"] * 3
    ds = load_dataset(write(tmp_path / "many.csv", "formatted_prompt,Standardized_Rating\n" + "\n".join(rows) + "\n"),
                      mapping=MAPPING)
    assert ds.warnings == ["dropped 14 row(s) with an empty prompt (rows 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 4 more)",
                           "1 prompt(s) appear more than once with different ratings (rows 1, 2); "
                           "check those rows before training"]
    assert ds.problem_rows == {"empty_prompt": list(range(3, 17)), "empty_rating": [],
                               "conflicting_rating": [1, 2]}
    assert MARKER not in json.dumps(ds.warnings)


def test_summary_is_json_ready(synthetic_csv, tmp_path):
    """summary() survives a JSON round trip unchanged and holds counts, columns, hashes, mapping source."""
    path = synthetic_csv(rows=12)
    mapping_path = tmp_path / "visits.mapping.json"
    mapping_path.write_text(json.dumps(MAPPING))
    ds = load_dataset(path, mapping_path)
    summary = ds.summary()
    assert json.loads(json.dumps(summary)) == summary
    distribution = {str(k): v for k, v in ds.label_distribution.items()}
    assert summary == {
        "source": "visits.csv", "rows_read": 12, "rows_used": 12,
        "dropped": {"empty_prompt": 0, "empty_rating": 0}, "label_distribution": distribution,
        "conflicting_duplicates": ds.conflicting_duplicates, "warnings": [],
        "columns": {"prompt": "formatted_prompt", "rating": "Standardized_Rating",
                    "rationale": "Rationale of Rating", "id": "Row_ID"},
        "grouping": {"column": None, "reason": "no known diagnosis column (name a column with evaluation.group_by)"},
        "encoding": "utf-8", "delimiter": ",", "size_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "mapping": {"source": "file:visits.mapping.json", "inferred": False,
                    "sha256": hashlib.sha256(mapping_path.read_bytes()).hexdigest(), "labels": MAPPING},
    }


def test_directory_instead_of_file_is_a_dataset_error(tmp_path):
    """A directory given as the CSV or the mapping gives a DatasetError, not an OSError."""
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, mapping=MAPPING)
    assert info.value.message.endswith("the dataset is not a regular file (a folder, FIFO, link or special file)")
    (tmp_path / "m.json").mkdir()
    with pytest.raises(MappingError) as info:
        load_mapping(tmp_path / "m.json")
    assert info.value.message == "m.json: the mapping file cannot be read (Is a directory)"


def test_repeated_role_column_is_refused(tmp_path):
    """Two columns that both strip to 'Prompt' are a DatasetFormatError naming the column."""
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(write(tmp_path / "two.csv", "Prompt, Prompt,Standardized_Rating\na,b,1\n"), mapping=MAPPING)
    assert info.value.message == "two.csv, column 'Prompt': the column 'Prompt' appears more than once"


def test_missing_prompt_column_suggests_case_insensitive_match(tmp_path):
    """A misspelt prompt column in another case is suggested by its real name."""
    with pytest.raises(MissingColumnError) as info:
        load_dataset(write(tmp_path / "c.csv", "FORMATED_PROMPT,Standardized_Rating\na,1\n"), mapping=MAPPING)
    assert "missing required column 'formatted_prompt' or 'Prompt' (closest column: 'FORMATED_PROMPT')" \
        in str(info.value)
    assert info.value.column == "formatted_prompt"


def test_known_columns_are_found_in_any_case(tmp_path):
    """EpiTuner's C_Biosense_ID and a header written in other cases (PROMPT, standardized_rating,
    rationale_of_rating) are the known columns: the rows load with their prompts, ratings,
    rationales and ids."""
    text = "C_Biosense_ID,PROMPT,standardized_rating,rationale_of_rating\nB1,cough,1,why\nB2,sprain,0,\n"
    ds = load_dataset(write(tmp_path / "epi.csv", text), mapping=MAPPING)
    assert ds.columns == {"prompt": "Prompt", "rating": "Standardized_Rating",
                          "rationale": "Rationale_of_Rating", "id": "C_BioSense_ID"}
    assert ds.frame[["prompt", "rating", "rationale", "row_id"]].values.tolist() == [
        ["cough", 1, "why", "B1"], ["sprain", 0, "", "B2"]]


# --- in-memory frames (the FineTuner API) ------------------------------------------------------

def test_validate_frame_accepts_numeric_and_missing_values():
    """A DataFrame with int/float ratings and NaN cells validates; NaN counts as empty, never -1."""
    df = pd.DataFrame({
        "formatted_prompt": ["a", "b", None, "d", "e"],
        "Standardized_Rating": [1.0, np.nan, 0.0, -1.0, 0.0],
        "Rationale of Rating": ["why", np.nan, "x", None, "because"],
    })
    ds = validate_frame(df, {"Match": 1, "No": 0, "Unknown": -1})
    assert isinstance(ds, Dataset)
    assert ds.frame["prompt"].tolist() == ["a", "d", "e"]
    assert ds.frame["rating"].tolist() == [1, -1, 0]
    assert ds.frame["rationale"].tolist() == ["why", "", "because"]
    assert ds.dropped == {"empty_prompt": 1, "empty_rating": 1}
    assert ds.source == "<dataframe>"
    assert ds.read_info is None
    assert ds.mapping == RatingMapping({"Match": 1, "No": 0, "Unknown": -1}, "object")


def test_validate_frame_unmapped_rating_from_dict_mapping():
    """A rating absent from a dict mapping is an UnmappedRatingError naming the value and count."""
    df = pd.DataFrame({"Prompt": ["a", "b", "c"], "Standardized_Rating": [1, 2, 2]})
    with pytest.raises(UnmappedRatingError) as info:
        validate_frame(df, {"Match": 1})
    assert info.value.message == ("<dataframe>, column 'Standardized_Rating', row 2: ratings not in the rating "
                                  "mapping (object): 2 (2 rows) in rows 2, 3")
    assert info.value.row == 2



# --- labels against ratings, and bounded value lists -------------------------------------------

def test_rows_whose_label_disagrees_with_the_given_mapping_are_refused(tmp_path):
    """With a mapping given, rows whose Expert Rating label maps to another rating than their
    Standardized_Rating refuse the dataset, naming only those rows and their count (no label, no
    cell); a label the mapping lacks and a dropped row are not compared."""
    rows = [f"R{i},{MARKER} {i},{label},{rating}" for i, (label, rating) in enumerate(
        [("Match", 1), ("Match", 0), ("Unknown", -1), ("Does Not Match", 0), ("Probable", 1),
         ("Does Not Match", 1), ("Match", ""), ("Match", 1)], start=1)]
    path = write(tmp_path / "v.csv",
                 "Row_ID,formatted_prompt,Expert Rating,Standardized_Rating\n" + "\n".join(rows) + "\n")
    with pytest.raises(LabelRatingMismatchError) as info:
        load_dataset(path, mapping=MAPPING)
    assert info.value.message == (
        "v.csv, column 'Standardized_Rating', row 2: 2 row(s) have an 'Expert Rating' label whose rating in the "
        "mapping (object) is not their Standardized_Rating: rows 2, 6; the dataset is refused rather than "
        "trained on ratings that contradict their labels")
    assert info.value.hint == ("fix the Standardized_Rating or the Expert Rating of those rows (or the mapping, "
                               "if it is the wrong one) and drop the files again")
    assert MARKER not in str(info.value) and "Match" not in str(info.value)


def test_rows_whose_label_agrees_with_the_given_mapping_load(synthetic_csv):
    """A dataset whose labels all agree with the given mapping loads as before."""
    assert load_dataset(synthetic_csv(rows=30), mapping=MAPPING).rows_used == 30


def test_unmapped_values_are_listed_up_to_ten(tmp_path):
    """Ratings (or labels) missing from the mapping are named with their counts up to ten values,
    then "and N more values": a column of thousands of values still gives a one-line error."""
    rows = [f"p{i},{i}" for i in range(2, 32)] + ["q,1", "r,2"]
    path = write(tmp_path / "wide.csv", "formatted_prompt,Standardized_Rating\n" + "\n".join(rows) + "\n")
    with pytest.raises(UnmappedRatingError) as info:
        load_dataset(path, mapping=MAPPING)
    assert info.value.message == (
        "wide.csv, column 'Standardized_Rating', row 1: ratings not in the rating mapping (object): "
        "2 (2 rows), 3 (1 row), 4 (1 row), 5 (1 row), 6 (1 row), 7 (1 row), 8 (1 row), 9 (1 row), 10 (1 row), "
        "11 (1 row) and 20 more values in rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 21 more")


def test_raw_export_without_a_mapping_says_a_mapping_is_needed(tmp_path):
    """A raw export (8 columns, Expert Rating labels, no Standardized_Rating) without a mapping says
    that a mapping turns the labels into ratings and how to give one, not to rename a column."""
    path = write(tmp_path / "export.csv",
                 "C_BioSense_ID,Age,Sex,ChiefComplaintOrig,TriageNotes,DischargeDiagnosis,Expert Rating,"
                 f"Rationale_of_Rating\nB1,34,F,{MARKER},x,J06.9,Match,resp\n")
    with pytest.raises(MappingError) as info:
        load_dataset(path)
    assert (info.value.message, info.value.hint) == (
        "export.csv, column 'Standardized_Rating': missing required column 'Standardized_Rating': the file has "
        "'Expert Rating' labels, and a rating mapping is needed to turn them into ratings",
        'give the mapping (labels as keys, integer ratings as values, e.g. {"Match": 1, "Does Not Match": 0, '
        '"Unknown": -1}): in the inbox as export.mapping.json beside export.csv, on the command line with '
        "--mapping FILE")


def test_missing_rating_column_counts_the_files_own_columns(tmp_path):
    """A raw export with neither ratings nor labels counts its own 6 columns, not the prompt column
    rendered from the built-in template."""
    path = write(tmp_path / "export.csv", "C_BioSense_ID,Age,Sex,ChiefComplaintOrig,TriageNotes,"
                                          f"DischargeDiagnosis\nB1,34,F,{MARKER},x,J06.9\n")
    with pytest.raises(MissingColumnError) as info:
        load_dataset(path)
    assert info.value.message == ("export.csv, column 'Standardized_Rating': missing required column "
                                  "'Standardized_Rating'; the file has 6 column(s): 'C_BioSense_ID', 'Age', 'Sex', "
                                  "'ChiefComplaintOrig', 'TriageNotes', 'DischargeDiagnosis'")
    assert "prompt_template" not in info.value.hint  # a template makes prompts, not ratings
