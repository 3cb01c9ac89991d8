"""CSV + rating mapping → a validated ``Dataset`` (rows, labels, drop counts, warnings).

This module owns everything between a user's files and a clean table: reading the CSV (encoding,
delimiter, size limits, checked by one streaming pass; the usual UTF-8 file is parsed by pyarrow
during that same pass, anything unusual takes the careful path: scan first, then pyarrow or pandas),
reading or inferring the rating mapping, and validating rows (column resolution, integer ratings,
drops, unmapped ratings, conflicting duplicates) on Arrow columns, never one Python object per cell. Every failure is one ``DatasetError`` subclass naming the
file, the column and the row where they apply, never a cell value: these are patient records.

CONTRACT (written first so that every module can code against it; the implementation fills in the
functions below without changing these signatures or the dataclass fields):

- ``read_csv(path, *, max_cell_bytes, max_columns) -> tuple[pd.DataFrame, ReadInfo]``: all columns as
  strings (pandas ``str``, Arrow-backed), the file's encoding/delimiter sniffed; raises the
  ``DatasetError`` family.
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
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pandas and pyarrow are imported lazily by the implementation where needed
    import numpy as np
    import pandas as pd
    import pyarrow as pa

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

    @property
    def clean(self) -> bool:
        return self.utf8_ok and not self.has_nul and not self.long_line


class _Scanner:
    """The checks of the streaming pass, fed chunk by chunk: the hash, UTF-8, NUL bytes and line
    lengths. The expensive checks are skipped when they cannot fail (ASCII chunks, chunks shorter
    than the limit). ``clean`` stays True while nothing unusual has been seen."""

    def __init__(self, line_limit: int) -> None:
        self.line_limit = line_limit
        self.hash = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.utf8_ok = True
        self.has_nul = self.long_line = False
        self.current = 0  # bytes of the line still open at the end of the previous chunk
        self.sample = b""
        self.size = 0

    @property
    def clean(self) -> bool:
        return self.utf8_ok and not self.has_nul and not self.long_line

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.hash.update(chunk)
        if len(self.sample) < _SAMPLE_BYTES:
            self.sample += chunk[: _SAMPLE_BYTES - len(self.sample)]
        if not self.has_nul and b"\x00" in chunk:
            self.has_nul = True
        if self.utf8_ok and not (chunk.isascii() and not self.decoder.getstate()[0]):
            try:
                self.decoder.decode(chunk)
            except UnicodeDecodeError:
                self.utf8_ok = False
        if self.long_line:
            return
        limit = self.line_limit
        first = chunk.find(b"\n")
        if first < 0:
            self.current += len(chunk)
        else:
            last = chunk.rfind(b"\n")
            # interior lines are shorter than the chunk, so only split when the limit is smaller
            if self.current + first > limit or (
                    last > first and len(chunk) > limit
                    and max(map(len, chunk[first + 1:last].split(b"\n"))) > limit):
                self.long_line = True
            self.current = len(chunk) - last - 1
        self.long_line = self.long_line or self.current > limit

    def finish(self) -> _Scan:
        if self.utf8_ok:
            try:
                self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.utf8_ok = False
        return _Scan(self.hash.hexdigest(), self.sample, _bom(self.sample), self.has_nul, self.utf8_ok,
                     self.long_line)


def _bom(sample: bytes) -> str | None:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8"
    if sample.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _scan_file(path: Path, line_limit: int) -> _Scan:
    """Hash the file and check UTF-8, NUL bytes and line lengths in one pass of 1 MiB chunks, so
    memory stays bounded whatever the file holds."""
    scanner = _Scanner(line_limit)
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            scanner.feed(chunk)
    return scanner.finish()


class _StopScan(Exception):
    """Raised into the CSV parser by ``_ScanningReader`` to stop it at the first unusual byte."""


class _ScanningReader(io.RawIOBase):
    """A file that runs ``_Scanner`` over every chunk the CSV parser reads, so the file is read and
    hashed once, on the parser's reader thread while its worker threads parse; the read stops (the
    parser fails) at the first chunk that the slow path must look at."""

    def __init__(self, fh: IO[bytes], scanner: _Scanner) -> None:
        super().__init__()
        self._fh = fh
        self._scanner = scanner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._fh.readinto(buffer)
        if n:
            self._scanner.feed(bytes(memoryview(buffer)[:n]))
            if not self._scanner.clean:
                raise _StopScan
        return n or 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        if chunk:
            self._scanner.feed(chunk)
            if not self._scanner.clean:
                raise _StopScan
        return chunk


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
    path = Path(path)
    name = path.name
    fast = _read_csv_fast(path, max_cell_bytes, max_columns)
    if fast is not None:
        return fast
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

    df = _read_body_arrow(path, delimiter, encoding, width)
    if df is None:
        df = _read_body_pandas(path, delimiter, encoding, name)
    if df.empty:
        raise EmptyDatasetError("the file has a header but no data rows", file=name,
                                hint="add the rated rows and drop the file again")
    if size > max_cell_bytes:
        _check_cell_lengths(df, max_cell_bytes, name)
    info = ReadInfo(file=name, sha256=scan.sha256, size_bytes=size, encoding=encoding,
                    delimiter=delimiter, warnings=tuple(warnings))
    return df, info


def _read_csv_fast(path: Path, max_cell_bytes: int, max_columns: int) -> tuple[pd.DataFrame, ReadInfo] | None:
    """``read_csv`` in one pass for the usual file (UTF-8, a header that passes its checks, no
    binary bytes, no line over the cell limit): the streaming checks run inside the parser's reads.
    None as soon as anything is unusual; ``read_csv`` then takes the careful path from the start,
    so every error is the one that path raises, in its order, with its bounded memory."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            sample = fh.read(_SAMPLE_BYTES)
    except OSError:
        return None
    bom = _bom(sample)
    if not size or bom in ("utf-16", "utf-32") or b"\x00" in sample \
            or len(_CONTROL_BYTES.findall(sample)) > max(2, len(sample) // 100):
        return None
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample)
    except UnicodeDecodeError:
        return None
    encoding = "utf-8-sig" if bom == "utf-8" else "utf-8"
    sample_text = sample.decode(encoding, errors="ignore")
    if not sample_text.strip():
        return None
    try:
        header, _ = _read_header_line(path, encoding)
    except (OSError, UnicodeDecodeError):
        return None
    delimiter = _choose_delimiter(header, sample_text)
    width = len(_header_fields(header, delimiter))
    if width > max_columns or _foreign_delimiter(header, delimiter) is not None:
        return None
    scanner = _Scanner(max_cell_bytes)
    try:
        with open(path, "rb") as raw, _ScanningReader(raw, scanner) as source:
            df = _read_body_arrow(source, delimiter, encoding, width)
    except OSError:
        return None
    if df is None or scanner.size != size:
        return None
    scan = scanner.finish()
    if not scan.clean or df.empty:
        return None
    if size > max_cell_bytes:
        _check_cell_lengths(df, max_cell_bytes, path.name)
    return df, ReadInfo(file=path.name, sha256=scan.sha256, size_bytes=size, encoding=encoding,
                        delimiter=delimiter, warnings=())


def _read_body_arrow(source: Path | IO[bytes], delimiter: str, encoding: str, width: int) -> pd.DataFrame | None:
    """The fast reader: pyarrow's CSV parser into Arrow-backed ``str`` columns (no Python object per
    cell, about the CSV's size in memory). Single-threaded on purpose: on the shared 2-core box the
    threaded reader was slower (0.2-0.4 s against 0.1-0.16 s at 200k rows) and peaked 20 MiB higher. None when the file needs what only
    pandas does the way this module promises (cp1252, short rows padded with "", a header that does
    not parse like the rows): the caller then reads it with pandas, so every odd file keeps exactly
    the pandas behaviour and messages. Arrow's own error texts quote cells and are never shown."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if encoding not in ("utf-8", "utf-8-sig"):
        return None
    # The header is read as data row 0 under generated names, so it is split by the same parser
    # as the rows; Arrow skips a UTF-8 BOM itself.
    names = [f"f{i}" for i in range(width)]
    try:
        table = pacsv.read_csv(
            source if isinstance(source, Path) else pa.PythonFile(source, mode="r"),
            read_options=pacsv.ReadOptions(use_threads=False, autogenerate_column_names=True),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"', double_quote=True,
                                             escape_char=False, newlines_in_values=True,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.large_string()),
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                 check_utf8=True))
    except (pa.ArrowException, OSError, _StopScan):
        return None
    if table.column_names != names or any(t != pa.large_string() for t in table.schema.types):
        return None
    header = [str(v) for v in table.slice(0, 1).to_pylist()[0].values()]
    body = table.slice(1)
    columns = _pandas_column_names(header)
    frame = _frame_of({i: body.column(i) for i in range(width)})
    frame.columns = [c.strip().lstrip("\ufeff") for c in columns]
    return frame


def _pandas_column_names(header: list[str]) -> list[str]:
    """Header cells named the way ``pd.read_csv`` names them: an empty name becomes ``Unnamed: i``
    and a repeated one ``name.1``, ``name.2``, ... (before names are stripped, as pandas does)."""
    names = [h if h else f"Unnamed: {i}" for i, h in enumerate(header)]
    counts: dict[str, int] = {}
    for i, col in enumerate(names):
        seen = counts.get(col, 0)
        while seen > 0:
            counts[col] = seen + 1
            col = f"{col}.{seen}"
            seen = counts.get(col, 0)
        names[i] = col
        counts[col] = seen + 1
    return names


def _frame_of(columns: dict[Any, Any]) -> pd.DataFrame:
    """A DataFrame whose Arrow string columns (``pa.ChunkedArray``/``pa.Array``) become pandas ``str``
    columns without copying; other values (numpy arrays) are passed through."""
    import pandas as pd

    return pd.DataFrame({key: _str_series(value) for key, value in columns.items()}, copy=False)


def _str_series(values: Any) -> Any:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if isinstance(values, pa.ChunkedArray):
        if values.type != pa.large_string():
            values = values.cast(pa.large_string())
        return pd.Series(pd.arrays.ArrowStringArray(values, dtype=pd.StringDtype("pyarrow", na_value=np.nan)),
                         copy=False)
    return values


def _read_body_pandas(path: Path, delimiter: str, encoding: str, name: str) -> pd.DataFrame:
    import pandas as pd

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
    return df


def _column_label(name: str | None, index: int) -> str:
    """How a message names a column: by its name when it is one we know, else by position, since
    the 'header' of a file exported without one is a row of patient data."""
    known = PROMPT_COLUMNS + (RATING_COLUMN,) + RATIONALE_COLUMNS + ID_COLUMNS + (EXPERT_RATING_COLUMN,)
    return name if name in known else f"#{index + 1}"


def _check_cell_lengths(df: pd.DataFrame, limit: int, name: str) -> None:
    """Cells that span several lines escape the line-length pre-scan, so every column is checked
    after parsing: byte lengths come free from Arrow's offsets, and characters (the unit this check
    has always counted) are only counted for a column whose bytes exceed the limit."""
    import numpy as np
    import pyarrow.compute as pc

    for index, column in enumerate(df.columns):
        values = _arrow_text(df.iloc[:, index])
        if not len(values) or pc.max(pc.binary_length(values)).as_py() <= limit:
            continue
        over = np.flatnonzero(pc.greater(pc.utf8_length(values), limit).to_numpy(zero_copy_only=False))
        if len(over):
            raise DatasetFormatError(
                f"a cell is larger than the limit of {limit} bytes", file=name, row=int(over[0]) + 1,
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
    labels_text = _strip(_arrow_text(df[EXPERT_RATING_COLUMN]))
    has_label = _nonempty(labels_text)
    ratings, empty, invalid = _parse_ratings(_arrow_text(df[RATING_COLUMN]))
    _raise_invalid(invalid, source, has_label)
    usable = ~empty & has_label
    if not usable.any():
        raise MappingError(f"cannot infer the rating mapping: no row has both {EXPERT_RATING_COLUMN!r} and "
                           f"{RATING_COLUMN!r}", file=source,
                           hint=f"add {stem}.mapping.json next to the CSV with labels as keys and integer ratings")
    # Distinct (label, rating) pairs without a Python loop over rows; dictionary codes follow first
    # appearance, so labels keep the order in which the file first shows them.
    encoded = labels_text.filter(usable).combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    pairs = np.unique(np.column_stack([codes, ratings[usable]]), axis=0)
    names = encoded.dictionary.to_pylist()
    seen: dict[str, set[int]] = {name: set() for name in names}
    for code, rating in pairs.tolist():
        seen[names[code]].add(rating)
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


def _arrow_text(series: pd.Series) -> pa.ChunkedArray:
    """The column as Arrow ``large_string`` with missing values as "": zero-copy for the Arrow-backed
    string columns ``read_csv`` returns (and pandas 3 makes by default); other columns go through
    ``str()`` per value, as they always did."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    dtype = series.dtype
    arrow_backed = ((isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow")
                    or (isinstance(dtype, pd.ArrowDtype)
                        and (pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype))))
    if arrow_backed:
        values = series.array.__arrow_array__()
        if not isinstance(values, pa.ChunkedArray):
            values = pa.chunked_array([values])
    else:
        try:
            values = pa.chunked_array([pa.array(_text_values(series), type=pa.large_string())])
        except (pa.ArrowException, UnicodeEncodeError):
            raise DatasetEncodingError(
                f"the column {str(series.name)!r} holds text that is not valid Unicode (a lone surrogate)",
                column=str(series.name), hint="clean that column's text and try again") from None
    if values.type != pa.large_string():
        values = values.cast(pa.large_string())
    if values.null_count:
        values = pc.fill_null(values, "")
    return values


# What str.strip() removes: Python's whitespace, which is not Arrow's (U+001C..U+001F, U+0085).
_WHITESPACE = tuple(ch for ch in map(chr, range(0x3001)) if ch.isspace())


def _edge_bytes(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(first byte, last byte) of every value, read from Arrow's buffers (0 for an empty value)."""
    import numpy as np

    firsts, lasts = [], []
    for chunk in values.chunks:
        n = len(chunk)
        if not n:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=n + 1, offset=chunk.offset * 8)
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and data_buf.size else np.zeros(1, np.uint8)
        filled = offsets[1:] > offsets[:-1]
        first = np.zeros(n, dtype=np.uint8)
        last = np.zeros(n, dtype=np.uint8)
        first[filled] = data[offsets[:-1][filled]]
        last[filled] = data[offsets[1:][filled] - 1]
        firsts.append(first)
        lasts.append(last)
    if not firsts:
        return np.zeros(0, np.uint8), np.zeros(0, np.uint8)
    return np.concatenate(firsts), np.concatenate(lasts)


# Bytes that can begin or end a whitespace character: ASCII whitespace, and any non-ASCII byte
# (a multi-byte character such as U+00A0 or U+3000 starts >= 0xC2 and ends with 0x80..0xBF).
_EDGE_CANDIDATES = None


def _strip(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """``str.strip()`` of every value, exactly, and no copy of a column that needs none.

    Only a value whose first or last byte may belong to a whitespace character can change; those
    (none, in a clean column) are checked and stripped in Python."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    global _EDGE_CANDIDATES
    if _EDGE_CANDIDATES is None:
        table = np.zeros(256, dtype=bool)
        table[[ord(c) for c in _WHITESPACE if c.isascii()]] = True
        table[0x80:] = True
        _EDGE_CANDIDATES = table
    first, last = _edge_bytes(values)
    candidates = np.flatnonzero(_EDGE_CANDIDATES[first] | _EDGE_CANDIDATES[last])
    if not len(candidates):
        return values
    texts = take_rows(values, candidates).to_pylist()
    changed = [i for i, text in enumerate(texts) if text != text.strip()]
    if not changed:
        return values
    mask = np.zeros(len(values), dtype=bool)
    mask[candidates[changed]] = True
    fixed = pa.array([texts[i].strip() for i in changed], type=pa.large_string())
    return pa.chunked_array([pc.replace_with_mask(values.combine_chunks(), pa.array(mask), fixed)])


def _nonempty(values: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.greater(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)


def _parse_rating_text(text: str) -> int | None:
    text = text.strip()
    if _INT_TEXT.fullmatch(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def _parse_ratings(texts: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 ratings, empty mask, invalid mask). Parses each distinct text once: a rating column
    has a handful of distinct values, so this is O(rows) in C plus O(distinct) in Python."""
    import numpy as np

    encoded = texts.combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    uniques = encoded.dictionary.to_pylist()
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


# A power of two (the bucket is length & 15). At 200k rows: 16 buckets 0.07 s and +36 MiB peak,
# 32 buckets 0.10 s and +22 MiB, one whole-column table 0.06 s and +105 MiB.
_DUPLICATE_BUCKETS = 16


def take_rows(values: pa.ChunkedArray, positions: np.ndarray) -> pa.ChunkedArray:
    """``values.take(positions)`` chunk by chunk. Arrow's own take on a ChunkedArray first
    concatenates every chunk (a copy of the whole column per call); this one copies only the rows
    taken. Runs of positions in the same chunk become one take each, so sorted positions cost one
    call per chunk they touch."""
    import numpy as np
    import pyarrow as pa

    positions = np.asarray(positions, dtype=np.int64)
    chunks = values.chunks
    if len(chunks) == 1:
        return pa.chunked_array([chunks[0].take(positions)], type=values.type)
    starts = np.cumsum([0] + [len(c) for c in chunks])
    owner = np.searchsorted(starts, positions, side="right") - 1
    cuts = np.flatnonzero(np.diff(owner)) + 1
    pieces = []
    for run in np.split(np.arange(len(positions)), cuts):
        if len(run):
            c = int(owner[run[0]])
            pieces.append(chunks[c].take(positions[run] - starts[c]))
    return pa.chunked_array(pieces, type=values.type)


def _conflicting_duplicates(prompts: pa.ChunkedArray, ratings: np.ndarray) -> int:
    """How many distinct prompts appear with more than one rating.

    Equal prompts have equal byte lengths, so rows are checked in buckets of ``length % 16``: each
    bucket's hash table holds a sixteenth of the prompts, not all of them (a whole-column table
    costs about twice the column in memory, the peak of this step). In a bucket with repeats, only
    the repeated rows' ratings are compared."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    buckets = pc.bit_wise_and(pc.binary_length(prompts), _DUPLICATE_BUCKETS - 1)
    conflicts = 0
    for bucket in range(_DUPLICATE_BUCKETS):
        member = pc.equal(buckets, bucket)
        # one memo over the bucket's chunks: every chunk of the result shares the whole dictionary
        encoded = pc.dictionary_encode(pc.filter(prompts, member))
        if not encoded.num_chunks or len(encoded.chunk(0).dictionary) == len(encoded):
            continue  # every prompt of the bucket distinct: the common case
        codes = pa.chunked_array([c.indices for c in encoded.chunks]).to_numpy()
        repeated = np.bincount(codes)[codes] > 1
        rows = np.flatnonzero(pa.chunked_array(member).to_numpy(zero_copy_only=False))[repeated]
        seen: dict[int, set[int]] = {}
        for code, rating in zip(codes[repeated].tolist(), ratings[rows].tolist()):
            seen.setdefault(code, set()).add(rating)
        conflicts += sum(1 for values in seen.values() if len(values) > 1)
    return conflicts


def validate_frame(df: pd.DataFrame, mapping: RatingMapping | dict | None, *, source: str = "<dataframe>",
                   read_info: ReadInfo | None = None) -> Dataset:
    """Turn a raw table into a ``Dataset``: resolve columns, drop rows with an empty prompt or rating,
    parse ratings, check them against the mapping (inferred when None), count conflicting duplicates.

    Works on Arrow columns throughout (strip, empty checks, rating parsing, duplicates), so a large
    file never becomes one Python object per cell; ``frame``'s text columns are pandas ``str``
    (Arrow-backed) and share the parsed buffers when no row is dropped or stripped."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if not isinstance(df, pd.DataFrame):
        raise DatasetError(f"expected a pandas DataFrame, got {type(df).__name__}", file=source)
    df = df.rename(columns=lambda c: str(c).strip())
    columns = _resolve_columns(df, source)
    rows_read = len(df)
    if rows_read == 0:
        raise EmptyDatasetError("the dataset has no data rows", file=source,
                                hint="add the rated rows and try again")

    prompts = _strip(_arrow_text(df[columns["prompt"]]))
    ratings, empty_rating, invalid = _parse_ratings(_arrow_text(df[RATING_COLUMN]))
    empty_prompt = ~_nonempty(prompts)
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
    everything = len(positions) == rows_read

    def kept(values: pa.ChunkedArray) -> pa.ChunkedArray:
        # the common case keeps every row: the columns are the parsed buffers themselves, no copy
        return values if everything else take_rows(values, positions)

    data: dict[str, Any] = {
        "prompt": kept(prompts),
        "rating": kept_ratings.astype(np.int64),
        "rationale": (kept(_strip(_arrow_text(df[columns["rationale"]]))) if "rationale" in columns
                      else pa.chunked_array([pa.repeat("", len(positions)).cast(pa.large_string())])),
    }
    if "id" in columns:
        data["row_id"] = kept(_arrow_text(df[columns["id"]]))
    data["source_row"] = positions + 1
    frame = _frame_of(data)

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
