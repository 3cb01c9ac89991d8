"""The held-out rows: familiar records, new kinds of records (whole groups), duplicates kept together."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from daemon.data import holdout
from daemon.data.dataset import load_dataset
from daemon.data.visits import DIAGNOSIS_COLUMN, MAPPING, generate_visits, write_csv
from daemon.errors import MissingColumnError


def rows(n_groups: int, per_group: int, *, copies: int = 0, seed: int = 3):
    """Prompts, ratings and groups: ``per_group`` rows in each of ``n_groups`` groups (the group's
    rating cycles through 1, 0, -1), plus ``copies`` re-spellings of the first rows' texts."""
    rng = np.random.default_rng(seed)
    prompts, ratings, groups = [], [], []
    for g in range(n_groups):
        for i in range(per_group):
            prompts.append(f"Visit {g}-{i}: cough x{rng.integers(1, 9)}d, dx code G{g:02d}.")
            ratings.append((1, 0, -1)[g % 3])
            groups.append(f"G{g:02d}")
    for i in range(copies):  # the same text, other case, spacing and punctuation
        prompts.append("  " + prompts[i].upper().replace(":", " ;").replace(" ", "   ") + "!!")
        ratings.append(ratings[i])
        groups.append(groups[i])
    return np.array(prompts, dtype=object), np.array(ratings), np.array(groups, dtype=object)


def test_grouped_split_holds_out_whole_groups_and_a_familiar_sample():
    """No group is both trained on and held out as a new kind; the familiar rows come from trained
    groups; every row is in exactly one place; both sets are about the fraction asked for."""
    prompts, ratings, groups = rows(30, 10)
    split = holdout.split(prompts, ratings, groups, fraction=0.1, seed=42, min_rows=50)
    assert split.kind == "grouped"
    trained = set(groups[split.train])
    assert not trained & set(groups[split.new_kinds])
    assert set(groups[split.familiar]) <= trained
    everything = np.concatenate([split.train, split.familiar, split.new_kinds, split.set_aside])
    assert sorted(everything.tolist()) == list(range(300))
    assert 20 <= len(split.new_kinds) <= 40 and 20 <= len(split.familiar) <= 40
    assert set(ratings[split.new_kinds]) == {1, 0, -1}  # every rating among the new kinds
    assert split.info["groups"] == 30 and split.info["held_out_groups"] == len(set(groups[split.new_kinds]))
    assert split.held_out.tolist() == split.familiar.tolist() + split.new_kinds.tolist()


def test_duplicates_never_straddle_and_held_out_texts_count_once():
    """A text and its re-spellings are all trained on or all held out; a held-out text is measured
    once and its other copies are set aside and counted."""
    prompts, ratings, groups = rows(12, 10, copies=40)
    split = holdout.split(prompts, ratings, None, fraction=0.3, seed=1, min_rows=50)
    assert split.kind == "random"
    keys = np.array([holdout.normalized(p) for p in prompts], dtype=object)
    assert split.info["duplicate_rows"] == 40
    assert not set(keys[split.train]) & set(keys[split.held_out])
    assert len(set(keys[split.held_out])) == len(split.held_out)
    assert set(keys[split.set_aside]) <= set(keys[split.held_out])
    assert split.info["duplicates_set_aside"] == len(split.set_aside) > 0


def test_a_split_is_the_same_for_the_same_seed_and_differs_for_another():
    prompts, ratings, groups = rows(30, 10)
    one = holdout.split(prompts, ratings, groups, fraction=0.1, seed=42, min_rows=50)
    two = holdout.split(prompts, ratings, groups, fraction=0.1, seed=42, min_rows=50)
    other = holdout.split(prompts, ratings, groups, fraction=0.1, seed=7, min_rows=50)
    assert one.new_kinds.tolist() == two.new_kinds.tolist() and one.familiar.tolist() == two.familiar.tolist()
    assert one.new_kinds.tolist() != other.new_kinds.tolist()


def test_too_few_groups_fall_back_to_the_random_split_and_say_why():
    prompts, ratings, groups = rows(4, 30)
    split = holdout.split(prompts, ratings, groups, fraction=0.1, seed=42, min_rows=50)
    assert (split.kind, len(split.new_kinds)) == ("random", 0)
    assert split.info["reason"] == "4 groups, fewer than 5"
    assert len(split.familiar) > 0


def test_below_min_rows_nothing_is_held_out():
    prompts, ratings, groups = rows(4, 10)
    split = holdout.split(prompts, ratings, groups, fraction=0.1, seed=42, min_rows=50)
    assert split.kind == "none" and len(split.train) == 40 and len(split.held_out) == 0


@pytest.mark.parametrize("cell, group", [
    ("J06.9 Acute upper respiratory infection;", "J06"),
    ("Pneumonia, unspecified organism (J18.9)", "J18"),
    (";J069;R05;", "J06"),
    ("s72.001a fracture of femur", "S72"),
    ("pending", ""),
])
def test_icd_codes_are_grouped_by_their_category(cell, group):
    df = pd.DataFrame({"DischargeDiagnosis": [cell, "J45.909 Asthma;", "I10 Hypertension;"]})
    groups, grouping = holdout.groups_of(df, None)
    assert groups.tolist()[0] == group
    assert grouping.to_json() == {"column": "DischargeDiagnosis", "rule": holdout.ICD_RULE,
                                  "chosen_by": "a known diagnosis column"}


def test_grouping_by_a_named_column_by_no_codes_or_turned_off():
    df = pd.DataFrame({"Site": ["north", " south", "north"], "DischargeDiagnosis": ["flu", "cold", "sprain"]})
    groups, grouping = holdout.groups_of(df, "site")  # any case
    assert groups.tolist() == ["north", "south", "north"]
    assert (grouping.column, grouping.rule, grouping.chosen_by) == ("Site", holdout.VALUE_RULE, "evaluation.group_by")
    groups, grouping = holdout.groups_of(df, None)
    assert groups is None and "holds no ICD-10-style codes" in grouping.reason
    assert holdout.groups_of(df, "None")[0] is None
    assert holdout.groups_of(df.drop(columns="DischargeDiagnosis"), None)[1].reason.startswith("no known diagnosis")
    with pytest.raises(KeyError):
        holdout.groups_of(df, "Facility")


def test_a_generated_export_is_grouped_by_its_diagnosis_codes(tmp_path):
    """load_dataset keeps each usable row's group: the discharge diagnosis' ICD-10 category."""
    path = write_csv(tmp_path / "visits.csv", generate_visits(120, seed=5))
    ds = load_dataset(path, mapping=MAPPING)
    assert ds.grouping == {"column": DIAGNOSIS_COLUMN, "rule": holdout.ICD_RULE,
                           "chosen_by": "a known diagnosis column"}
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = holdout._codes(raw[DIAGNOSIS_COLUMN].str.strip())
    assert ds.frame["group"].tolist() == expected.iloc[ds.frame["source_row"] - 1].tolist()
    assert ds.frame["group"].nunique() >= holdout.MIN_GROUPS
    assert json.loads(json.dumps(ds.summary()))["grouping"]["column"] == DIAGNOSIS_COLUMN


def test_a_missing_group_column_is_a_clear_error_without_cell_values(tmp_path):
    path = write_csv(tmp_path / "visits.csv", generate_visits(60, seed=5))
    with pytest.raises(MissingColumnError) as err:
        load_dataset(path, mapping=MAPPING, group_by="DischargeDiagnoses")
    assert "'DischargeDiagnoses' is not in the file (closest column: 'DischargeDiagnosis')" in str(err.value)
    assert "J" not in str(err.value).replace("DischargeDiagnos", "")
