"""The rating mapping: which label stands for which integer ``Standardized_Rating``.

This module owns ``RatingMapping`` and every way of getting one: a ``<stem>.mapping.json|yaml|yml``
file next to the CSV (JSON, or YAML read with ``safe_load``; flat or schema-mapper shape), an
in-memory dict, or inference from the ``Expert Rating`` + ``Standardized_Rating`` pairs of a table.
It also owns the parsing of rating cells (text → integer), which inference and row validation both
use. Every failure is a ``MappingError`` (or ``InvalidRatingError`` for a rating cell that is not an
integer) naming the file, never a cell value.

- ``sibling_mapping(csv_path) -> Path | None``: ``<stem>.mapping.json|yaml|yml`` next to the CSV.
- ``load_mapping(path) -> RatingMapping``: JSON or YAML (``safe_load`` rules, read strictly by
  ``config.files.read_small_file``/``parse_yaml``: no link, FIFO, file over 256 KiB, duplicate label, deep
  nesting, YAML alias or invalid Unicode), flat or schema-mapper shape.
- ``mapping_from_object(obj, source) -> RatingMapping``: the same from an in-memory dict.
- ``infer_mapping(df, source) -> RatingMapping``: from ``Expert Rating`` + ``Standardized_Rating`` pairs.

Never log, never call Ollama; messages never contain cell values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    LONE_SURROGATE,
    MAX_COMPANION_BYTES,
    TOO_MANY_DIGITS,
    FileRefused,
    ParseProblem,
    duplicate_key,
    parse_yaml,
    read_small_file,
)
from .csvfile import EXPERT_RATING_COLUMN, RATING_COLUMN
from ..errors import InvalidRatingError, MappingError
from ..text import LONE_SURROGATE_RE, display_name, printable

if TYPE_CHECKING:  # pandas is imported lazily by the implementation where it is needed
    import numpy as np
    import pandas as pd

MAX_MAPPING_BYTES = MAX_COMPANION_BYTES  # a rating mapping is a few labels; anything bigger is the wrong file
MAPPING_SUFFIXES = (".json", ".yaml", ".yml")
# A rating scale has a handful of values: every label is written into the system prompt of every
# training record, and the evaluation's matrices grow with the square of the scale, so a mapping
# (given or inferred) with more labels than this is the wrong file or the wrong column.
MAX_MAPPING_LABELS = 50

_INT_TEXT = re.compile(r"[+-]?\d+")
_ROW_LIST = 5  # how many labels or cell problems an error message names
ROW_LIST = 10  # how many row numbers a warning or error names before "and N more"


def rows_text(rows, limit: int = ROW_LIST) -> str:
    """``row 3``, ``rows 3, 7, 12`` or ``rows 3, 7, 12 and 4 more`` (the first ``limit`` rows named).
    Rows are 1-based data rows (the first row after the header is row 1); never a cell value."""
    shown, total = [int(r) for r in rows[:limit]], len(rows)
    more = f" and {total - len(shown)} more" if total > len(shown) else ""
    return f"row{'s' if total != 1 else ''} {', '.join(map(str, shown))}{more}"


@dataclass(frozen=True)
class RatingMapping:
    """Label → standardized integer rating, in the source's order. Several labels may share a value."""

    labels: dict[str, int]
    source: str  # e.g. "file:foo.mapping.json", "object", "config:default.json", "inferred from 'Expert Rating'"
    inferred: bool = False
    sha256: str | None = None  # of the mapping file when it came from one

    @property
    def values(self) -> list[int]:
        """The distinct ratings, sorted ascending."""
        return sorted(set(self.labels.values()))

    def labels_for(self, value: int) -> list[str]:
        return [label for label, v in self.labels.items() if v == value]


def sibling_mapping(csv_path: str | os.PathLike) -> Path | None:
    """``<stem>.mapping.json``, ``.yaml`` or ``.yml`` next to ``csv_path`` (first found), else None."""
    csv_path = Path(csv_path)
    for suffix in MAPPING_SUFFIXES:
        candidate = csv_path.with_name(f"{csv_path.stem}.mapping{suffix}")
        if candidate.is_file():
            return candidate
    return None


def load_mapping(path: str | os.PathLike) -> RatingMapping:
    """Read a rating mapping file: JSON (``.json``) or YAML (``.yaml``/``.yml``, ``safe_load`` rules
    plus no duplicate keys, deep nesting, aliases or invalid Unicode). A link, a FIFO or a file over
    ``MAX_MAPPING_BYTES`` is refused before anything reads it. Errors name the file's base name."""
    import yaml

    path = Path(path)
    name = display_name(path)
    suffix = path.suffix.lower()
    if suffix not in MAPPING_SUFFIXES:
        raise MappingError(f"unsupported mapping file type {suffix or '(none)'!r}; use .json, .yaml or .yml",
                           file=name)
    try:
        raw = read_small_file(path, MAX_MAPPING_BYTES)
    except FileRefused as exc:
        raise MappingError(f"the mapping file {exc.strerror}", file=name) from None
    except FileNotFoundError:
        raise MappingError("the mapping file does not exist", file=name) from None
    except OSError as exc:
        raise MappingError(f"the mapping file cannot be read ({exc.strerror or type(exc).__name__})",
                           file=name) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MappingError("the mapping file is not UTF-8 text", file=name) from None
    if not text.strip():
        raise MappingError("the mapping file is empty", file=name)
    try:
        obj = _parse_json(text) if suffix == ".json" else parse_yaml(text, aliases=False)
    except ParseProblem as exc:
        raise MappingError(str(exc), file=name) from None
    except json.JSONDecodeError as exc:
        raise MappingError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                           file=name) from None
    except yaml.constructor.ConstructorError as exc:
        m = re.search(r"tag '([^']+)'", exc.problem or "")
        tag = f" ({m.group(1).replace('tag:yaml.org,2002:', '!!')})" if m else ""
        raise MappingError(f"the YAML uses a tag{tag}, which is not allowed in a mapping file",
                           file=name, hint="write plain YAML: labels as keys, integer ratings as values, "
                                           "no '!!' or '!' tags") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise MappingError(f"invalid YAML{where}: {printable(problem)}", file=name) from None
    mapping = mapping_from_object(obj, source=f"file:{name}")
    return RatingMapping(mapping.labels, mapping.source, sha256=hashlib.sha256(raw).hexdigest())


def _parse_json(text: str) -> Any:
    """``json.loads`` that refuses, as ``ParseProblem``, what the YAML reader refuses too: a key
    twice in one object, nesting past the parser's recursion limit, a lone surrogate escape, and a
    number over Python's 4,300-digit conversion limit."""
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ParseProblem("lists or objects are nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # int() of a number over sys.get_int_max_str_digits()
        raise ParseProblem(TOO_MANY_DIGITS) from None
    stack = [obj]  # JSON shares no objects, so this visits each value once
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if LONE_SURROGATE_RE.search(item):
                raise ParseProblem(LONE_SURROGATE)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return obj


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseProblem(duplicate_key(key))
        out[key] = value
    return out


def _rating_value(value: Any) -> int | None:
    """``value`` as an integer rating: ints (not bools) and integer-valued floats; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def mapping_from_object(obj: Any, source: str = "object") -> RatingMapping:
    """A ``RatingMapping`` from a flat ``{"Match": 1, ...}`` dict or schema-mapper metadata
    ``{"schema": {...}, "original_values": [...], ...}``. Values must be integers (1.0 counts as 1;
    strings and booleans do not)."""
    if isinstance(obj, RatingMapping):
        return obj
    file = source[5:] if source.startswith("file:") else None
    if isinstance(obj, dict) and isinstance(obj.get("schema"), dict):
        obj = obj["schema"]
    if not isinstance(obj, dict):
        raise MappingError(f"the mapping must be an object of label: rating pairs, not {type(obj).__name__}",
                           file=file)
    if not obj:
        raise MappingError("the mapping is empty", file=file)
    if len(obj) > MAX_MAPPING_LABELS:
        raise MappingError(f"the mapping has {len(obj)} labels, more than the {MAX_MAPPING_LABELS} a mapping may "
                           "hold (a rating scale has a handful of values)", file=file,
                           hint=f"give the rating scale's labels only (at most {MAX_MAPPING_LABELS}), e.g. "
                                '{"Match": 1, "Does Not Match": 0, "Unknown": -1}, and drop it again')
    if any(isinstance(key, str) and LONE_SURROGATE_RE.search(key) for key in obj):
        raise MappingError("a label is not valid Unicode text (it holds a lone surrogate)", file=file)
    labels: dict[str, int] = {}
    problems: list[str] = []
    reversed_shape = all(_rating_value(k) is not None for k in obj) and all(isinstance(v, str) for v in obj.values())
    for key, value in obj.items():
        if not isinstance(key, str) or not key.strip():
            kind = "a yes/no/on/off word read as a boolean" if isinstance(key, bool) else type(key).__name__
            problems.append(f"a label is {kind}, not text")
            continue
        rating = _rating_value(value)
        if rating is None:
            problems.append(f"label {key.strip()!r} has a {type(value).__name__} value, not an integer")
            continue
        labels[key.strip()] = rating
    if reversed_shape:
        raise MappingError("the mapping looks reversed (ratings as keys, labels as values)", file=file,
                           hint="write labels as keys and integer ratings as values, "
                                'e.g. {"Match": 1, "Does Not Match": 0}')
    if problems:
        shown = "; ".join(problems[:_ROW_LIST]) + (f"; and {len(problems) - _ROW_LIST} more"
                                                  if len(problems) > _ROW_LIST else "")
        raise MappingError(f"rating values must be integers: {shown}", file=file,
                           hint="write each rating as a bare integer (1, not \"1\"); quote labels in YAML")
    return RatingMapping(labels, source)


def infer_mapping(df: pd.DataFrame, source: str = "<dataframe>") -> RatingMapping:
    """Label → rating from the ``Expert Rating`` and ``Standardized_Rating`` pairs of ``df``.

    Rows where either is empty are ignored; a label seen with two ratings is a ``MappingError``."""

    stem = Path(source).stem if source and not source.startswith("<") else "<dataset>"
    if EXPERT_RATING_COLUMN not in df.columns or RATING_COLUMN not in df.columns:
        raise MappingError(
            f"no rating mapping was given and there is no {EXPERT_RATING_COLUMN!r} column to infer it from",
            file=source,
            hint=f'add {stem}.mapping.json next to the CSV with labels as keys and integer ratings as values, '
                 f'e.g. {{"Match": 1, "Does Not Match": 0, "Unknown": -1}}')
    labels_text = _stripped(_text_values(df[EXPERT_RATING_COLUMN]))
    ratings, empty, invalid = _parse_ratings(_text_values(df[RATING_COLUMN]))
    _raise_invalid(invalid, source, labels_text != "")
    usable = ~empty & (labels_text != "")
    if not usable.any():
        raise MappingError(f"cannot infer the rating mapping: no row has both {EXPERT_RATING_COLUMN!r} and "
                           f"{RATING_COLUMN!r}", file=source,
                           hint=f"add {stem}.mapping.json next to the CSV with labels as keys and integer ratings")
    seen: dict[str, set[int]] = {}
    for label, rating in zip(labels_text[usable], ratings[usable]):
        seen.setdefault(label, set()).add(int(rating))
    if len(seen) > MAX_MAPPING_LABELS:
        raise MappingError(f"cannot infer the rating mapping: the {EXPERT_RATING_COLUMN!r} column has {len(seen)} "
                           f"distinct labels, more than the {MAX_MAPPING_LABELS} a mapping may hold (a rating "
                           "scale has a handful of values)", file=source, column=EXPERT_RATING_COLUMN,
                           hint=f"check that {EXPERT_RATING_COLUMN!r} holds the experts' labels, or add "
                                f"{stem}.mapping.json next to the CSV with the rating scale's labels")
    conflicts = {label: sorted(values) for label, values in seen.items() if len(values) > 1}
    if conflicts:
        shown = ", ".join(f"{label!r} ({'/'.join(map(str, v))})" for label, v in list(conflicts.items())[:_ROW_LIST])
        rows = _disagreeing_rows(labels_text, ratings, usable, conflicts)
        raise MappingError(f"cannot infer the rating mapping: {len(conflicts)} label(s) appear with more than "
                           f"one {RATING_COLUMN}: {shown}; {len(rows)} row(s) disagree with the most common "
                           f"rating of their label: {rows_text(rows)}", file=source,
                           column=EXPERT_RATING_COLUMN, row=int(rows[0]),
                           hint="fix the rows whose label and rating disagree, or give a mapping file")
    return RatingMapping({label: next(iter(values)) for label, values in seen.items()},
                         f"inferred from {EXPERT_RATING_COLUMN!r}", inferred=True)


def _disagreeing_rows(labels: np.ndarray, ratings: np.ndarray, usable: np.ndarray,
                      conflicts: dict[str, list[int]]) -> np.ndarray:
    """The 1-based data rows of the conflicting labels whose rating is not their label's most common
    one (on a tie, the rating that comes first in the file): the rows to look at, not every row of
    the label."""
    import numpy as np

    disagree = np.zeros(len(labels), dtype=bool)
    for label in conflicts:
        rows = usable & (labels == label)
        values, first, counts = np.unique(ratings[rows], return_index=True, return_counts=True)
        usual = values[max(range(len(values)), key=lambda i: (counts[i], -first[i]))]
        disagree |= rows & (ratings != usual)
    return np.flatnonzero(disagree) + 1


def disagreeing_label_rows(labels: np.ndarray, ratings: np.ndarray, candidates: np.ndarray,
                           mapping: RatingMapping) -> np.ndarray:
    """The 1-based data rows among ``candidates`` whose ``Expert Rating`` label is in ``mapping`` with
    another rating than the row's ``Standardized_Rating``. A label the mapping lacks is not compared."""
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(labels)
    lookup = {label: int(value) for label, value in mapping.labels.items()}
    known = np.array([label in lookup for label in uniques], dtype=bool)
    expected = np.array([lookup.get(label, 0) for label in uniques], dtype=np.int64)
    if codes.size == 0 or not known.any():
        return np.zeros(0, dtype=np.int64)
    disagree = candidates & (codes >= 0) & known[codes] & (expected[codes] != ratings)
    return np.flatnonzero(disagree) + 1


# --- parsing rating cells ----------------------------------------------------------------------

def _text_values(series: pd.Series) -> np.ndarray:
    """The column as an object array of ``str``; missing values (None, NaN) become ""."""
    import numpy as np
    import pandas as pd

    values = series.to_numpy(dtype=object)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":
        return values
    missing = pd.isna(values)
    out = np.array([str(v) for v in values], dtype=object)
    out[missing] = ""
    return out


def _parse_rating_text(text: str) -> int | None:
    text = text.strip()
    if _INT_TEXT.fullmatch(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def _parse_ratings(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 ratings, empty mask, invalid mask). Parses each distinct text once: a rating column
    has a handful of distinct values, so this is O(rows) in C plus O(distinct) in Python."""
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(texts)
    parsed = np.zeros(len(uniques), dtype=np.int64)
    kind = np.zeros(len(uniques), dtype=np.int8)  # 0 ok, 1 empty, 2 invalid
    for i, text in enumerate(uniques):
        if not text.strip():
            kind[i] = 1
            continue
        value = _parse_rating_text(text)
        if value is None or not -(2**63) <= value < 2**63:
            kind[i] = 2
        else:
            parsed[i] = value
    return parsed[codes], kind[codes] == 1, kind[codes] == 2


def _raise_invalid(invalid: np.ndarray, source: str, candidates: np.ndarray | None = None) -> None:
    import numpy as np

    mask = invalid if candidates is None else invalid & candidates
    if mask.any():
        rows = np.flatnonzero(mask) + 1
        shown = ", ".join(str(r) for r in rows[:_ROW_LIST]) + (", ..." if len(rows) > _ROW_LIST else "")
        raise InvalidRatingError(
            f"{len(rows)} row(s) have a rating that is not an integer (rows {shown})",
            file=source, column=RATING_COLUMN, row=int(rows[0]),
            hint="ratings must be whole numbers such as 1, 0 or -1; fix those rows and drop the file again")


def _stripped(values: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.fromiter(map(str.strip, values), dtype=object, count=len(values))
