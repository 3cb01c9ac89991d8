"""The records a rating run sends to the experts: ``needs_review.csv``, ordered by what a rating is worth.

A record goes to review when its answer was invalid, had no confidence, or a confidence under the
threshold (``rating.review_below``). The file holds the input's own columns (in the input's order,
so its id and text columns come through; ``Standardized_Rating``, the rationale columns and an
``Expert Rating`` left out), then the columns the experts fill in (``EXPERT_COLUMNS``), then what
the model said and why the record is where it is (``MODEL_COLUMNS``, ``ORDER_COLUMNS``). Sent back
with the mapping, it is training data (``dataset.load_dataset`` reads ``Expert Rating`` and
``Rationale_of_Rating`` and passes over the other columns).

The order (``review_order``, also what ``bench/review_order.py`` measures) puts first the ratings
that teach the model most: invalid answers, then answers without a confidence, then the least
confident, and within each of these, one record of each kind of record in turn (round-robin over
groups), so that an expert who rates only the first hundred sees every kind the model is unsure
of rather than a hundred of one. A kind (``Kinds``) is what the held-out split calls one: the
column ``group_by`` names (grouped as ``holdout.groups_of`` does), else a known diagnosis column
holding ICD-10-style codes, grouped by the ICD-10-CM block of the first code (J20.9 and J21.9 are
one kind, "J20-J22"; the three-character category when the code set does not know it); with
neither, the order is by confidence alone. Each record's ``Review Reason`` says why it is where it
is in plain words, naming a kind only by its number and the column, never by a cell's text.

Memory stays flat whatever the input's size: the input and ``ratings.csv`` are read side by side a
chunk at a time; a record to review is written at once to an unnamed scratch file beside the
output and only its row number, confidence, kind and place in the scratch file are kept; once all
are known they are ranked and copied into the output in rank order. The output is written
atomically. Nothing here logs; no message holds a cell value.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import fsutil
from ..data.csvfile import (EXPERT_RATING_COLUMN, RATING_COLUMN, RATIONALE_COLUMNS, csv_text, read_chunks,
                            scan_csv, unguard_cell)
from ..data.holdout import CODED_SHARE, DIAGNOSIS_COLUMNS, ICD10, ICD_RULE, NONE, VALUE_RULE

REVIEW_RATIONALE_COLUMN = "Rationale_of_Rating"  # one of RATIONALE_COLUMNS: read back as the rationale
EXPERT_COLUMNS = (EXPERT_RATING_COLUMN, REVIEW_RATIONALE_COLUMN)  # empty: the experts fill them in
MODEL_RATING_COLUMN = "Model Rating"
MODEL_LABEL_COLUMN = "Model Label"
MODEL_CONFIDENCE_COLUMN = "Model Confidence"
MODEL_RATIONALE_COLUMN = "Model Rationale"  # ratings.csv's rationale (may be empty)
MODEL_COLUMNS = (MODEL_RATING_COLUMN, MODEL_LABEL_COLUMN, MODEL_CONFIDENCE_COLUMN, MODEL_RATIONALE_COLUMN)
REVIEW_RANK_COLUMN = "Review Rank"  # 1: review first
REVIEW_REASON_COLUMN = "Review Reason"
ORDER_COLUMNS = (REVIEW_RANK_COLUMN, REVIEW_REASON_COLUMN)
# what needs_review.csv adds after the input's own columns, in this order
REVIEW_COLUMNS = (*EXPERT_COLUMNS, *MODEL_COLUMNS, *ORDER_COLUMNS)
# the input's columns needs_review.csv leaves out: the answers it asks for, and its own added columns
LEFT_OUT_COLUMNS = (RATING_COLUMN, *RATIONALE_COLUMNS, *REVIEW_COLUMNS)
ORDER_RULE = ("invalid answers first, then answers without a confidence, then the least confident first; "
              "within each, one record of each kind of record in turn (round-robin over the kinds, the kind "
              "with the least sure record first), so that the first records reviewed cover every kind the model "
              "is unsure of")
BLOCK_RULE = ("ICD-10-CM block of the first code in the cell (its three-character category when the code set "
              "does not know it)")
NO_CODE = ""  # the kind of a cell without a code, in a column grouped by code


@dataclass(frozen=True)
class Candidate:
    """A record to review: its 0-based data row, whether the answer was invalid, its confidence
    (None: none) and its kind (None: the records are not grouped)."""

    row: int
    invalid: bool
    confidence: float | None
    kind: str | None = None


@dataclass(frozen=True)
class Placed:
    """A candidate's place in the review order: ``rank`` 1 is reviewed first."""

    row: int
    rank: int
    reason: str


class Kinds:
    """Which kind of record each row is (see the module): choose the column from the header and
    ``group_by``, ``count`` every row's cell of it (whether the column holds codes is decided over
    the whole file, as the held-out split decides it), keep ``raw(cell)`` for the rows to review,
    then ``finish`` and turn each raw value into its kind with ``key``."""

    def __init__(self, columns: Sequence[str], group_by: str | None):
        lowered = {str(c).strip().lower(): str(c) for c in columns}
        self.named = group_by is not None and group_by.strip().lower() != NONE
        self.column: str | None = None
        self.chosen_by: str | None = None
        self.reason: str | None = None
        self.rule: str | None = None
        self._filled = self._coded = 0
        if group_by is not None and not self.named:
            self.reason = "turned off (group_by: none)"
            return
        if self.named:
            self.column = lowered.get(group_by.strip().lower())
            self.chosen_by = "evaluation.group_by"
            if self.column is None:
                self.named = False
                self.reason = f"the group_by column {group_by.strip()!r} is not in the file"
        if self.column is None:
            self.column = next((lowered[c.lower()] for c in DIAGNOSIS_COLUMNS if c.lower() in lowered), None)
            self.chosen_by = "a known diagnosis column" if self.column else None
            if self.column is None:
                self.reason = self.reason or "no known diagnosis column (name a column with evaluation.group_by)"

    def count(self, cells: Iterable[Any]) -> None:
        """Count the filled cells of the column, and those holding a code."""
        for cell in cells:
            text = _text(cell).strip()
            self._filled += bool(text)
            self._coded += bool(text) and ICD10.search(text) is not None

    def raw(self, cell: Any) -> tuple[str, str]:
        """(the ICD-10 category of the cell's first code, "" when none; the cell itself when the
        column was named, since it may be grouped by value)."""
        text = _text(cell).strip()
        found = ICD10.search(text)
        return (found.group(1).upper() if found else NO_CODE), (text if self.named else "")

    def finish(self) -> dict[str, Any]:
        """Decide the rule now that every row was counted; returns how the records were grouped."""
        coded = self._filled and self._coded >= CODED_SHARE * self._filled
        if self.column is not None and coded:
            self.rule = ICD_RULE if self.named else BLOCK_RULE
        elif self.column is not None and self.named:
            self.rule = VALUE_RULE
        elif self.column is not None:
            self.reason = (f"the diagnosis column {self.column!r} holds no ICD-10-style codes "
                           "(name a column with evaluation.group_by)")
            self.column = self.chosen_by = None
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """The column, its rule and who chose it (and why a named column was not used); or why
        there is no grouping."""
        if self.rule is None:
            return {"column": None, "reason": self.reason}
        return {"column": self.column, "rule": self.rule, "chosen_by": self.chosen_by,
                **({"note": self.reason} if self.reason else {})}

    def key(self, raw: tuple[str, str]) -> str | None:
        """The kind of a row from its ``raw`` value (None: not grouped)."""
        category, value = raw
        if self.rule is None:
            return None
        if self.rule == VALUE_RULE:
            return value
        if self.rule == BLOCK_RULE and category != NO_CODE:
            return _block(category) or category
        return category

    def label(self) -> str | None:
        """How a reason names the grouping (a column name and a rule, never a cell)."""
        if self.rule is None:
            return None
        how = {BLOCK_RULE: "ICD-10-CM block", ICD_RULE: "ICD-10 category", VALUE_RULE: "value"}[self.rule]
        return f"{self.column}'s {how}"


def _block(category: str) -> str | None:
    """The ICD-10-CM block of a category, or None (unknown, or the code sets are not installed)."""
    from ..data import codes

    try:
        return codes.block_of(category)
    except codes.CodeSetMissing:
        return None


def _text(cell: Any) -> str:
    """An input cell as text again (pandas' missing value is an empty cell)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return ""
    return str(cell)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def review_order(candidates: Iterable[Candidate], kinds: str | None = None) -> list[Placed]:
    """The candidates in the order the experts should rate them (``ORDER_RULE``), each with its
    rank and reason. ``kinds`` says how the kinds were found (e.g. "DischargeDiagnosis's ICD-10-CM
    block") for the reasons; with None, or candidates without a kind, the order is by confidence alone."""
    tiers: dict[int, list[Candidate]] = {0: [], 1: [], 2: []}
    for c in candidates:
        if kinds is None:
            c = Candidate(c.row, c.invalid, c.confidence)
        tiers[0 if c.invalid else 1 if c.confidence is None else 2].append(c)
    ordered: list[tuple[Candidate, int]] = []  # (candidate, its place among its kind in its tier, 0-based)
    for tier in (0, 1, 2):
        members = sorted(tiers[tier], key=lambda c: (c.confidence if c.confidence is not None else 0.0, c.row))
        seen: dict[str | None, int] = {}
        places = []
        for c in members:
            places.append(seen.get(c.kind, 0))
            seen[c.kind] = places[-1] + 1
        # round r takes the r-th least sure record of every kind, least sure first
        ordered += sorted(zip(members, places), key=lambda m: (m[1], m[0].confidence or 0.0, m[0].row))
    grouped = kinds is not None and any(c.kind is not None for c, _ in ordered)
    numbers: dict[str | None, int] = {}
    if grouped:
        for c, _ in ordered:
            numbers.setdefault(c.kind, len(numbers) + 1)
    return [Placed(c.row, rank, _reason(c, place, numbers, kinds if grouped else None))
            for rank, (c, place) in enumerate(ordered, start=1)]


def _reason(c: Candidate, place: int, numbers: dict[str | None, int], kinds: str | None) -> str:
    """Why a record is where it is, in plain words (a kind named only by its number)."""
    kind = f"kind {numbers[c.kind]} of {len(numbers)} by {kinds}" if kinds else None
    if c.invalid:
        head = "invalid answer"
    elif c.confidence is None:
        head = "valid answer without a confidence"
    else:
        head = f"confidence {c.confidence:.2f}"
        if kind:
            which = "the least sure" if place == 0 else f"the {_ordinal(place + 1)} least sure"
            return f"{head}, {which} of its kind ({kind})"
        return f"{head}, least confident first (no column to group the records by)"
    return f"{head} ({kind})" if kind else head


def review_header(columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the input's columns needs_review.csv keeps, in order; the whole header)."""
    kept = [columns[i] for i in _kept_positions(columns)]
    return kept, [*kept, *REVIEW_COLUMNS]


def _kept_positions(columns: Sequence[str]) -> list[int]:
    """The positions of the input's columns that needs_review.csv keeps (a repeated name keeps each)."""
    left_out = {c.casefold() for c in LEFT_OUT_COLUMNS}
    return [i for i, c in enumerate(columns) if str(c).strip().casefold() not in left_out]


def _confidence(text: str) -> float | None:
    """ratings.csv's confidence cell as a number (None: empty, or not a finite number)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def write_needs_review(input_csv: str | os.PathLike, ratings_csv: str | os.PathLike, dest: str | os.PathLike,
                       below: float, *, group_by: str | None = None, chunk_rows: int = 500) -> dict:
    """Write ``needs_review.csv`` (see the module) for the records whose answer was invalid, had no
    confidence or a confidence under ``below``; ``group_by`` names the column of the kinds of
    records (None: a known diagnosis column). Returns the counts and the order's rule:
    ``{"threshold", "records", "invalid", "without_confidence" (invalid answers included), "order"
    (``ORDER_RULE``), "grouped_by"}`` (the column, its rule and how many kinds the records to review
    are of; or why there is no grouping)."""
    table = scan_csv(input_csv)
    _, header = review_header(table.columns)
    kinds = Kinds(table.columns, group_by)
    dest = Path(dest)
    found: list[tuple[int, bool, float | None, tuple[str, str]]] = []
    spans: dict[int, tuple[int, int]] = {}  # row -> (offset, length) in the scratch file
    with tempfile.TemporaryFile(dir=dest.parent) as scratch:  # unnamed: nothing left behind, whatever happens
        for row, invalid, sure, raw, line in _candidates(table, ratings_csv, kinds, below, chunk_rows):
            found.append((row, invalid, sure, raw))
            data = line.encode("utf-8")
            spans[row] = (scratch.tell(), len(data))
            scratch.write(data)
        described = kinds.finish()
        candidates = [Candidate(row, invalid, sure, kinds.key(raw)) for row, invalid, sure, raw in found]
        del found
        order = review_order(candidates, kinds.label())
        scratch.flush()

        def lines() -> Iterator[str]:
            yield csv_text([header])
            for placed in order:
                offset, length = spans[placed.row]
                scratch.seek(offset)
                # the record's cells, then its rank and reason ("," joins the two pieces of one CSV row)
                yield scratch.read(length).decode("utf-8") + "," + csv_text([[placed.rank, placed.reason]])

        fsutil.write_lines(dest, lines())
    if kinds.rule is not None:
        described["kinds"] = len({c.kind for c in candidates})
    return {"threshold": below, "records": len(candidates), "invalid": sum(c.invalid for c in candidates),
            "without_confidence": sum(c.confidence is None for c in candidates), "order": ORDER_RULE,
            "grouped_by": described}


def _candidates(table, ratings_csv: str | os.PathLike, kinds: Kinds, below: float,
                chunk_rows: int) -> Iterator[tuple[int, bool, float | None, tuple[str, str], str]]:
    """(row, invalid, confidence, raw kind, the CSV text of the row's cells up to Review Rank,
    without its line end) for each record to review, reading the input and ``ratings_csv`` side by
    side; every row's kind column is counted on the way."""
    with open(ratings_csv, newline="", encoding="utf-8") as fh, \
            contextlib.closing(read_chunks(table, chunk_rows)) as chunks:
        rated = csv.DictReader(fh)
        positions = _kept_positions(table.columns)
        kind_at = table.columns.index(kinds.column) if kinds.column is not None else None
        for first, chunk in chunks:
            if kind_at is not None:
                kinds.count(chunk.iloc[:, kind_at].tolist())
            for offset, record in enumerate(chunk.itertuples(index=False, name=None)):
                verdict = {k: unguard_cell(v) if isinstance(v, str) else v for k, v in next(rated).items()}
                if not verdict.get("model"):  # an empty prompt: nobody was asked
                    continue
                sure = _confidence(verdict.get("confidence") or "")
                invalid = verdict.get("valid") != "true"
                if not invalid and sure is not None and sure >= below:
                    continue
                raw = kinds.raw(record[kind_at]) if kind_at is not None else ("", "")
                cells = [*(_text(record[i]) for i in positions), "", "", verdict.get("rating", ""),
                         verdict.get("label", ""), verdict.get("confidence") or "", verdict.get("rationale", "")]
                yield first + offset, invalid, sure, raw, csv_text([cells])[:-1]


__all__ = ["Candidate", "EXPERT_COLUMNS", "Kinds", "MODEL_COLUMNS", "MODEL_CONFIDENCE_COLUMN", "MODEL_LABEL_COLUMN",
           "MODEL_RATING_COLUMN", "MODEL_RATIONALE_COLUMN", "ORDER_COLUMNS", "ORDER_RULE", "Placed",
           "REVIEW_COLUMNS", "REVIEW_RANK_COLUMN", "REVIEW_RATIONALE_COLUMN", "REVIEW_REASON_COLUMN", "review_header",
           "review_order", "write_needs_review"]
