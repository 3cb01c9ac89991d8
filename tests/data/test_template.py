"""Prompt templates: parsing, rendering both kinds from a real CSV, missing columns, the built-in."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from daemon.data.csvfile import read_csv
from daemon.errors import ConfigError, MissingColumnError
from daemon.data.template import (
    BUILTIN_SYNDROMIC,
    Template,
    builtin_for,
    check_columns,
    parse_template,
    render,
)

SYNDROMIC_HEADER = ["C_BioSense_ID", "Age", "Sex", "ChiefComplaintOrig", "TriageNotes", "DischargeDiagnosis",
                    "Expert Rating", "Rationale_of_Rating"]


def _syndromic_csv(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(
        "C_BioSense_ID,Age,Sex,ChiefComplaintOrig,TriageNotes,DischargeDiagnosis,Expert Rating,Rationale_of_Rating\n"
        'B1,34,F,cough,"pt states cough, 2 days",J06.9,Match,resp\n'
        "B2,71,M, fall ,,S93.4,Does Not Match,injury\n"
        'B3,,,  ,"   ",R53.83,Unknown,vague\n',
        encoding="utf-8")
    return path


def test_format_template_renders_columns_with_spaces_and_literal_braces(tmp_path):
    """A format string fills {Column Name} fields (names with spaces) with stripped cells; {{ and }}
    are literal braces; an empty cell renders as nothing."""
    path = tmp_path / "in.csv"
    path.write_text("Chief Complaint,Age Years,other\n cough ,34,x\n,7,y\n", encoding="utf-8")
    frame, _ = read_csv(path)
    template = parse_template("{{visit}} {Chief Complaint} at {Age Years}y {{ok}}")
    assert (template.kind, template.columns) == ("format", ("Chief Complaint", "Age Years"))
    assert render(template, frame).tolist() == ["{visit} cough at 34y {ok}", "{visit}  at 7y {ok}"]


def test_columns_template_renders_lines_and_leaves_out_empty_cells(tmp_path):
    """A list of columns renders `Column: value` lines joined by newlines; empty and blank cells
    leave their line out, and a row with every cell empty renders as ""."""
    frame, _ = read_csv(_syndromic_csv(tmp_path))
    template = parse_template(["ChiefComplaintOrig", "TriageNotes", "Age"])
    assert render(template, frame).tolist() == [
        "ChiefComplaintOrig: cough\nTriageNotes: pt states cough, 2 days\nAge: 34",
        "ChiefComplaintOrig: fall\nAge: 71",
        "",
    ]


def test_builtin_syndromic_template_renders_readable_lines(tmp_path):
    """The built-in template is chosen for a syndromic export without a prompt column and renders
    readable names in reading order, leaving out empty cells."""
    frame, _ = read_csv(_syndromic_csv(tmp_path))
    template = builtin_for(frame.columns)
    assert template is BUILTIN_SYNDROMIC
    assert render(template, frame).tolist() == [
        "Age: 34\nSex: F\nChief complaint: cough\nTriage notes: pt states cough, 2 days\nDischarge diagnosis: J06.9",
        "Age: 71\nSex: M\nChief complaint: fall\nDischarge diagnosis: S93.4",
        "Discharge diagnosis: R53.83",
    ]


def test_builtin_detection_rules():
    """builtin_for needs ChiefComplaintOrig and DischargeDiagnosis (any case) and no prompt column;
    optional columns the file lacks are left out of the template."""
    assert builtin_for(SYNDROMIC_HEADER) is BUILTIN_SYNDROMIC
    assert builtin_for(SYNDROMIC_HEADER + ["formatted_prompt"]) is None
    assert builtin_for(SYNDROMIC_HEADER + ["Prompt"]) is None
    assert builtin_for(["C_BioSense_ID", "ChiefComplaintOrig", "Age"]) is None
    subset = builtin_for(["chiefcomplaintorig", "DISCHARGEDIAGNOSIS", "Sex"])
    assert subset.to_json() == {"kind": "columns", "value": ["Sex", "chiefcomplaintorig", "DISCHARGEDIAGNOSIS"],
                                "names": ["Sex", "Chief complaint", "Discharge diagnosis"]}


def test_to_json_round_trips_both_kinds():
    """to_json is JSON-ready and from_json gives back a template that renders the same."""
    frame = pd.DataFrame({"A b": ["1", ""], "C": ["x", "y"]})
    for template in (parse_template("<{A b}|{C}>"), parse_template(["C", "A b"]), BUILTIN_SYNDROMIC):
        again = Template.from_json(json.loads(json.dumps(template.to_json())))
        assert again == template
    assert parse_template("<{A b}|{C}>").to_json() == {"kind": "format", "value": "<{A b}|{C}>"}
    assert parse_template(["C", "A b"]).to_json() == {"kind": "columns", "value": ["C", "A b"]}
    assert render(Template.from_json({"kind": "columns", "value": ["C", "A b"]}), frame).tolist() == \
        ["C: x\nA b: 1", "C: y"]


@pytest.mark.parametrize("value, problem", [
    ("no fields here", "prompt_template: the format string names no column: write fields as {Column Name}"),
    ("", "prompt_template: the format string is empty"),
    ("x {open", "prompt_template: the '{' at character 3 is not closed by '}' (write '{{' for a literal brace)"),
    ("x } {A}", "prompt_template: the '}' at character 3 closes no field (write '}}' for a literal brace)"),
    ("{ } {A}", "prompt_template: the field at character 1 names no column ('{}')"),
    (["A", ""], "prompt_template: item 2 of the list is not a non-empty column name"),
    (["A", 3], "prompt_template: item 2 of the list is not a non-empty column name"),
    (["A", "A"], "prompt_template: the column 'A' is listed more than once"),
    ([], "prompt_template: the list of columns is empty"),
    ({"A": 1}, "prompt_template: expected a format string with {Column} fields or a list of column names, "
               "got an object"),
    (7, "prompt_template: expected a format string with {Column} fields or a list of column names, got a number"),
])
def test_bad_templates_are_config_errors_naming_prompt_template(value, problem):
    """Each malformed template is one ConfigError whose problem names prompt_template and what is wrong."""
    with pytest.raises(ConfigError) as info:
        parse_template(value)
    assert info.value.problems == [problem]


def test_a_missing_column_names_it_and_the_closest_existing_column(tmp_path):
    """check_columns raises MissingColumnError naming the missing column and the closest existing
    one (case-insensitive), never a cell value."""
    frame, info = read_csv(_syndromic_csv(tmp_path))
    with pytest.raises(MissingColumnError) as err:
        check_columns(parse_template("{Age} {chief complaint orig} {Nope}"), frame.columns, file=info.file)
    assert err.value.column == "chief complaint orig"
    assert err.value.file == "export.csv"
    assert err.value.message == ("export.csv, column 'chief complaint orig': the prompt template names a column "
                                 "the file lacks (closest column: 'ChiefComplaintOrig'); 1 more column(s) of "
                                 "the template are missing too")
    for cell in ("cough", "J06.9", "pt states"):
        assert cell not in str(err.value)
    check_columns(BUILTIN_SYNDROMIC, frame.columns, file=info.file)  # all present: no error
