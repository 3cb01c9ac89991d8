"""CSV + rating mapping → a validated ``Dataset`` (rows, labels, drop counts, warnings).

This module owns the last step between a user's files and a clean table: validating rows (column
resolution, integer ratings, drops, unmapped ratings, conflicting duplicates) and the one call that
runs the whole chain. Reading the CSV lives in ``csvfile`` and the rating mapping in ``mapping``;
``load_dataset`` composes them. Every failure is one ``DatasetError`` subclass naming the file, the
column and the row where they apply, never a cell value: these are patient records. Row-level
problems (rows dropped for an empty prompt or rating, prompts repeated with different ratings,
ratings missing from the mapping) name their 1-based data rows, the numbering of ``source_row``:
the first ``ROW_LIST`` of them, then "and N more"; ``Dataset.problem_rows`` keeps every one.

- ``validate_frame(df, mapping, *, source, read_info=None) -> Dataset``: column resolution, rating
  parsing, drops, unmapped ratings, conflicting duplicates. ``mapping`` None → infer (or MappingError
  saying which file to add).
- ``load_dataset(csv_path, mapping_path=None, *, mapping=None) -> Dataset``: the two above in one call.

Never log, never call Ollama; messages never contain cell values.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .csvfile import (
    EXPERT_RATING_COLUMN,
    ID_COLUMNS,
    PROMPT_COLUMNS,
    RATING_COLUMN,
    RATIONALE_COLUMNS,
    ReadInfo,
    canonical_columns,
    read_csv,
)
from ..text import printable
from ..errors import (
    DatasetError,
    DatasetFormatError,
    EmptyDatasetError,
    LabelRatingMismatchError,
    MappingError,
    MissingColumnError,
    UnmappedRatingError,
)
from .mapping import (
    ROW_LIST,
    RatingMapping,
    _parse_ratings,
    _raise_invalid,
    _stripped,
    _text_values,
    disagreeing_label_rows,
    infer_mapping,
    load_mapping,
    mapping_from_object,
    rows_text,
)

if TYPE_CHECKING:  # pandas is imported lazily by the implementation where it is needed
    import numpy as np
    import pandas as pd

    from .template import Template



@dataclass
class Dataset:
    """A validated dataset.

    ``frame`` holds only usable rows with canonical columns: ``prompt`` (str), ``rating`` (int64),
    ``rationale`` (str, "" when absent), ``row_id`` (str, present only when the source had an id
    column), ``source_row`` (int: the 1-based data row number in the source, for traceability) and
    ``group`` (str, present only when ``grouping`` names a column: the row's group for the held-out
    split, "" for a row with none). Its index is a clean RangeIndex 0..n-1.
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
    # reason → every 1-based data row number concerned, ascending: "empty_prompt" and "empty_rating"
    # (dropped rows), "conflicting_rating" (every row of a prompt that appears with several ratings)
    problem_rows: dict[str, list[int]] = field(default_factory=dict)
    # where the prompts came from: {"kind": "column", "column": name} or {"kind": "template",
    # "template": Template.to_json(), "builtin": bool}; and {"ratings_from": "labels"} when the
    # standardized ratings were derived from the Expert Rating labels through the mapping
    prompt_source: dict = field(default_factory=dict)
    # how rows are grouped for the held-out split (``holdout.Grouping.to_json``); the frame has a
    # ``group`` column when ``grouping["column"]`` is set
    grouping: dict = field(default_factory=dict)
    # whether the prompts expand ICD-10-CM codes (``codes.py``): the setting, the columns, the code
    # sets' versions and the counts, or why not (``code_knowledge_record``)
    code_knowledge: dict = field(default_factory=dict)

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
            "grouping": dict(self.grouping),
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


# --- validating rows ---------------------------------------------------------------------------

def _resolve_columns(df: pd.DataFrame, source: str, *, file_columns: int | None = None,
                     has_mapping: bool = False) -> dict[str, str]:
    """Role → column name. ``file_columns`` is how many columns the file itself has (the frame may
    hold a prompt column rendered from a template); ``has_mapping`` whether a mapping was given."""
    names = [str(c) for c in df.columns]
    if RATING_COLUMN not in names and EXPERT_RATING_COLUMN in names and not has_mapping:
        stem = os.path.splitext(source)[0] if source and not source.startswith("<") else "NAME"
        raise MappingError(
            f"missing required column {RATING_COLUMN!r}: the file has {EXPERT_RATING_COLUMN!r} labels, and a "
            "rating mapping is needed to turn them into ratings", file=source, column=RATING_COLUMN,
            hint=f"give the mapping (labels as keys, integer ratings as values, e.g. "
                 f'{{"Match": 1, "Does Not Match": 0, "Unknown": -1}}): in the inbox as {stem}.mapping.json '
                 f"beside {stem}.csv, on the command line with --mapping FILE")
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
        own = names if file_columns is None else names[:file_columns]
        # a template builds the prompt from any columns; a missing rating it cannot replace
        use = (" or set prompt_template to build the prompt from the file's columns (a list such as "
               "[ChiefComplaintOrig, DischargeDiagnosis], or a format string with {Column} fields: in the job "
               "file, the config's defaults or --prompt-template)" if wanted is PROMPT_COLUMNS else "")
        raise MissingColumnError(
            f"missing required column {label}{suggestion}; the file has {len(own)} column(s): {_column_list(own)}",
            file=source, column=wanted[0],
            hint=f"a dataset needs a prompt column ({' or '.join(PROMPT_COLUMNS)}) and {RATING_COLUMN}; "
                 f"rename the column{use} and drop the file again")
    rationale = next((c for c in RATIONALE_COLUMNS if c in names), None)
    if rationale:
        columns["rationale"] = rationale
    ident = next((c for c in ID_COLUMNS if c in names), None)
    if ident:
        columns["id"] = ident
    return columns


MAX_COLUMNS_NAMED = 30  # a wide export's header in an error: the first names, then how many more


def _column_list(names: list[str]) -> str:
    """The file's column names for an error (names only, escaped and cut; never a cell)."""
    shown = ", ".join(repr(printable(n, limit=60)) for n in names[:MAX_COLUMNS_NAMED])
    more = len(names) - MAX_COLUMNS_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def _conflicting_duplicates(prompts: np.ndarray, ratings: np.ndarray) -> tuple[int, np.ndarray]:
    """How many distinct prompts appear with more than one rating, and the positions of all their
    rows (ascending). pandas' hash table finds the repeated prompts (C speed, about a third of the
    memory of a Python set of every prompt); only those are grouped."""
    import numpy as np
    import pandas as pd

    repeated = np.flatnonzero(pd.Series(prompts, dtype=object).duplicated(keep=False).to_numpy())
    if not len(repeated):  # every prompt distinct: the common case
        return 0, repeated
    pairs = pd.DataFrame({"prompt": prompts[repeated], "rating": ratings[repeated]})
    conflicting = pairs.groupby("prompt", sort=False)["rating"].transform("nunique").to_numpy() > 1
    return int(pairs["prompt"][conflicting].nunique()), repeated[conflicting]


def _counted(values: list[str], counts: np.ndarray) -> str:
    """``2 (3 rows), 7 (1 row)``: the first ``ROW_LIST`` values with their row counts, then "and N
    more values", so that a column of thousands of distinct values still gives a one-line error."""
    shown = ", ".join(f"{v} ({int(c)} row{'s' if c != 1 else ''})" for v, c in zip(values[:ROW_LIST], counts))
    more = len(values) - ROW_LIST
    return shown + (f" and {more} more value{'s' if more != 1 else ''}" if more > 0 else "")


def _refuse_disagreeing_labels(df: pd.DataFrame, mapping: RatingMapping, ratings: np.ndarray,
                               keep: np.ndarray, source: str) -> None:
    """Refuse the dataset when a usable row's ``Expert Rating`` label has another rating in the
    given mapping than the row's ``Standardized_Rating``: which of the two the experts meant is
    unknown, and training on either would teach the model a rating nobody checked. Names the rows
    and their count, never a label or a cell."""
    rows = disagreeing_label_rows(_stripped(_text_values(df[EXPERT_RATING_COLUMN])), ratings, keep, mapping)
    if len(rows):
        raise LabelRatingMismatchError(
            f"{len(rows)} row(s) have an {EXPERT_RATING_COLUMN!r} label whose rating in the mapping "
            f"({mapping.source}) is not their {RATING_COLUMN}: {rows_text(rows)}; the dataset is refused "
            "rather than trained on ratings that contradict their labels",
            file=source, column=RATING_COLUMN, row=int(rows[0]))


def validate_frame(df: pd.DataFrame, mapping: RatingMapping | dict | None, *, source: str = "<dataframe>",
                   read_info: ReadInfo | None = None, file_columns: int | None = None,
                   group_by: str | None = None) -> Dataset:
    """Turn a raw table into a ``Dataset``: resolve columns, drop rows with an empty prompt or rating,
    parse ratings, check them against the mapping (inferred when None) and, with a given mapping,
    each row's ``Expert Rating`` label against its rating, count conflicting duplicates.
    ``file_columns``: how many columns the file has, when ``df`` also holds derived ones.
    ``group_by``: the column whose values group rows for the held-out split (``holdout.groups_of``;
    None: a known diagnosis column with ICD-10-style codes, if any)."""
    import numpy as np
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise DatasetError(f"expected a pandas DataFrame, got {type(df).__name__}", file=source)
    df = df.rename(columns=lambda c: str(c).strip())
    df.columns = canonical_columns(df.columns)  # C_Biosense_ID is C_BioSense_ID
    columns = _resolve_columns(df, source, file_columns=file_columns, has_mapping=mapping is not None)
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

    positions = np.flatnonzero(keep)
    kept_ratings = ratings[keep]
    known = np.isin(kept_ratings, np.array(mapping.values, dtype=np.int64))
    if not known.all():
        values, counts = np.unique(kept_ratings[~known], return_counts=True)
        shown = _counted([str(int(v)) for v in values], counts)
        unmapped_rows = positions[~known] + 1
        raise UnmappedRatingError(
            f"ratings not in the rating mapping ({mapping.source}): {shown} in {rows_text(unmapped_rows)}",
            file=source, column=RATING_COLUMN, row=int(unmapped_rows[0]),
            hint="add these ratings to the mapping file, or fix those rows, and drop the files again")
    if not mapping.inferred and EXPERT_RATING_COLUMN in df.columns:
        _refuse_disagreeing_labels(df, mapping, ratings, keep, source)

    dropped = {"empty_prompt": int(empty_prompt.sum()), "empty_rating": int(empty_rating.sum())}
    if not keep.any():
        raise EmptyDatasetError(
            f"no usable rows: {rows_read} read, {dropped['empty_prompt']} with an empty prompt, "
            f"{dropped['empty_rating']} with an empty rating", file=source,
            hint="fill in the prompt and rating of each row and drop the file again")

    data: dict[str, Any] = {
        "prompt": prompts[keep],
        "rating": kept_ratings.astype(np.int64),
        "rationale": (_stripped(_text_values(df[columns["rationale"]])[keep])
                      if "rationale" in columns else np.full(len(positions), "", dtype=object)),
    }
    if "id" in columns:
        data["row_id"] = _text_values(df[columns["id"]])[keep]
    data["source_row"] = positions + 1
    groups, grouping = _groups(df, group_by, source)
    if groups is not None:
        data["group"] = groups.to_numpy(dtype=object)[keep]
    frame = pd.DataFrame(data)

    conflicts, conflict_positions = _conflicting_duplicates(data["prompt"], data["rating"])
    problem_rows = {
        "empty_prompt": (np.flatnonzero(empty_prompt) + 1).tolist(),
        "empty_rating": (np.flatnonzero(empty_rating) + 1).tolist(),
        "conflicting_rating": data["source_row"][conflict_positions].tolist(),
    }
    warnings = list(read_info.warnings) if read_info else []
    for reason, what in (("empty_prompt", "an empty prompt"), ("empty_rating", "an empty rating")):
        if dropped[reason]:
            warnings.append(f"dropped {dropped[reason]} row(s) with {what} ({rows_text(problem_rows[reason])})")
    if conflicts:
        warnings.append(f"{conflicts} prompt(s) appear more than once with different ratings "
                        f"({rows_text(problem_rows['conflicting_rating'])}); check those rows before training")
    return Dataset(frame=frame, mapping=mapping, source=source, columns=columns, rows_read=rows_read,
                   dropped=dropped, warnings=warnings, conflicting_duplicates=conflicts, read_info=read_info,
                   problem_rows=problem_rows, prompt_source={"kind": "column", "column": columns["prompt"]},
                   grouping=grouping.to_json())


def _groups(df: pd.DataFrame, group_by: str | None, source: str):
    """``holdout.groups_of``, with a named column that is missing as a ``MissingColumnError``."""
    from .holdout import groups_of

    try:
        return groups_of(df, group_by)
    except KeyError:
        lowered = {str(c).lower(): str(c) for c in df.columns}
        close = difflib.get_close_matches(str(group_by).lower(), list(lowered), n=1, cutoff=0.6)
        suggestion = f" (closest column: {lowered[close[0]]!r})" if close else ""
        raise MissingColumnError(
            f"the group_by column {str(group_by)!r} is not in the file{suggestion}", file=source,
            column=str(group_by), hint="name a column of the file in group_by (evaluation.group_by, the job's "
                                       "group_by or --group-by), or none for a random split") from None


def load_dataset(csv_path: str | os.PathLike, mapping_path: str | os.PathLike | None = None, *,
                 mapping: RatingMapping | dict | None = None, template: Template | None = None,
                 group_by: str | None = None, code_knowledge: str = "auto") -> Dataset:
    """Read and validate a dataset file. The mapping comes from ``mapping_path``, else ``mapping``,
    else is inferred from the ``Expert Rating`` column. The mapping is read first so that a bad
    mapping fails before a large CSV is parsed. A raw export (no prompt column) gets its prompts
    from ``template`` or the built-in syndromic-surveillance template, and its ratings from its
    labels through the mapping when it has no ``Standardized_Rating`` column (``derive_columns``).
    ``group_by``: see ``validate_frame``. ``code_knowledge`` (auto, on, off): whether the prompts a
    template builds expand the ICD-10-CM codes of its diagnosis columns (``code_knowledge_record``)."""
    if mapping_path is not None:
        mapping = load_mapping(mapping_path)
    df, info = read_csv(csv_path)
    df.columns = canonical_columns(df.columns)  # known columns in any case (C_Biosense_ID)
    file_columns = len(df.columns)
    df, source = derive_columns(df, mapping, template, file=info.file, code_knowledge=code_knowledge)
    knowledge = source.pop("code_knowledge", None) or code_knowledge_record(code_knowledge, None, df)
    ds = validate_frame(df, mapping, source=info.file, read_info=info, file_columns=file_columns,
                        group_by=group_by)
    ds.code_knowledge = knowledge
    if knowledge.get("warning"):
        ds.warnings.append(knowledge.pop("warning"))
    if source:
        ds.prompt_source = {**ds.prompt_source, **source}
        if "template" in source:
            kind = "the built-in syndromic-surveillance template" if source.get("builtin") else "the prompt template"
            ds.warnings.insert(0, f"the prompts were built from {kind} (the file has no formatted_prompt or "
                                  "Prompt column)")
    return ds


def derive_columns(df: pd.DataFrame, mapping: RatingMapping | dict | None, template: Template | None, *,
                   file: str, code_knowledge: str = "auto") -> tuple[pd.DataFrame, dict]:
    """The prompt and rating columns of a raw export, when the file lacks them: prompts rendered
    from ``template`` (or the built-in one for syndromic-surveillance columns), with the ICD-10-CM
    codes of its diagnosis columns expanded as ``code_knowledge`` says, ratings from the
    ``Expert Rating`` labels through the mapping (an unmapped label is an error naming the label and
    how many rows carry it). Returns the frame and what was derived ({} when nothing was; with a
    template, ``code_knowledge``: the ``code_knowledge_record``)."""
    import numpy as np

    from .codes import CodeCounts
    from .template import builtin_for, check_columns, render

    names = [str(c).strip() for c in df.columns]
    derived: dict = {}
    if not any(c in names for c in PROMPT_COLUMNS):
        chosen = template or builtin_for(names)
        if chosen is not None:
            df = df.rename(columns=lambda c: str(c).strip())
            check_columns(chosen, names, file=file)
            knowledge = code_knowledge_record(code_knowledge, chosen, df)
            chosen = chosen.with_codes(knowledge.get("columns", ()))
            counts = CodeCounts()
            df = df.assign(**{PROMPT_COLUMNS[0]: render(chosen, df, counts).to_numpy(dtype=object)})
            if chosen.codes:
                knowledge.update(counts.to_json())
            derived = {"kind": "template", "template": chosen.to_json(), "builtin": template is None,
                       "column": PROMPT_COLUMNS[0], "code_knowledge": knowledge}
    if RATING_COLUMN not in names and EXPERT_RATING_COLUMN in names and mapping is not None:
        if not isinstance(mapping, RatingMapping):
            mapping = mapping_from_object(mapping, "object")
        df = df.rename(columns=lambda c: str(c).strip())
        labels = _stripped(_text_values(df[EXPERT_RATING_COLUMN]))
        lookup = {str(k).strip(): str(int(v)) for k, v in mapping.labels.items()}
        mapped = np.array([lookup.get(label, "") for label in labels], dtype=object)
        unmapped = (labels != "") & (mapped == "")
        if unmapped.any():
            values, counts = np.unique(labels[unmapped], return_counts=True)
            shown = _counted([repr(v) for v in values], counts)
            rows = np.flatnonzero(unmapped) + 1
            raise UnmappedRatingError(
                f"{EXPERT_RATING_COLUMN} labels not in the rating mapping ({mapping.source}): {shown} in "
                f"{rows_text(rows)}", file=file, column=EXPERT_RATING_COLUMN, row=int(rows[0]),
                hint="add these labels to the mapping file, or fix those rows, and drop the files again")
        df = df.assign(**{RATING_COLUMN: mapped})
        derived = {**(derived or {"kind": "column"}), "ratings_from": "labels"}
    return df, derived


def code_knowledge_record(setting: str, template: Template | None, df: pd.DataFrame) -> dict:
    """Whether a template's prompts expand ICD-10-CM codes, and which columns: ``setting`` (auto: the
    known diagnosis columns that hold codes; on: every known diagnosis column; off: none), the
    columns, the code sets' packages and versions, or the ``reason`` there is no expansion (with a
    ``warning`` for the dataset when ``on`` could not be honoured). Counts are added by the caller."""
    from . import codes

    record: dict[str, Any] = {"setting": setting, "expanded": False}
    if setting == "off":
        return {**record, "reason": "turned off (code_knowledge: off)"}
    if template is None:
        record["reason"] = "the prompts are the file's prompt column, used as written"
    else:
        columns = codes.diagnosis_columns(template.columns, df, setting)
        if not columns:
            record["reason"] = ("no known diagnosis column of the prompt template holds ICD-10-style codes"
                                if setting == "auto" else "the prompt template uses no known diagnosis column")
        elif not codes.available():
            record["reason"] = "the ICD-10-CM code sets are not installed (pip install -e . installs them)"
        else:
            return {**record, "expanded": True, "columns": list(columns), "code_sets": codes.code_sets()}
    if setting == "on":
        record["warning"] = f"code_knowledge is on, but no code was expanded: {record['reason']}"
    return record
