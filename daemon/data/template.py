"""Prompt templates: how one record's columns become the prompt a model sees.

Training and rating must format a record the same way, so both go through ``render``. A template is
either a format string with ``{Column Name}`` fields (column names may contain spaces and any
character but braces; ``{{`` and ``}}`` are literal braces) or a list of column names rendered as
``Column: value`` lines, empty cells left out. ``Template.to_json`` is what an output folder records
(``prompt_template`` in ``fine_tuning_metadata.json``) and ``Template.from_json`` reads it back.
``BUILTIN_SYNDROMIC`` formats the common syndromic-surveillance export columns; ``builtin_for``
offers it for a file that has those columns and no prompt column. Cell values are stripped before
they are used. A template may expand the ICD-10-CM codes of some of its columns (``codes``,
recorded as ``code_knowledge``; ``codes.expand_cell``), so training and rating both see the codes'
meaning. Rendering concatenates whole columns (numpy object arrays), with no Python ``format`` call
per row. Pure: only ``errors``, ``codes``, the standard library and pandas/numpy; error messages
name columns, never a cell value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MissingColumnError

if TYPE_CHECKING:  # numpy and pandas are imported lazily where they are needed
    import numpy as np
    import pandas as pd

KEY = "prompt_template"
CODES_KEY = "code_knowledge"  # the columns whose codes are expanded (codes.py)
FORMAT, COLUMNS = "format", "columns"
KINDS = (FORMAT, COLUMNS)
PROMPT_COLUMNS = ("formatted_prompt", "Prompt")  # csvfile.PROMPT_COLUMNS (this module stays pure)
MAX_TEMPLATE_CHARS = 64 * 1024
MAX_TEMPLATE_COLUMNS = 200


@dataclass(frozen=True)
class Template:
    """A parsed template. ``kind`` is ``"format"`` or ``"columns"``.

    format: ``literals`` has one more item than ``fields`` (text before, between and after them).
    columns: ``fields`` are the columns, ``names`` how each line calls its column.
    """

    kind: str
    source: str | tuple[str, ...]  # the template as given: the format string, or the column list
    fields: tuple[str, ...]
    literals: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    # the columns whose ICD-10-CM codes are expanded into what they mean (``codes.expand_cell``)
    codes: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """The distinct columns the template reads, in order of first use."""
        return tuple(dict.fromkeys(self.fields))

    def with_codes(self, columns: Iterable[str]) -> Template:
        """This template with the ICD-10-CM codes of ``columns`` (some of its own) expanded."""
        import dataclasses

        chosen = set(columns)
        return dataclasses.replace(self, codes=tuple(c for c in self.columns if c in chosen))

    def to_json(self) -> dict:
        """What an output folder records; ``Template.from_json`` reads it back."""
        if self.kind == FORMAT:
            out: dict[str, Any] = {"kind": FORMAT, "value": self.source}
        else:
            out = {"kind": COLUMNS, "value": list(self.fields)}
            if self.names != self.fields:
                out["names"] = list(self.names)
        if self.codes:
            out[CODES_KEY] = list(self.codes)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Template:
        """The template ``to_json`` recorded; ConfigError naming ``prompt_template`` when it is not one."""
        if not isinstance(data, Mapping) or data.get("kind") not in KINDS or "value" not in data:
            raise _bad(f"expected {{\"kind\": \"format\" or \"columns\", \"value\": ...}}, got {_shape(data)}")
        kind, value = data["kind"], data["value"]
        if kind == FORMAT:
            if not isinstance(value, str):
                raise _bad(f"a format template's value must be a string, got {_shape(value)}")
            template = _parse_format(value)
        else:
            if not isinstance(value, list):
                raise _bad(f"a columns template's value must be a list of column names, got {_shape(value)}")
            names = data.get("names")
            if names is not None and (not isinstance(names, list) or len(names) != len(value)
                                      or not all(isinstance(n, str) and n.strip() for n in names)):
                raise _bad("a columns template's names must be a list of non-empty strings, one per column")
            template = _parse_columns(value, names)
        codes = data.get(CODES_KEY)  # absent in a folder built before code knowledge: no expansion
        if codes is None:
            return template
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) and c in template.columns
                                                               for c in codes):
            raise _bad(f"{CODES_KEY} must be a list of the template's own columns")
        return template.with_codes(codes)


def _shape(value: Any) -> str:
    """How a message describes a value it must not quote (a template could hold anything)."""
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _bad(problem: str) -> ConfigError:
    return ConfigError([f"{KEY}: {problem}"])


def _parse_format(text: str) -> Template:
    """Split ``text`` into literals and ``{Column}`` fields; ``{{``/``}}`` are literal braces."""
    if not text.strip():
        raise _bad("the format string is empty")
    if len(text) > MAX_TEMPLATE_CHARS:
        raise _bad(f"the format string is longer than {MAX_TEMPLATE_CHARS} characters")
    literals: list[str] = []
    fields: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "{" and text.startswith("{{", i):
            current.append("{")
            i += 2
        elif ch == "}" and text.startswith("}}", i):
            current.append("}")
            i += 2
        elif ch == "{":
            end = text.find("}", i + 1)
            inner = text.find("{", i + 1)
            if end < 0 or (0 <= inner < end):
                raise _bad(f"the '{{' at character {i + 1} is not closed by '}}' (write '{{{{' for a literal brace)")
            name = text[i + 1:end].strip()
            if not name:
                raise _bad(f"the field at character {i + 1} names no column ('{{}}')")
            literals.append("".join(current))
            current = []
            fields.append(name)
            i = end + 1
        elif ch == "}":
            raise _bad(f"the '}}' at character {i + 1} closes no field (write '}}}}' for a literal brace)")
        else:
            current.append(ch)
            i += 1
    literals.append("".join(current))
    if not fields:
        raise _bad("the format string names no column: write fields as {Column Name}")
    if len(set(fields)) > MAX_TEMPLATE_COLUMNS:
        raise _bad(f"the format string names more than {MAX_TEMPLATE_COLUMNS} columns")
    return Template(FORMAT, text, tuple(fields), tuple(literals))


def _parse_columns(value: Sequence[Any], names: Sequence[str] | None = None) -> Template:
    if not value:
        raise _bad("the list of columns is empty")
    if len(value) > MAX_TEMPLATE_COLUMNS:
        raise _bad(f"the list names more than {MAX_TEMPLATE_COLUMNS} columns")
    bad = [i + 1 for i, c in enumerate(value) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise _bad(f"item {bad[0]} of the list is not a non-empty column name")
    fields = tuple(c.strip() for c in value)
    repeated = sorted({c for c in fields if fields.count(c) > 1})
    if repeated:
        raise _bad(f"the column {repeated[0]!r} is listed more than once")
    labels = tuple(n.strip() for n in names) if names is not None else fields
    return Template(COLUMNS, fields, fields, (), labels)


def parse_template(value: Any) -> Template:
    """A template from a job file or the command line: a format string, or a list of column names.
    Anything else is a ConfigError naming ``prompt_template``."""
    if isinstance(value, Template):
        return value
    if isinstance(value, str):
        return _parse_format(value)
    if isinstance(value, (list, tuple)):
        return _parse_columns(value)
    raise _bad(f"expected a format string with {{Column}} fields or a list of column names, got {_shape(value)}")


# --- columns -----------------------------------------------------------------------------------

def closest_column(name: str, columns: Iterable[str]) -> str | None:
    """The existing column most like ``name`` (case-insensitive), or None when none is close."""
    lowered: dict[str, str] = {}
    for column in columns:
        lowered.setdefault(str(column).lower(), str(column))
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def check_columns(template: Template, columns: Iterable[str], *, file: str | None = None) -> None:
    """MissingColumnError for the first column the template names that ``columns`` lacks, with the
    closest existing column as a suggestion."""
    present = [str(c) for c in columns]
    have = set(present)
    missing = [c for c in template.columns if c not in have]
    if not missing:
        return
    close = closest_column(missing[0], present)
    suggestion = f" (closest column: {close!r})" if close else ""
    more = f"; {len(missing) - 1} more column(s) of the template are missing too" if len(missing) > 1 else ""
    raise MissingColumnError(
        f"the prompt template names a column the file lacks{suggestion}{more}", file=file, column=missing[0],
        hint="rename the column in the file or fix prompt_template, then try again")


# --- rendering ---------------------------------------------------------------------------------

def _cells(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A column's cells as stripped ``str`` in an object array (a missing value is "")."""
    import numpy as np

    series = frame[column]
    if series.dtype != object or series.isna().any():
        series = series.astype(object).where(series.notna(), "")
    # one pass that strips and makes sure every cell is a str (a caller's frame may hold numbers);
    # pandas' str.strip is a per-cell Python call too, and twice as slow
    return np.array([v.strip() if type(v) is str else str(v).strip() for v in series.to_numpy(dtype=object)],
                    dtype=object)


def render(template: Template, frame: pd.DataFrame, counts: Any = None) -> pd.Series:
    """Each row's prompt (a Series of str with the frame's index). The frame must hold the
    template's columns (``check_columns``). Whole columns are concatenated as numpy object arrays
    (100k rows, 5 columns, 2 shared cores: a format template 0.10-0.15 s against 0.6-0.7 s for a
    Python ``format`` per row; a columns template 0.13 s against 0.15-0.25 s for a per-row join).
    The codes of ``template.codes`` are expanded (``codes.expand_cells``); ``counts``
    (a ``codes.CodeCounts``) adds up what the expansion did."""
    import numpy as np
    import pandas as pd

    n = len(frame)
    if n == 0:
        return pd.Series([], index=frame.index, dtype=object)
    cells = {c: _cells(frame, c) for c in template.columns}
    if template.codes:
        from .codes import expand_cells

        for column in template.codes:
            cells[column] = expand_cells(cells[column], counts)
    if template.kind == FORMAT:
        out = np.full(n, template.literals[0], dtype=object)
        for field, literal in zip(template.fields, template.literals[1:]):
            out = out + cells[field]
            if literal:
                out = out + literal
        return pd.Series(out, index=frame.index, dtype=object)
    # every present cell becomes "\nName: value"; the first line's newline is cut off at the end
    out = np.full(n, "", dtype=object)
    for field, name in zip(template.fields, template.names):
        values = cells[field]
        out = out + np.where(values != "", f"\n{name}: " + values, "")
    return pd.Series([s[1:] for s in out], index=frame.index, dtype=object)


# --- the built-in template ---------------------------------------------------------------------

SYNDROMIC_ID_COLUMN = "C_BioSense_ID"
SYNDROMIC_LABEL_COLUMN = "Expert Rating"
SYNDROMIC_RATIONALE_COLUMN = "Rationale_of_Rating"
SYNDROMIC_REQUIRED = ("ChiefComplaintOrig", "DischargeDiagnosis")
# (export column, how the prompt calls it), in the order a reviewer reads a visit
SYNDROMIC_LINES = (("Age", "Age"), ("Sex", "Sex"), ("ChiefComplaintOrig", "Chief complaint"),
                   ("TriageNotes", "Triage notes"), ("DischargeDiagnosis", "Discharge diagnosis"))
BUILTIN_SYNDROMIC = _parse_columns([c for c, _ in SYNDROMIC_LINES], [n for _, n in SYNDROMIC_LINES])


def builtin_for(columns: Iterable[str]) -> Template | None:
    """The built-in syndromic template for a file without a prompt column that has at least
    ChiefComplaintOrig and DischargeDiagnosis (matched case-insensitively; the lines of the optional
    columns it lacks are left out); None otherwise."""
    present = [str(c) for c in columns]
    if any(p in present for p in PROMPT_COLUMNS):
        return None
    by_lower: dict[str, str] = {}
    for column in present:
        by_lower.setdefault(column.lower(), column)
    if not all(c.lower() in by_lower for c in SYNDROMIC_REQUIRED):
        return None
    lines = [(by_lower[c.lower()], n) for c, n in SYNDROMIC_LINES if c.lower() in by_lower]
    if [c for c, _ in lines] == list(BUILTIN_SYNDROMIC.fields):
        return BUILTIN_SYNDROMIC
    return _parse_columns([c for c, _ in lines], [n for _, n in lines])


__all__ = ["BUILTIN_SYNDROMIC", "KEY", "Template", "builtin_for", "check_columns", "closest_column",
           "parse_template", "render"]
