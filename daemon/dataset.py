"""CSV + rating mapping → a validated ``Dataset`` (rows, labels, drop counts, warnings).

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

Never log, never call Ollama; messages never contain cell values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported lazily by the implementation where it is needed
    import pandas as pd

PROMPT_COLUMNS = ("formatted_prompt", "Prompt")
RATING_COLUMN = "Standardized_Rating"
RATIONALE_COLUMNS = ("Rationale of Rating", "Rationale_of_Rating")
ID_COLUMNS = ("Row_ID", "C_BioSense_ID")
EXPERT_RATING_COLUMN = "Expert Rating"

MAX_CELL_BYTES = 1 << 20  # 1 MiB: a larger cell is an error, not a prompt
MAX_COLUMNS = 1000


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
        raise NotImplementedError

    @property
    def has_rationale(self) -> bool:
        return "rationale" in self.columns

    def summary(self) -> dict[str, Any]:
        """Counts for metadata and logs: rows read/used, drops by reason, distribution, warnings,
        columns used, encoding, delimiter, hashes. No cell values."""
        raise NotImplementedError


def read_csv(path: str | os.PathLike, *, max_cell_bytes: int = MAX_CELL_BYTES,
             max_columns: int = MAX_COLUMNS) -> tuple[pd.DataFrame, ReadInfo]:
    raise NotImplementedError


def load_mapping(path: str | os.PathLike) -> RatingMapping:
    raise NotImplementedError


def mapping_from_object(obj: Any, source: str = "object") -> RatingMapping:
    raise NotImplementedError


def infer_mapping(df: pd.DataFrame, source: str = "<dataframe>") -> RatingMapping:
    raise NotImplementedError


def validate_frame(df: pd.DataFrame, mapping: RatingMapping | dict | None, *, source: str = "<dataframe>",
                   read_info: ReadInfo | None = None) -> Dataset:
    raise NotImplementedError


def load_dataset(csv_path: str | os.PathLike, mapping_path: str | os.PathLike | None = None, *,
                 mapping: RatingMapping | dict | None = None) -> Dataset:
    raise NotImplementedError
