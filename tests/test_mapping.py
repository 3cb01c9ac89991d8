"""Tests for daemon/mapping.py: mapping files (JSON, YAML), in-memory mappings, inference, siblings."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from daemon.dataset import load_dataset
from daemon.errors import MappingError
from daemon.mapping import infer_mapping, load_mapping, mapping_from_object, sibling_mapping
from daemon.synthetic import MAPPING


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
