"""CSV + rating mapping → a validated ``Dataset`` (rows, labels, drop counts, warnings).

This module owns everything between a user's files and a clean table: reading the CSV (encoding,
delimiter, size limits, checked with one streaming pass before pandas parses the body), reading or
inferring the rating mapping, and validating rows (column resolution, integer ratings, drops,
unmapped ratings, conflicting duplicates). Every failure is one ``DatasetError`` subclass naming the
file, the column and the row where they apply, never a cell value: these are patient records.

CONTRACT (written first so that every module can code against it; the implementation fills in the
functions below without changing these signatures or the dataclass fields):

- ``read_csv(path, *, max_cell_bytes, max_columns) -> tuple[pd.DataFrame, ReadInfo]``: all columns as
  strings, the file's encoding/delimiter sniffed; raises the ``DatasetError`` family.
- ``load_mapping(path) -> RatingMapping``: JSON or YAML (``safe_load``), flat or schema-mapper shape.
- ``mapping_from_object(obj, source) -> RatingMapping``: the same from an in-memory dict.
- ``infer_mapping(df, source) -> RatingMapping``: from ``Expert Rating`` + ``Standardized_Rating`` pairs.
- ``validate_frame(df, mapping, *, source, read_info=None) -> Dataset``: column resolution, rating
  parsing, drops, unmapped ratings, conflicting duplicates. ``mapping`` None → infer (or MappingError
  saying which file to add).
- ``load_dataset(csv_path, mapping_path=None, *, mapping=None) -> Dataset``: the two above in one call.
- ``sibling_mapping(csv_path) -> Path | None``: ``<stem>.mapping.json|yaml|yml`` next to the CSV.

Never log, never call Ollama; messages never contain cell values.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    DatasetEncodingError,
    DatasetError,
    DatasetFormatError,
    EmptyDatasetError,
    InvalidRatingError,
    MappingError,
    MissingColumnError,
    UnmappedRatingError,
)

if TYPE_CHECKING:  # pandas is imported lazily by the implementation where it is needed
    import numpy as np
    import pandas as pd

PROMPT_COLUMNS = ("formatted_prompt", "Prompt")
RATING_COLUMN = "Standardized_Rating"
RATIONALE_COLUMNS = ("Rationale of Rating", "Rationale_of_Rating")
ID_COLUMNS = ("Row_ID", "C_BioSense_ID")
EXPERT_RATING_COLUMN = "Expert Rating"

MAX_CELL_BYTES = 1 << 20  # 1 MiB: a larger cell is an error, not a prompt
MAX_COLUMNS = 1000
MAX_MAPPING_BYTES = 1 << 20  # a rating mapping is a few labels; anything bigger is the wrong file

DELIMITERS = (",", ";", "\t", "|")
# Characters people separate columns with that we do not accept; only used to explain a failure.
FOREIGN_DELIMITERS = (":", "^", "~", "#", "/")
MAPPING_SUFFIXES = (".json", ".yaml", ".yml")

_SCAN_CHUNK = 1 << 20
_SAMPLE_BYTES = 64 * 1024
_SNIFF_CHARS = 16 * 1024
_HEADER_LIMIT = 8 << 20  # bounded read of the header line, whatever the file holds
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")
_INT_TEXT = re.compile(r"[+-]?\d+")
_ROW_LIST = 5  # how many row numbers an error message names


def _delimiter_name(delimiter: str) -> str:
    return {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}.get(delimiter, repr(delimiter))


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


@dataclass(frozen=True)
class ReadInfo:
    """How a CSV file was read."""

    file: str  # the file's name (not a full path; for messages)
    sha256: str
    size_bytes: int
    encoding: str  # "utf-8", "utf-8-sig" or "cp1252"
    delimiter: str
    warnings: tuple[str, ...] = ()


@dataclass
class Dataset:
    """A validated dataset.

    ``frame`` holds only usable rows with canonical columns: ``prompt`` (str), ``rating`` (int64),
    ``rationale`` (str, "" when absent), ``row_id`` (str, present only when the source had an id
    column) and ``source_row`` (int: the 1-based data row number in the source, for traceability).
    Its index is a clean RangeIndex 0..n-1.
    """

    frame: pd.DataFrame
    mapping: RatingMapping
    source: str  # file name, or "<dataframe>"
    columns: dict[str, str]  # role ("prompt", "rating", "rationale", "id") → source column name
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count, e.g. {"empty_prompt": 2}
    warnings: list[str] = field(default_factory=list)
    conflicting_duplicates: int = 0  # distinct prompts that appear with more than one rating
    read_info: ReadInfo | None = None

    @property
    def rows_used(self) -> int:
        return len(self.frame)

    @property
    def label_distribution(self) -> dict[int, int]:
        """Rating → count over the usable rows, sorted by rating."""
        counts = self.frame["rating"].value_counts()
        return {int(k): int(v) for k, v in sorted(counts.items())}

    @property
    def has_rationale(self) -> bool:
        return "rationale" in self.columns

    def summary(self) -> dict[str, Any]:
        """Counts for metadata and logs: rows read/used, drops by reason, distribution, warnings,
        columns used, encoding, delimiter, hashes. No cell values.

        JSON-ready and stable through a JSON round trip (rating keys are strings)."""
        info = self.read_info
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "dropped": dict(self.dropped),
            "label_distribution": {str(k): v for k, v in self.label_distribution.items()},
            "conflicting_duplicates": self.conflicting_duplicates,
            "warnings": list(self.warnings),
            "columns": dict(self.columns),
            "encoding": info.encoding if info else None,
            "delimiter": info.delimiter if info else None,
            "size_bytes": info.size_bytes if info else None,
            "sha256": info.sha256 if info else None,
            "mapping": {
                "source": self.mapping.source,
                "inferred": self.mapping.inferred,
                "sha256": self.mapping.sha256,
                "labels": dict(self.mapping.labels),
            },
        }


# --- reading the CSV ---------------------------------------------------------------------------

@dataclass
class _Scan:
    """What one streaming pass over the raw bytes found."""

    sha256: str
    sample: bytes
    bom: str | None  # "utf-8", "utf-16", "utf-32" or None
    has_nul: bool
    utf8_ok: bool
    long_line: bool  # some physical line is longer than the cell limit


def _scan_file(path: Path, line_limit: int) -> _Scan:
    """Hash the file and check UTF-8, NUL bytes and line lengths in one pass of 1 MiB chunks, so
    memory stays bounded whatever the file holds. This is on the hot path of every job: the
    expensive checks are skipped when they cannot fail (ASCII chunks, chunks shorter than the limit)."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    has_nul = long_line = False
    current = 0  # bytes of the line still open at the end of the previous chunk
    sample = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            h.update(chunk)
            if len(sample) < _SAMPLE_BYTES:
                sample += chunk[: _SAMPLE_BYTES - len(sample)]
            if not has_nul and b"\x00" in chunk:
                has_nul = True
            if utf8_ok and not (chunk.isascii() and not decoder.getstate()[0]):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8_ok = False
            if long_line:
                continue
            first = chunk.find(b"\n")
            if first < 0:
                current += len(chunk)
            else:
                last = chunk.rfind(b"\n")
                # interior lines are shorter than the chunk, so only split when the limit is smaller
                if current + first > line_limit or (
                        last > first and len(chunk) > line_limit
                        and max(map(len, chunk[first + 1:last].split(b"\n"))) > line_limit):
                    long_line = True
                current = len(chunk) - last - 1
            long_line = long_line or current > line_limit
    if utf8_ok:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8_ok = False
    bom = None
    if sample.startswith(codecs.BOM_UTF8):
        bom = "utf-8"
    elif sample.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        bom = "utf-32"
    elif sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        bom = "utf-16"
    return _Scan(h.hexdigest(), sample, bom, has_nul, utf8_ok, long_line)


def _cp1252_ok(path: Path) -> bool:
    """True when no byte of the file is undefined in cp1252 (a second pass, only after UTF-8 failed)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            if _CP1252_UNDEFINED.search(chunk):
                return False
    return True


def _choose_encoding(scan: _Scan, path: Path) -> tuple[str, list[str]]:
    name = path.name
    if scan.bom in ("utf-16", "utf-32"):
        raise DatasetEncodingError(f"the file is {scan.bom.upper()}; only UTF-8 and cp1252 are read", file=name)
    control = len(_CONTROL_BYTES.findall(scan.sample))
    if scan.has_nul or control > max(2, len(scan.sample) // 100):
        raise DatasetFormatError(
            "not a text CSV (it contains NUL or other binary bytes)", file=name,
            hint="export the dataset as CSV (comma-separated values) and drop that file")
    if scan.utf8_ok:
        return ("utf-8-sig" if scan.bom == "utf-8" else "utf-8"), []
    if _cp1252_ok(path):
        return "cp1252", ["the file is not valid UTF-8; it was read as cp1252 (Windows-1252): "
                          "save it as UTF-8 to be sure every character is right"]
    raise DatasetEncodingError("the file is neither UTF-8 nor cp1252 (Windows-1252)", file=name)


def _read_header_line(path: Path, encoding: str) -> tuple[str, bool]:
    """The first line of the file, decoded, read with a size bound; True when it was cut off."""
    with open(path, encoding=encoding, newline="") as fh:
        line = fh.readline(_HEADER_LIMIT)
    complete = line.endswith(("\n", "\r"))
    return line.rstrip("\r\n"), not complete and len(line) >= _HEADER_LIMIT


def _header_fields(header: str, delimiter: str) -> list[str]:
    try:
        fields = next(csv.reader([header], delimiter=delimiter, quotechar='"'), [])
    except csv.Error:
        fields = header.split(delimiter)
    return [f.strip().lstrip("\ufeff") for f in fields]


def _has_required(fields: list[str]) -> bool:
    return RATING_COLUMN in fields and any(p in fields for p in PROMPT_COLUMNS)


def _choose_delimiter(header: str, sample_text: str) -> str:
    """The delimiter whose header holds the required columns; else what ``csv.Sniffer`` finds among
    ``,;\\t|``; else ','. The header decides first because free-text prompts full of commas can
    mislead the sniffer on a ';' file."""
    matching = [d for d in DELIMITERS if _has_required(_header_fields(header, d))]
    if len(matching) == 1:
        return matching[0]
    try:
        return csv.Sniffer().sniff(sample_text[:_SNIFF_CHARS], delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        counts = {d: header.count(d) for d in DELIMITERS}
        best = max(counts, key=counts.get)
        return best if counts[best] else ","


def _foreign_delimiter(header: str, chosen: str) -> str | None:
    """A delimiter we do not read (or did not choose) that would split the header into the required
    columns, or the only one that splits a one-column header at all."""
    fields = _header_fields(header, chosen)
    if _has_required(fields):
        return None
    others = [d for d in DELIMITERS + FOREIGN_DELIMITERS if d != chosen]
    for d in others:
        if _has_required(_header_fields(header, d)):
            return d
    if len(fields) == 1:
        splitting = [d for d in others if d in header]
        if len(splitting) == 1:
            return splitting[0]
    return None


def _first_oversized_cell(path: Path, delimiter: str, limit: int) -> tuple[int, int, int] | None:
    """(data row number, 0-based field index, bytes seen) of the first cell over ``limit`` bytes,
    scanning quote-aware in 1 MiB chunks (memory stays bounded); None when every cell fits.

    Only called when some physical line is longer than the limit, which is rare."""
    delim = delimiter.encode("ascii")  # every accepted delimiter is ASCII, in cp1252 and UTF-8 alike
    token = re.compile(b"[" + re.escape(delim) + b'"\n]')
    record = field_index = field_len = 0
    in_quotes = False
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            pos = 0
            for m in token.finditer(chunk):
                field_len += m.start() - pos
                if field_len > limit:
                    return record, field_index, field_len
                pos = m.end()
                ch = m.group()
                if ch == b'"':
                    in_quotes = not in_quotes  # a doubled quote toggles twice: still right
                    field_len += 1
                elif in_quotes:
                    field_len += 1
                elif ch == b"\n":
                    record += 1
                    field_index = field_len = 0
                else:
                    field_index += 1
                    field_len = 0
            field_len += len(chunk) - pos
            if field_len > limit:
                return record, field_index, field_len
    return None


def _parser_line(message: str) -> int | None:
    m = re.search(r"line (\d+)", message) or re.search(r"row (\d+)", message)
    return int(m.group(1)) if m else None


def read_csv(path: str | os.PathLike, *, max_cell_bytes: int = MAX_CELL_BYTES,
             max_columns: int = MAX_COLUMNS) -> tuple[pd.DataFrame, ReadInfo]:
    """Read a dataset CSV: every column as ``str`` (missing fields as ""), header names stripped.

    Checks run before pandas parses the body, in this order: empty file, binary content, encoding
    (UTF-8 with or without BOM, else cp1252 with a warning), delimiter, header width, oversized
    cells; so a hostile file fails fast with bounded memory."""
    import pandas as pd

    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        if size == 0:
            raise EmptyDatasetError("the file is empty", file=name,
                                    hint="export the dataset again with a header row and at least one data row")
        scan = _scan_file(path, max_cell_bytes)
    except FileNotFoundError:
        raise DatasetError("the file does not exist", file=name, hint="check the path and try again") from None
    except OSError as exc:
        raise DatasetError(f"the file cannot be read ({exc.strerror or type(exc).__name__})", file=name,
                           hint="check that the path is a readable file") from None
    encoding, warnings = _choose_encoding(scan, path)
    sample_text = scan.sample.decode(encoding, errors="ignore")
    if not sample_text.strip() and size <= len(scan.sample):
        raise EmptyDatasetError("the file holds only blank lines", file=name,
                                hint="export the dataset again with a header row and at least one data row")

    header, cut = _read_header_line(path, encoding)
    delimiter = _choose_delimiter(header, sample_text)
    width = len(_header_fields(header, delimiter))
    if width > max_columns:
        raise DatasetFormatError(
            f"the header has {width}{'+' if cut else ''} columns, over the limit of {max_columns}",
            file=name, hint="keep only the prompt, rating, rationale and id columns and drop the file again")
    foreign = _foreign_delimiter(header, delimiter)
    if foreign is not None:
        raise DatasetFormatError(
            f"the header does not split into the expected columns with {_delimiter_name(delimiter)}; "
            f"it looks like it is separated by {_delimiter_name(foreign)}",
            file=name, hint="save the file as comma-separated CSV (or with ';', tab or '|') and drop it again")

    if scan.long_line:
        big = _first_oversized_cell(path, delimiter, max_cell_bytes)
        if big is not None:
            record, index, _ = big
            fields = _header_fields(header, delimiter)
            column = _column_label(fields[index] if record and index < len(fields) else None, index)
            where = "" if record else " (in the header row)"
            raise DatasetFormatError(
                f"a cell is larger than the limit of {max_cell_bytes} bytes{where}", file=name,
                row=record if record else None, column=column,
                hint="shorten that cell (prompts are short records, not documents) and drop the file again")

    try:
        df = pd.read_csv(path, sep=delimiter, dtype=object, na_filter=False, keep_default_na=False,
                         encoding=encoding, engine="c", quotechar='"', doublequote=True,
                         skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise EmptyDatasetError("the file has no header row", file=name,
                                hint="export the dataset again with a header row and data rows") from None
    except pd.errors.ParserError as exc:
        line = _parser_line(str(exc))
        where = f" near line {line}" if line else ""
        raise DatasetFormatError(
            f"the CSV could not be parsed{where}: a row has more fields than the header or a quote is not closed",
            file=name, hint="check the quoting of that row (or export the file again) and drop it again") from None
    except UnicodeDecodeError:
        raise DatasetEncodingError(f"the file could not be decoded as {encoding}", file=name) from None
    except (ValueError, csv.Error):
        raise DatasetFormatError("the CSV could not be parsed", file=name,
                                 hint="export the dataset again as CSV and drop it again") from None

    df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    if df.empty:
        raise EmptyDatasetError("the file has a header but no data rows", file=name,
                                hint="add the rated rows and drop the file again")
    if size > max_cell_bytes:
        _check_cell_lengths(df, max_cell_bytes, name)
    info = ReadInfo(file=name, sha256=scan.sha256, size_bytes=size, encoding=encoding,
                    delimiter=delimiter, warnings=tuple(warnings))
    return df, info


def _column_label(name: str | None, index: int) -> str:
    """How a message names a column: by its name when it is one we know, else by position, since
    the 'header' of a file exported without one is a row of patient data."""
    known = PROMPT_COLUMNS + (RATING_COLUMN,) + RATIONALE_COLUMNS + ID_COLUMNS + (EXPERT_RATING_COLUMN,)
    return name if name in known else f"#{index + 1}"


def _check_cell_lengths(df: pd.DataFrame, limit: int, name: str) -> None:
    """Cells that span several lines escape the line-length pre-scan; ``max(map(len, ...))`` is a
    few milliseconds per column, so every column is checked."""
    for index, column in enumerate(df.columns):
        values = df[column].to_numpy(dtype=object)
        if len(values) and max(map(len, values)) > limit:
            row = next(i for i, v in enumerate(values) if len(v) > limit) + 1
            raise DatasetFormatError(
                f"a cell is larger than the limit of {limit} bytes", file=name, row=row,
                column=_column_label(str(column), index),
                hint="shorten that cell (prompts are short records, not documents) and drop the file again")


# --- the rating mapping ------------------------------------------------------------------------

def sibling_mapping(csv_path: str | os.PathLike) -> Path | None:
    """``<stem>.mapping.json``, ``.yaml`` or ``.yml`` next to ``csv_path`` (first found), else None."""
    csv_path = Path(csv_path)
    for suffix in MAPPING_SUFFIXES:
        candidate = csv_path.with_name(f"{csv_path.stem}.mapping{suffix}")
        if candidate.is_file():
            return candidate
    return None


def load_mapping(path: str | os.PathLike) -> RatingMapping:
    """Read a rating mapping file: JSON (``.json``) or YAML (``.yaml``/``.yml``, ``safe_load`` only)."""
    import yaml

    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in MAPPING_SUFFIXES:
        raise MappingError(f"unsupported mapping file type {suffix or '(none)'!r}; use .json, .yaml or .yml",
                           file=name)
    try:
        size = path.stat().st_size
        if size > MAX_MAPPING_BYTES:
            raise MappingError(f"the mapping file is {size} bytes, over the limit of {MAX_MAPPING_BYTES}",
                               file=name)
        raw = path.read_bytes()
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
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MappingError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                               file=name) from None
    else:
        try:
            obj = yaml.safe_load(text)
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
            raise MappingError(f"invalid YAML{where}: {problem}", file=name) from None
    mapping = mapping_from_object(obj, source=f"file:{name}")
    return RatingMapping(mapping.labels, mapping.source, sha256=hashlib.sha256(raw).hexdigest())


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
    import numpy as np

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
    conflicts = {label: sorted(values) for label, values in seen.items() if len(values) > 1}
    if conflicts:
        shown = ", ".join(f"{label!r} ({'/'.join(map(str, v))})" for label, v in list(conflicts.items())[:_ROW_LIST])
        raise MappingError(f"cannot infer the rating mapping: {len(conflicts)} label(s) appear with more than "
                           f"one {RATING_COLUMN}: {shown}", file=source, column=EXPERT_RATING_COLUMN,
                           hint="fix the rows whose label and rating disagree, or give a mapping file")
    return RatingMapping({label: next(iter(values)) for label, values in seen.items()},
                         f"inferred from {EXPERT_RATING_COLUMN!r}", inferred=True)


# --- validating rows ---------------------------------------------------------------------------

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


def _resolve_columns(df: pd.DataFrame, source: str) -> dict[str, str]:
    names = [str(c) for c in df.columns]
    known = PROMPT_COLUMNS + (RATING_COLUMN,) + RATIONALE_COLUMNS + ID_COLUMNS + (EXPERT_RATING_COLUMN,)
    repeated = sorted({n for n in names if n in known and names.count(n) > 1})
    if repeated:
        raise DatasetFormatError(f"the column {repeated[0]!r} appears more than once", file=source,
                                 column=repeated[0], hint="keep one column of that name and drop the file again")
    columns: dict[str, str] = {}
    prompt = next((c for c in PROMPT_COLUMNS if c in names), None)
    missing = []
    if prompt is None:
        missing.append(PROMPT_COLUMNS)
    else:
        columns["prompt"] = prompt
    if RATING_COLUMN in names:
        columns["rating"] = RATING_COLUMN
    else:
        missing.append((RATING_COLUMN,))
    if missing:
        wanted = missing[0]
        lowered = {n.lower(): n for n in names}
        close: list[str] = []
        for want in wanted:
            close += [lowered[m] for m in difflib.get_close_matches(want.lower(), list(lowered), n=1, cutoff=0.6)]
        suggestion = f" (closest column: {close[0]!r})" if close else ""
        label = " or ".join(repr(w) for w in wanted)
        raise MissingColumnError(
            f"missing required column {label}{suggestion}; the file has {len(names)} column(s)",
            file=source, column=wanted[0],
            hint=f"a dataset needs a prompt column ({' or '.join(PROMPT_COLUMNS)}) and {RATING_COLUMN}; "
                 f"rename the column and drop the file again")
    rationale = next((c for c in RATIONALE_COLUMNS if c in names), None)
    if rationale:
        columns["rationale"] = rationale
    ident = next((c for c in ID_COLUMNS if c in names), None)
    if ident:
        columns["id"] = ident
    return columns


def _conflicting_duplicates(prompts: np.ndarray, ratings: np.ndarray) -> int:
    """How many distinct prompts appear with more than one rating. Set operations only (C speed):
    one set of all prompts; one per rating only when some prompt repeats; a count only when the
    per-rating sets overlap."""
    import numpy as np

    distinct = set(prompts.tolist())
    if len(distinct) == len(prompts):  # every prompt distinct: the common case
        return 0
    per_rating = [set(prompts[ratings == value].tolist()) for value in np.unique(ratings)]
    if sum(map(len, per_rating)) == len(distinct):
        return 0
    counts = Counter(chain.from_iterable(per_rating))
    return sum(1 for n in counts.values() if n > 1)


def _stripped(values: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.fromiter(map(str.strip, values), dtype=object, count=len(values))


def validate_frame(df: pd.DataFrame, mapping: RatingMapping | dict | None, *, source: str = "<dataframe>",
                   read_info: ReadInfo | None = None) -> Dataset:
    """Turn a raw table into a ``Dataset``: resolve columns, drop rows with an empty prompt or rating,
    parse ratings, check them against the mapping (inferred when None), count conflicting duplicates."""
    import numpy as np
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise DatasetError(f"expected a pandas DataFrame, got {type(df).__name__}", file=source)
    df = df.rename(columns=lambda c: str(c).strip())
    columns = _resolve_columns(df, source)
    rows_read = len(df)
    if rows_read == 0:
        raise EmptyDatasetError("the dataset has no data rows", file=source,
                                hint="add the rated rows and try again")

    prompts = _stripped(_text_values(df[columns["prompt"]]))
    ratings, empty_rating, invalid = _parse_ratings(_text_values(df[RATING_COLUMN]))
    empty_prompt = prompts == ""
    empty_rating &= ~empty_prompt
    keep = ~(empty_prompt | empty_rating)
    _raise_invalid(invalid, source, keep)

    if mapping is None:
        mapping = infer_mapping(df, source)
    elif not isinstance(mapping, RatingMapping):
        mapping = mapping_from_object(mapping, "object")

    kept_ratings = ratings[keep]
    known = np.isin(kept_ratings, np.array(mapping.values, dtype=np.int64))
    if not known.all():
        values, counts = np.unique(kept_ratings[~known], return_counts=True)
        shown = ", ".join(f"{int(v)} ({int(c)} row{'s' if c != 1 else ''})" for v, c in zip(values, counts))
        raise UnmappedRatingError(
            f"ratings not in the rating mapping ({mapping.source}): {shown}", file=source, column=RATING_COLUMN,
            hint="add these ratings to the mapping file, or fix those rows, and drop the files again")

    dropped = {"empty_prompt": int(empty_prompt.sum()), "empty_rating": int(empty_rating.sum())}
    if not keep.any():
        raise EmptyDatasetError(
            f"no usable rows: {rows_read} read, {dropped['empty_prompt']} with an empty prompt, "
            f"{dropped['empty_rating']} with an empty rating", file=source,
            hint="fill in the prompt and rating of each row and drop the file again")

    positions = np.flatnonzero(keep)
    data: dict[str, Any] = {
        "prompt": prompts[keep],
        "rating": kept_ratings.astype(np.int64),
        "rationale": (_stripped(_text_values(df[columns["rationale"]])[keep])
                      if "rationale" in columns else np.full(len(positions), "", dtype=object)),
    }
    if "id" in columns:
        data["row_id"] = _text_values(df[columns["id"]])[keep]
    data["source_row"] = positions + 1
    frame = pd.DataFrame(data)

    warnings = list(read_info.warnings) if read_info else []
    if dropped["empty_prompt"]:
        warnings.append(f"dropped {dropped['empty_prompt']} row(s) with an empty prompt")
    if dropped["empty_rating"]:
        warnings.append(f"dropped {dropped['empty_rating']} row(s) with an empty rating")
    conflicts = _conflicting_duplicates(data["prompt"], data["rating"])
    if conflicts:
        warnings.append(f"{conflicts} prompt(s) appear more than once with different ratings; "
                        "check those rows before training")
    return Dataset(frame=frame, mapping=mapping, source=source, columns=columns, rows_read=rows_read,
                   dropped=dropped, warnings=warnings, conflicting_duplicates=conflicts, read_info=read_info)


def load_dataset(csv_path: str | os.PathLike, mapping_path: str | os.PathLike | None = None, *,
                 mapping: RatingMapping | dict | None = None) -> Dataset:
    """Read and validate a dataset file. The mapping comes from ``mapping_path``, else ``mapping``,
    else is inferred from the ``Expert Rating`` column. The mapping is read first so that a bad
    mapping fails before a large CSV is parsed."""
    if mapping_path is not None:
        mapping = load_mapping(mapping_path)
    df, info = read_csv(csv_path)
    return validate_frame(df, mapping, source=info.file, read_info=info)
