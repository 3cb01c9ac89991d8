"""A corpus of bad inputs: each a CSV (and its ``<stem>.mapping.json|yaml`` when needed) that must fail
with one ``DatasetError`` subclass and a known message fragment.

``write_bad_inputs(directory)`` writes them all and returns their descriptions. The dataset tests run
each through ``load_dataset``; the daemon tests drop the same files into an inbox. File stems are
distinct (``bad-<name>``), and every case is self-contained: CSV-level cases carry a valid mapping so
that nothing waits for a partner file. ``MARKER`` is planted in the cells of every file that has
cells, so a test can assert that no cell value reaches a message, a log line or error.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import (
    DatasetEncodingError,
    DatasetError,
    DatasetFormatError,
    EmptyDatasetError,
    InvalidRatingError,
    MappingError,
    MissingColumnError,
    UnmappedRatingError,
)

MARKER = "QZX-PATIENT-7c41d9"  # never a word, never in a message of ours
MAPPING = {"Match": 1, "Does Not Match": 0, "Unknown": -1}
HEADER = ["Row_ID", "formatted_prompt", "Standardized_Rating", "Rationale of Rating"]
HUGE_CELL_BYTES = 50 * 1024 * 1024
WIDE_COLUMNS = 100_000


@dataclass(frozen=True)
class BadInput:
    name: str
    csv: Path
    mapping: Path | None
    error: type[DatasetError]
    fragment: str  # expected in str(exc)


def _quote(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\n;:') else cell


def _rows(n: int, rating: str = "1", delimiter: str = ",") -> str:
    """``n`` data rows whose prompt and rationale carry the marker."""
    return "".join(
        delimiter.join([f"R{i}", _quote(f"{MARKER} visit {i}: cough and fever"), rating,
                        _quote(f"{MARKER} rationale {i}")]) + "\n"
        for i in range(1, n + 1))


def write_bad_inputs(directory: str | Path) -> list[BadInput]:
    """Write every bad input into ``directory`` (created if needed); return their descriptions."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cases: list[BadInput] = []

    def add(name: str, content: bytes | str, error: type[DatasetError], fragment: str, *,
            mapping: str | bytes | None = json.dumps(MAPPING), mapping_suffix: str = ".json") -> None:
        csv_path = d / f"bad-{name}.csv"
        csv_path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        mapping_path = None
        if mapping is not None:
            mapping_path = d / f"bad-{name}.mapping{mapping_suffix}"
            mapping_path.write_bytes(mapping.encode("utf-8") if isinstance(mapping, str) else mapping)
        cases.append(BadInput(name, csv_path, mapping_path, error, fragment))

    good_csv = ",".join(HEADER) + "\n" + _rows(3)

    add("empty-file", b"", EmptyDatasetError, "the file is empty")
    add("header-only", ",".join(HEADER) + "\n", EmptyDatasetError, "header but no data rows")
    add("binary-junk", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + MARKER.encode() + bytes(range(256)) * 8,
        DatasetFormatError, "not a text CSV")
    add("wrong-delimiter", ":".join(HEADER) + "\n" + _rows(3, delimiter=":"),
        DatasetFormatError, "looks like it is separated by ':'")
    add("missing-columns", "Row_ID,formatted_prompt,Standardised_Rating\n"
        + "".join(f"R{i},{MARKER} visit {i},1\n" for i in range(3)),
        MissingColumnError, "closest column: 'Standardised_Rating'")
    add("non-numeric-ratings", ",".join(HEADER) + "\n" + _rows(2) + _rows(1, rating=MARKER) + _rows(1, rating="1.5"),
        InvalidRatingError, "2 row(s) have a rating that is not an integer (rows 3, 4)")
    add("unmapped-ratings", ",".join(HEADER) + "\n" + _rows(2) + _rows(3, rating="5") + _rows(1, rating="7"),
        UnmappedRatingError, "5 (3 rows), 7 (1 row)")
    add("invalid-json-mapping", good_csv, MappingError, "invalid JSON at line 1",
        mapping='{"Match": 1, "Does Not Match": 0,')
    add("invalid-yaml-mapping", good_csv, MappingError, "invalid YAML at line 2",
        mapping="Match: 1\n  Does Not Match: [0\n", mapping_suffix=".yaml")
    add("yaml-tags", good_csv, MappingError, "uses a tag",
        mapping="Match: !!python/object/apply:os.system ['echo owned']\nUnknown: -1\n", mapping_suffix=".yml")
    add("non-integer-mapping", good_csv, MappingError, "label 'Match' has a str value, not an integer",
        mapping='{"Match": "1", "Does Not Match": 0.5, "Unknown": true}')
    add("empty-mapping", good_csv, MappingError, "the mapping is empty", mapping="{}")
    add("reversed-mapping", good_csv, MappingError, "looks reversed",
        mapping='{"1": "Match", "0": "Does Not Match"}'.replace('"1"', "1").replace('"0"', "0"),
        mapping_suffix=".yaml")
    add("no-mapping", good_csv, MappingError, "bad-no-mapping.mapping.json", mapping=None)
    add("not-utf8-or-cp1252", (",".join(HEADER) + "\n").encode() + f"R1,{MARKER} 丂 visit,1,".encode("gbk")
        + "丂 ok\n".encode("gbk"), DatasetEncodingError, "neither UTF-8 nor cp1252")
    add("utf16", good_csv.encode("utf-16"), DatasetEncodingError, "UTF-16")
    add("unclosed-quote", ",".join(HEADER) + "\n" + _rows(2) + f'R9,"{MARKER} never closed,1,x\n',
        DatasetFormatError, "could not be parsed")
    add("extra-fields", ",".join(HEADER) + "\n" + _rows(2) + f"R9,{MARKER},1,x,{MARKER},{MARKER}\n",
        DatasetFormatError, "could not be parsed near line 4")
    add("no-usable-rows", ",".join(HEADER) + "\n" + "".join(f"R{i}, ,1,{MARKER}\n" for i in range(3))
        + f"R9,{MARKER},,x\n", EmptyDatasetError,
        "no usable rows: 4 read, 3 with an empty prompt, 1 with an empty rating")
    add("inferred-conflict", "Row_ID,formatted_prompt,Expert Rating,Standardized_Rating\n"
        + f"R1,{MARKER} a,Match,1\nR2,{MARKER} b,Match,0\nR3,{MARKER} c,Unknown,-1\n",
        MappingError, "1 label(s) appear with more than one Standardized_Rating: 'Match' (0/1)", mapping=None)

    wide = d / "bad-wide-header.csv"
    with open(wide, "w", encoding="utf-8") as fh:
        fh.write("formatted_prompt,Standardized_Rating")
        fh.write("".join(f",c{i}" for i in range(3, WIDE_COLUMNS + 1)))
        fh.write(f"\n{MARKER},1" + f",{MARKER}" * (WIDE_COLUMNS - 2) + "\n")
    (d / "bad-wide-header.mapping.json").write_text(json.dumps(MAPPING))
    cases.append(BadInput("wide-header", wide, d / "bad-wide-header.mapping.json", DatasetFormatError,
                          f"the header has {WIDE_COLUMNS} columns, over the limit of 1000"))

    huge = d / "bad-huge-cell.csv"
    with open(huge, "w", encoding="utf-8") as fh:
        fh.write(",".join(HEADER) + "\n" + _rows(2))
        fh.write('R3,"')
        block = (MARKER + " ") * (1 << 14)
        written = 0
        while written < HUGE_CELL_BYTES:
            fh.write(block)
            written += len(block)
        fh.write('",1,x\n')
    (d / "bad-huge-cell.mapping.json").write_text(json.dumps(MAPPING))
    cases.append(BadInput("huge-cell", huge, d / "bad-huge-cell.mapping.json", DatasetFormatError,
                          "column 'formatted_prompt', row 3: a cell is larger than the limit of 1048576 bytes"))
    return cases
