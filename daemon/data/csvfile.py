"""Reading a dataset CSV file into a table of strings, with ``ReadInfo`` saying how it was read.

This module owns the first step of every job: the bytes of the user's CSV up to a pandas DataFrame
whose every column is text. One streaming pass over the raw bytes (hash, UTF-8, NUL bytes, line
lengths) runs before pandas parses the body, then the encoding (UTF-8 with or without BOM, else
cp1252 with a warning), the delimiter, the header width and oversized cells are checked, so a
hostile file fails fast with bounded memory. It also owns the column names a dataset is known by
(``PROMPT_COLUMNS``, ``RATING_COLUMN``, ...), since the header checks need them; the mapping and
validation modules import them from here. Every failure is one ``DatasetError`` subclass naming the
file, the column and the row where they apply, never a cell value: these are patient records.

- ``read_csv(path, *, max_cell_bytes, max_columns) -> tuple[pd.DataFrame, ReadInfo]``: all columns as
  strings, the file's encoding/delimiter sniffed; raises the ``DatasetError`` family.
- ``scan_csv(path) -> CsvTable`` and ``read_chunks(table, chunk_rows, columns)``: the same checks
  and the same strings for a file too large to hold (rating), read again chunk by chunk.
- ``find_column(names, candidates)``: a known column as the file spells it (case-insensitive).
- ``safe_cell`` / ``csv_text``: how the product writes every CSV cell (no spreadsheet formulas);
  every reader takes that guard off again (``unguard_cell``), so our own files read back exactly.

Never log, never call Ollama; messages never contain cell values.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatasetEncodingError, DatasetError, DatasetFormatError, EmptyDatasetError

if TYPE_CHECKING:  # pandas is imported lazily by the implementation where it is needed
    import pandas as pd

PROMPT_COLUMNS = ("formatted_prompt", "Prompt")
RATING_COLUMN = "Standardized_Rating"
RATIONALE_COLUMNS = ("Rationale of Rating", "Rationale_of_Rating")
ID_COLUMNS = ("Row_ID", "C_BioSense_ID")
EXPERT_RATING_COLUMN = "Expert Rating"
# every column the product knows by name; a file may spell them in any case (``find_column``)
KNOWN_COLUMNS = PROMPT_COLUMNS + (RATING_COLUMN,) + RATIONALE_COLUMNS + ID_COLUMNS + (EXPERT_RATING_COLUMN,)

MAX_CELL_BYTES = 1 << 20  # 1 MiB: a larger cell is an error, not a prompt
MAX_COLUMNS = 1000

DELIMITERS = (",", ";", "\t", "|")
# Characters people separate columns with that we do not accept; only used to explain a failure.
FOREIGN_DELIMITERS = (":", "^", "~", "#", "/")

_SCAN_CHUNK = 1 << 20
_PARSE_CHUNK_ROWS = 25_000
_SCAN_CHUNK_ROWS = 5_000  # scan_csv keeps no rows: a smaller chunk keeps its peak lower
_SAMPLE_BYTES = 64 * 1024
_SNIFF_CHARS = 16 * 1024
_HEADER_LIMIT = 8 << 20  # bounded read of the header line, whatever the file holds
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list for CSV injection
# spreadsheets in many locales split cells on ";": what follows one starts a cell of its own, so
# every ";"-separated piece of a cell is guarded as a cell of its own
_PIECES = ";"
_GUARD = "'"
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _delimiter_name(delimiter: str) -> str:
    return {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}.get(delimiter, repr(delimiter))


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


def _check_file(path: Path, max_cell_bytes: int, max_columns: int) -> ReadInfo:
    """Every check that runs before pandas parses the body, in this order: a regular file, empty
    file, binary content, encoding (UTF-8 with or without BOM, else cp1252 with a warning),
    delimiter, header width, oversized cells on one line; so a hostile file fails fast with
    bounded memory. Returns how the body is to be read."""
    name = path.name
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError("the dataset is not a regular file (a folder, FIFO, link or special file)",
                               file=name, hint="drop a regular CSV file")
        size = st.st_size
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
    return ReadInfo(file=name, sha256=scan.sha256, size_bytes=size, encoding=encoding,
                    delimiter=delimiter, warnings=tuple(warnings))


def _parse_chunks(path: Path, info: ReadInfo, chunk_rows: int,
                  usecols: list[int] | None = None) -> Iterator[pd.DataFrame]:
    """The body in chunks of ``chunk_rows`` rows (header names stripped), every parser failure a
    ``DatasetError``. In chunks of rows: the C parser's buffers then hold one chunk, not the whole
    file (peak memory about a third lower on a large file), and it is no slower."""
    import pandas as pd

    name = info.file
    try:
        with pd.read_csv(path, sep=info.delimiter, dtype=object, na_filter=False, keep_default_na=False,
                         encoding=info.encoding, engine="c", quotechar='"', doublequote=True,
                         skip_blank_lines=True, chunksize=chunk_rows, usecols=usecols) as reader:
            for chunk in reader:
                chunk.columns = [unguard_cell(str(c).strip().lstrip("\ufeff")) for c in chunk.columns]
                _unguard_frame(chunk)
                yield chunk
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
        raise DatasetEncodingError(f"the file could not be decoded as {info.encoding}", file=name) from None
    except (ValueError, csv.Error):
        raise DatasetFormatError("the CSV could not be parsed", file=name,
                                 hint="export the dataset again as CSV and drop it again") from None


def _no_rows(name: str) -> EmptyDatasetError:
    return EmptyDatasetError("the file has a header but no data rows", file=name,
                             hint="add the rated rows and drop the file again")


def read_csv(path: str | os.PathLike, *, max_cell_bytes: int = MAX_CELL_BYTES,
             max_columns: int = MAX_COLUMNS) -> tuple[pd.DataFrame, ReadInfo]:
    """Read a dataset CSV: every column as ``str`` (missing fields as ""), header names stripped.

    Checks run before pandas parses the body, in this order: empty file, binary content, encoding
    (UTF-8 with or without BOM, else cp1252 with a warning), delimiter, header width, oversized
    cells; so a hostile file fails fast with bounded memory."""
    import pandas as pd

    path = Path(path)
    info = _check_file(path, max_cell_bytes, max_columns)
    chunks = list(_parse_chunks(path, info, _PARSE_CHUNK_ROWS))
    df = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    del chunks
    if df.empty:
        raise _no_rows(info.file)
    if info.size_bytes > max_cell_bytes:
        _check_cell_lengths(df, max_cell_bytes, info.file)
    return df, info


@dataclass(frozen=True)
class CsvTable:
    """A dataset CSV that passed every check of ``read_csv`` and whose rows are read again in
    chunks (``read_chunks``): a file of millions of rows is never held whole."""

    path: Path
    info: ReadInfo
    columns: tuple[str, ...]  # the header's names, stripped
    rows: int  # data rows


def scan_csv(path: str | os.PathLike, *, max_cell_bytes: int = MAX_CELL_BYTES,
             max_columns: int = MAX_COLUMNS, chunk_rows: int = _SCAN_CHUNK_ROWS) -> CsvTable:
    """The checks of ``read_csv`` without holding the rows: the same pre-scan, then one parse of
    the body in chunks of ``chunk_rows`` (the parser's errors and the cell limit checked per chunk,
    rows numbered across chunks) that counts the rows and keeps none of them."""
    path = Path(path)
    info = _check_file(path, max_cell_bytes, max_columns)
    columns: tuple[str, ...] = ()
    rows = 0
    for chunk in _parse_chunks(path, info, chunk_rows):
        columns = columns or tuple(chunk.columns)
        if info.size_bytes > max_cell_bytes:
            _check_cell_lengths(chunk, max_cell_bytes, info.file, first_row=rows + 1)
        rows += len(chunk)
    if rows == 0:
        raise _no_rows(info.file)
    return CsvTable(path, info, columns, rows)


def read_chunks(table: CsvTable, chunk_rows: int, columns: Sequence[str] | None = None, *,
                start: int = 0) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(index of the chunk's first row, 0-based; the chunk)`` for the rows of ``table`` from
    ``start`` on, at most ``chunk_rows`` at a time, holding only ``columns`` (default: all). Rows
    before ``start`` are parsed and dropped (a resumed run skips what it already did)."""
    positions = sorted({table.columns.index(c) for c in columns}) if columns is not None else None
    first = 0
    for chunk in _parse_chunks(table.path, table.info, chunk_rows, usecols=positions):
        end = first + len(chunk)
        if end > start:
            if positions is not None:  # by position: a name repeated in the header stays unambiguous
                chunk.columns = [table.columns[i] for i in positions]
            skip = max(0, start - first)
            yield first + skip, (chunk.iloc[skip:] if skip else chunk)
        first = end


def find_column(names: Iterable[str], candidates: Sequence[str]) -> str | None:
    """The file's name for a known column: the first of ``candidates`` spelled exactly as in the
    file, else the first the file has in another case (EpiTuner's exports write ``C_Biosense_ID``
    for ``C_BioSense_ID``); None when the file has none of them."""
    present = [str(n) for n in names]
    exact = next((c for c in candidates if c in present), None)
    if exact is not None:
        return exact
    by_case: dict[str, str] = {}
    for name in present:
        by_case.setdefault(name.casefold(), name)
    return next((by_case[c.casefold()] for c in candidates if c.casefold() in by_case), None)


def canonical_columns(names: Iterable[str]) -> list[str]:
    """The header with each known column (``KNOWN_COLUMNS``) that the file spells in another case
    only renamed to the product's spelling (``c_biosense_id`` -> ``C_BioSense_ID``), so that every
    step after reading finds it by name; other names, and a name the file already has exactly,
    stay as they are."""
    out = [str(n) for n in names]
    for known in KNOWN_COLUMNS:
        if known in out:
            continue
        found = find_column(out, (known,))
        if found is not None:
            out[out.index(found)] = known
    return out


# --- writing -----------------------------------------------------------------------------------

def _runs_as_formula(text: str) -> bool:
    """A spreadsheet could run ``text`` as a formula: it starts with ``=``, ``+``, ``-``, ``@``, a
    tab or a carriage return (not a plain number such as ``-3``)."""
    return text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text)


def _guarded(text: str) -> bool:
    """``safe_cell`` puts the guard before ``text``: it could run as a formula behind any number of
    leading apostrophes (a cell's own apostrophe then survives ``unguard_cell``)."""
    return _runs_as_formula(text.lstrip(_GUARD))


def _guard_piece(text: str) -> str:
    return _GUARD + text if _guarded(text) else text


def _unguard_piece(text: str) -> str:
    return text[1:] if text.startswith(_GUARD) and _guarded(text[1:]) else text


def safe_cell(value: Any) -> str:
    """A cell as the product writes it into a CSV file. Text a spreadsheet would run as a formula
    (``_runs_as_formula``) gets a leading single quote, as OWASP recommends against CSV injection,
    and so does each piece after a ``;`` (``a;'=b``: a spreadsheet that splits cells on ``;`` sees
    every piece guarded); plain numbers (``-3``, ``+1.5``) stay as they are, so ratings still read
    as numbers. ``unguard_cell`` takes the quotes off again when the file is read back."""
    text = "" if value is None else value if isinstance(value, str) else str(value)
    if _PIECES not in text:
        return _guard_piece(text)
    return _PIECES.join(_guard_piece(piece) for piece in text.split(_PIECES))


def unguard_cell(text: str) -> str:
    """A cell as it was before ``safe_cell`` guarded it: each single quote taken off exactly where
    ``safe_cell`` would have put it, so a file we wrote (``needs_review.csv`` sent back as training
    data) reads back as the records it was made from; any other cell is unchanged."""
    if _PIECES not in text:
        return _unguard_piece(text)
    return _PIECES.join(_unguard_piece(piece) for piece in text.split(_PIECES))


def _unguard_frame(chunk: pd.DataFrame) -> None:
    """``unguard_cell`` on every cell of ``chunk`` that starts with a single quote, in place. A
    column with no such cell is passed over at C speed (one join and one search), so reading a
    dataset costs about the same with the guard as without."""
    for i in range(chunk.shape[1]):
        values = chunk.iloc[:, i].to_numpy(dtype=object)
        joined = "\n" + "\n".join(values)  # a cell's own "\n'" or ";'" only costs the loop below
        if "\n" + _GUARD not in joined and _PIECES + _GUARD not in joined:
            continue
        rows = [j for j, v in enumerate(values) if v.startswith(_GUARD) or _PIECES + _GUARD in v]
        if rows:
            chunk.iloc[rows, i] = [unguard_cell(values[j]) for j in rows]


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV text with ``\n`` line ends, every cell through ``safe_cell``: the one way the
    product writes a CSV file (``ratings.csv``, ``predictions.csv``)."""
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    # with "\n" line ends the writer leaves a cell holding a lone "\r" unquoted, and a reader then
    # ends the row there: such a row has every cell quoted
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        cells = [safe_cell(c) for c in row]
        (quoted if any("\r" in c for c in cells) else plain).writerow(cells)
    return buf.getvalue()


def _column_label(name: str | None, index: int) -> str:
    """How a message names a column: by its name when it is one we know, else by position, since
    the 'header' of a file exported without one is a row of patient data."""
    return name if name is not None and find_column([name], KNOWN_COLUMNS) else f"#{index + 1}"


def _check_cell_lengths(df: pd.DataFrame, limit: int, name: str, *, first_row: int = 1) -> None:
    """Cells that span several lines escape the line-length pre-scan; ``max(map(len, ...))`` is a
    few milliseconds per column, so every column is checked. ``first_row``: the data row number of
    the frame's first row (a chunk of a larger file)."""
    for index, column in enumerate(df.columns):
        values = df[column].to_numpy(dtype=object)
        if len(values) and max(map(len, values)) > limit:
            row = next(i for i, v in enumerate(values) if len(v) > limit) + first_row
            raise DatasetFormatError(
                f"a cell is larger than the limit of {limit} bytes", file=name, row=row,
                column=_column_label(str(column), index),
                hint="shorten that cell (prompts are short records, not documents) and drop the file again")
