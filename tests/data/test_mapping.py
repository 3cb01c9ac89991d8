"""Tests for daemon/data/mapping.py: mapping files (JSON, YAML), in-memory mappings, inference, siblings."""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pytest

from daemon.config import MAX_COMPANION_BYTES
from daemon.data.dataset import load_dataset
from daemon.errors import MappingError
from daemon.data.mapping import (
    MAX_MAPPING_LABELS,
    infer_mapping,
    load_mapping,
    mapping_from_object,
    sibling_mapping,
)
from daemon.data.synthetic import MAPPING


def test_flat_json_mapping(tmp_path):
    """A flat JSON mapping keeps its labels in order, with its source and hash."""
    path = tmp_path / "m.json"
    path.write_text('{"Match": 1, "Probable": 1, "Does Not Match": 0, "Unknown": -1.0}')
    m = load_mapping(path)
    assert m.labels == {"Match": 1, "Probable": 1, "Does Not Match": 0, "Unknown": -1}
    assert list(m.labels) == ["Match", "Probable", "Does Not Match", "Unknown"]
    assert m.values == [-1, 0, 1]
    assert m.labels_for(1) == ["Match", "Probable"]
    assert m.source == "file:m.json"
    assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.inferred is False


def test_schema_mapper_yaml_mapping(tmp_path):
    """Schema-mapper metadata in YAML gives the labels under 'schema'."""
    path = tmp_path / "m.yaml"
    path.write_text("schema:\n  Match: 1\n  Does Not Match: 0\noriginal_values: [Match, Does Not Match]\n"
                    "created_by: schema-mapper\n")
    assert load_mapping(path).labels == {"Match": 1, "Does Not Match": 0}


def test_yaml_yes_no_labels_are_rejected(tmp_path):
    """Unquoted yes/no labels (booleans in YAML) are a MappingError telling to quote them."""
    path = tmp_path / "m.yml"
    path.write_text("yes: 1\nno: 0\n")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert "a label is a yes/no/on/off word read as a boolean, not text" in str(info.value)
    assert "quote labels in YAML" in str(info.value)


def test_mapping_file_extension_is_checked(tmp_path):
    """A mapping file that is neither JSON nor YAML by extension is refused."""
    path = tmp_path / "m.txt"
    path.write_text('{"Match": 1}')
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert info.value.message == "m.txt: unsupported mapping file type '.txt'; use .json, .yaml or .yml"


def test_mapping_from_object_rejects_bool_and_string_values():
    """In-memory mappings follow the same rules: bools and strings are not ratings."""
    with pytest.raises(MappingError) as info:
        mapping_from_object({"Match": True, "No": "0"})
    assert "label 'Match' has a bool value" in str(info.value)
    assert "label 'No' has a str value" in str(info.value)
    assert mapping_from_object({"Match": 1.0}).labels == {"Match": 1}


def test_mapping_is_inferred_from_expert_rating(synthetic_csv):
    """Without a mapping, Expert Rating + Standardized_Rating pairs give it, marked inferred."""
    ds = load_dataset(synthetic_csv(rows=60))
    assert ds.mapping.inferred is True
    assert ds.mapping.source == "inferred from 'Expert Rating'"
    assert dict(sorted(ds.mapping.labels.items())) == dict(sorted(MAPPING.items()))
    assert ds.summary()["mapping"]["inferred"] is True


def test_infer_mapping_ignores_rows_without_label_or_rating():
    """Rows with an empty label or rating do not take part in inference."""
    df = pd.DataFrame({"Expert Rating": ["Match", "", "No", "No"], "Standardized_Rating": ["1", "0", "", "0"]})
    assert infer_mapping(df).labels == {"Match": 1, "No": 0}


def test_sibling_mapping_is_found(tmp_path):
    """sibling_mapping finds <stem>.mapping.yaml next to a CSV, and None when there is none."""
    csv_path = tmp_path / "visits.csv"
    csv_path.write_text("x\n")
    assert sibling_mapping(csv_path) is None
    (tmp_path / "visits.mapping.yaml").write_text("Match: 1\n")
    assert sibling_mapping(csv_path) == tmp_path / "visits.mapping.yaml"


# --- hostile mapping files ------------------------------------------------------------------------

def _mapping_error(path) -> MappingError:
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    return info.value


def test_deeply_nested_mapping_is_a_mapping_error(tmp_path):
    """JSON or YAML nested 100,000 / 5,000 deep is a MappingError naming the file, not a RecursionError."""
    as_json = tmp_path / "deep.mapping.json"
    as_json.write_bytes(b'{"Match": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    error = _mapping_error(as_json)
    assert (error.file, error.message) == ("deep.mapping.json",
                                           "deep.mapping.json: lists or objects are nested too deeply")
    as_yaml = tmp_path / "deep.mapping.yaml"
    as_yaml.write_bytes(b"Match: " + b"[" * 5000 + b"]" * 5000 + b"\n")
    error = _mapping_error(as_yaml)
    assert (error.file, error.message) == (
        "deep.mapping.yaml", "deep.mapping.yaml: lists or mappings are nested more than 32 levels deep (line 1)")


def test_lone_surrogate_in_a_mapping_is_blamed_on_the_mapping(tmp_path, synthetic_csv):
    """A \\ud800 escape in a JSON or YAML mapping is a MappingError naming the mapping file, not the CSV."""
    as_json = tmp_path / "s.mapping.json"
    as_json.write_text('{"Match": 1, "Does Not Match": 0, "Unknown": -1, "\\ud800": 1}')
    with pytest.raises(MappingError) as info:
        load_dataset(synthetic_csv(rows=60), as_json)
    assert (info.value.file, info.value.message) == (
        "s.mapping.json", "s.mapping.json: a text value holds a lone surrogate escape (\\uD800-\\uDFFF), "
                          "which is not valid Unicode")
    as_yaml = tmp_path / "s.mapping.yaml"
    as_yaml.write_text('Match: 1\n"No \\udc80": 0\n')
    assert _mapping_error(as_yaml).message == (
        "s.mapping.yaml: a text value holds a lone surrogate escape (\\uD800-\\uDFFF), which is not "
        "valid Unicode (line 2)")


def test_invalid_utf8_mapping_is_blamed_on_the_mapping(tmp_path, synthetic_csv):
    """A mapping file that is not UTF-8 fails as the mapping's error, before the CSV is read."""
    path = tmp_path / "l.mapping.yaml"
    path.write_bytes(b"Erk\xe4ltung: 1\n")
    with pytest.raises(MappingError) as info:
        load_dataset(synthetic_csv(rows=60), path)
    assert (info.value.file, info.value.message) == ("l.mapping.yaml",
                                                     "l.mapping.yaml: the mapping file is not UTF-8 text")


def test_surrogate_label_in_an_object_is_refused():
    """An in-memory mapping whose label is not valid Unicode is a MappingError."""
    with pytest.raises(MappingError) as info:
        mapping_from_object({"Match": 1, "\udce4": 0})
    assert info.value.message == "a label is not valid Unicode text (it holds a lone surrogate)"


def test_yaml_aliases_in_a_mapping_are_refused(tmp_path):
    """A YAML mapping that uses an alias (here a schema-mapper shape whose values repeat an anchored
    list) is a MappingError naming the file and the line, before anything expands."""
    path = tmp_path / "a.mapping.yaml"
    path.write_text("schema: {Match: 1, No: 0}\noriginal_values: &v [" + "Match, " * 1000 + "No]\n"
                    "copies: [" + ", ".join(["*v"] * 1000) + "]\n")
    error = _mapping_error(path)
    assert (error.file, error.message) == (
        "a.mapping.yaml", "a.mapping.yaml: the file uses a YAML alias (*name), which job and mapping files "
                          "may not use: write each value out in full (line 3)")


def test_duplicate_labels_are_refused(tmp_path):
    """A label given twice in a JSON or YAML mapping file is a MappingError naming the label."""
    as_json = tmp_path / "d.mapping.json"
    as_json.write_text('{"Match": 1, "Match": 0}')
    assert _mapping_error(as_json).message == (
        "d.mapping.json: the key 'Match' appears more than once in the same mapping")
    as_yaml = tmp_path / "d.mapping.yml"
    as_yaml.write_text("Match: 1\nNo: 0\nMatch: 0\n")
    assert _mapping_error(as_yaml).message == (
        "d.mapping.yml: the key 'Match' appears more than once in the same mapping (line 3)")


def test_huge_number_in_a_mapping_is_a_mapping_error(tmp_path):
    """A rating of 5,000 digits is a MappingError, not a ValueError, in JSON and YAML."""
    as_json = tmp_path / "n.mapping.json"
    as_json.write_text('{"Match": ' + "9" * 5000 + "}")
    assert _mapping_error(as_json).message == "n.mapping.json: a number has too many digits"
    as_yaml = tmp_path / "n.mapping.yaml"
    as_yaml.write_text("Match: " + "9" * 5000 + "\n")
    assert _mapping_error(as_yaml).message == "n.mapping.yaml: a number has too many digits (line 1)"


def test_mapping_over_the_size_limit_is_refused(tmp_path):
    """A mapping file larger than MAX_COMPANION_BYTES is refused before it is parsed."""
    path = tmp_path / "big.mapping.json"
    path.write_text('{"Match": 1, "pad": "' + "x" * MAX_COMPANION_BYTES + '"}')
    size = path.stat().st_size
    assert _mapping_error(path).message == (
        f"big.mapping.json: the mapping file is {size} bytes, over the limit of 262144 bytes")


@pytest.mark.timeout(20)
def test_mapping_fifo_or_symlink_is_refused(tmp_path):
    """A FIFO in place of a mapping file is refused without blocking; a symbolic link is not followed."""
    fifo = tmp_path / "p.mapping.json"
    os.mkfifo(fifo)
    assert _mapping_error(fifo).message == (
        "p.mapping.json: the mapping file is not a regular file (a FIFO, socket or device)")
    target = tmp_path / "real.json"
    target.write_text('{"Match": 1}')
    link = tmp_path / "l.mapping.json"
    link.symlink_to(target)
    assert _mapping_error(link).message == (
        "l.mapping.json: the mapping file is a symbolic link; links are not followed (put the file itself there)")


def test_mapping_file_name_is_escaped(tmp_path):
    """A mapping file name with control characters or non-UTF-8 bytes is escaped in the error."""
    path = tmp_path / os.fsdecode(b"M\xe4rz\x1b[2J.mapping.json")
    path.write_text("[1, 2]")
    assert _mapping_error(path).file == "M\\xe4rz\\x1b[2J.mapping.json"


def test_inferred_mapping_conflict_names_the_rows():
    """A label seen with two ratings names only the 1-based data rows that disagree with the label's
    most common rating (on a tie, the one first in the file) and their count, never a cell value."""
    import pandas as pd

    df = pd.DataFrame({"Expert Rating": ["Match", "Match", "No", "Match", "No"],
                       "Standardized_Rating": ["1", "0", "0", "1", "1"]})  # 'No': a tie, 0 comes first
    with pytest.raises(MappingError) as info:
        infer_mapping(df, source="v.csv")
    assert info.value.message == (
        "v.csv, column 'Expert Rating', row 2: cannot infer the rating mapping: 2 label(s) appear with more "
        "than one Standardized_Rating: 'Match' (0/1), 'No' (0/1); 2 row(s) disagree with the most common "
        "rating of their label: rows 2, 5")
    assert info.value.row == 2


def test_a_mapping_with_more_labels_than_a_rating_scale_is_refused(tmp_path):
    """A 15,000-label mapping file (200 KB) is a MappingError naming the count and the limit of 50; a
    mapping of exactly 50 labels loads."""
    path = tmp_path / "huge.mapping.json"
    path.write_text(json.dumps({f"L{i}": i for i in range(15_000)}))
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert (info.value.message, info.value.hint) == (
        "huge.mapping.json: the mapping has 15000 labels, more than the 50 a mapping may hold (a rating scale "
        "has a handful of values)",
        'give the rating scale\'s labels only (at most 50), e.g. {"Match": 1, "Does Not Match": 0, "Unknown": -1}, '
        "and drop it again")
    assert MAX_MAPPING_LABELS == 50
    assert len(mapping_from_object({f"L{i}": i for i in range(50)}).values) == 50


def test_an_inferred_mapping_with_more_labels_than_a_rating_scale_is_refused():
    """Inferring from an Expert Rating column of 51 distinct labels is a MappingError naming the
    count and the limit, never a label."""
    df = pd.DataFrame({"Expert Rating": [f"ZZ{i}" for i in range(51)],
                       "Standardized_Rating": [str(i) for i in range(51)]})
    with pytest.raises(MappingError) as info:
        infer_mapping(df, source="v.csv")
    assert (info.value.message, info.value.hint) == (
        "v.csv, column 'Expert Rating': cannot infer the rating mapping: the 'Expert Rating' column has 51 "
        "distinct labels, more than the 50 a mapping may hold (a rating scale has a handful of values)",
        "check that 'Expert Rating' holds the experts' labels, or add v.mapping.json next to the CSV with the "
        "rating scale's labels")
    assert infer_mapping(df.iloc[:50]).values == list(range(50))
