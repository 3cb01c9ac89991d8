"""Which rows a job holds out, chosen so that agreement measured on them is honest.

A random split of a real export flatters a model: a held-out row often repeats a training row word
for word, and nearly always shares its diagnosis with one, so the figure measures memory. This
module makes two held-out sets and trains on the rest:

- **new kinds of records** (the grouped split): whole groups of rows, chosen so that no group
  straddles training and held-out rows. The group is a column the user names
  (``evaluation.group_by``, the job's ``group_by``, ``--group-by``), else the first known diagnosis
  column (``DIAGNOSIS_COLUMNS``) whose cells mostly hold ICD-10-style codes, grouped by the
  three-character category of the first code (J06.9 and J06.0 are one group). Rows with no code in
  such a column are groups of their own. With fewer than ``MIN_GROUPS`` groups there is no grouped
  set, and the reason is recorded.
- **familiar records**: a seeded sample of the remaining rows, stratified by rating, like the
  training rows they sit beside.

Duplicates (the same prompt once case, spacing and punctuation are ignored) are kept together: a
text is all in training or all held out, and a held-out text is measured once; its other copies
are set aside (neither trained on nor measured) and counted. ``groups_of`` reads the group column
of a raw table; ``split`` makes the three sets. Nothing here logs or names a cell value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# Columns that hold a visit's diagnoses in the exports this product reads (BioSense's names and
# common variants), matched without regard to case.
DIAGNOSIS_COLUMNS = ("DischargeDiagnosis", "Discharge_Diagnosis", "DiagnosisCode", "Diagnosis_Code",
                     "Diagnosis_Combo", "DiagnosisCombo", "Diagnosis", "DxCode", "Dx", "ICD10", "ICD_10")
# An ICD-10(-CM) code: a letter (not U), two characters, then optionally a dot and up to four
# more, in any case: J06.9, J069, S72.001A, b97.29. The group is the three-character category.
ICD10 = re.compile(r"(?<![A-Za-z0-9])([A-TV-Z][0-9][0-9AB])(?:\.?[0-9A-Z]{1,4})?(?![A-Za-z0-9])", re.IGNORECASE)
CODED_SHARE = 0.5  # a diagnosis column "holds codes" when at least this share of its filled cells do
MIN_GROUPS = 5  # fewer groups than this: no grouped held-out set
NONE = "none"  # group_by: none turns the grouped split off
ICD_RULE = "ICD-10 category: the first three characters of the first code in the cell"
VALUE_RULE = "the cell's value"


@dataclass
class Grouping:
    """How the rows were grouped: ``column`` (None: not grouped), the ``rule``, who chose it, and
    ``reason`` when there is no grouping."""

    column: str | None
    rule: str | None = None
    chosen_by: str | None = None  # "evaluation.group_by" | "a known diagnosis column"
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k == "column"}


def _codes(values: pd.Series) -> pd.Series:
    """The ICD-10 category of the first code of each cell ("" when it holds none)."""
    return values.str.extract(ICD10, expand=False).fillna("").str.upper()


def groups_of(df: pd.DataFrame, group_by: str | None) -> tuple[pd.Series | None, Grouping]:
    """(one group per row of ``df``, or None; how). ``group_by`` names a column (matched without
    regard to case; a missing one is a ``KeyError`` naming it), ``"none"`` turns grouping off,
    None looks for a known diagnosis column holding ICD-10-style codes."""
    lowered = {str(c).strip().lower(): c for c in df.columns}
    if group_by is not None and group_by.strip().lower() == NONE:
        return None, Grouping(None, reason="turned off (group_by: none)")
    if group_by is not None:
        column = lowered.get(group_by.strip().lower())
        if column is None:
            raise KeyError(group_by)
        chosen_by = "evaluation.group_by"
    else:
        column = next((lowered[c.lower()] for c in DIAGNOSIS_COLUMNS if c.lower() in lowered), None)
        if column is None:
            return None, Grouping(None, reason="no known diagnosis column (name a column with evaluation.group_by)")
        chosen_by = "a known diagnosis column"
    values = df[column].fillna("").astype(str).str.strip()
    codes = _codes(values)
    filled = int((values != "").sum())
    coded = int((codes != "").sum())
    if filled and coded >= CODED_SHARE * filled:
        return codes, Grouping(str(column), ICD_RULE, chosen_by)
    if group_by is None:
        return None, Grouping(None, reason=f"the diagnosis column {str(column)!r} holds no ICD-10-style codes "
                                           "(name a column with evaluation.group_by)")
    return values, Grouping(str(column), VALUE_RULE, chosen_by)


_NOT_WORD = re.compile(r"[\W_]+")


def normalized(text: str) -> str:
    """A prompt as duplicates are compared: case folded, punctuation and runs of spaces as one space."""
    return _NOT_WORD.sub(" ", text.casefold()).strip()


@dataclass
class Split:
    """Positions into the dataset's frame (each sorted ascending) and what the split did."""

    train: np.ndarray
    familiar: np.ndarray
    new_kinds: np.ndarray
    set_aside: np.ndarray  # copies of held-out texts: neither trained on nor measured
    kind: str  # "grouped" (both sets) | "random" (familiar only) | "none" (no hold-out)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def held_out(self) -> np.ndarray:
        """Familiar rows, then new-kinds rows: the order of ``validation_data.jsonl``."""
        import numpy as np

        return np.concatenate([self.familiar, self.new_kinds]).astype(np.int64)


def stratified(units: np.ndarray, ratings: np.ndarray, fraction: float, rng) -> np.ndarray:
    """A seeded sample of ``units`` (one rating each): per rating ``round(fraction * n)``, at least
    one where the rating has two or more units, never all of them."""
    import numpy as np

    chosen = []
    for value in np.unique(ratings):
        members = units[ratings == value]
        if len(members) < 2:
            continue
        take = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        chosen.append(rng.permutation(members)[:take])
    return np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)


def _pick_groups(group_ids: np.ndarray, ratings: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Whole groups for the new-kinds set, about ``fraction`` of the rows of each rating: groups are
    taken in a seeded order by their most common rating, a group too big for what its rating
    still lacks is passed over, and never more than half of the rows are taken."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"g": group_ids, "r": ratings})
    sizes = frame.groupby("g").size()
    dominant = frame.groupby("g")["r"].agg(lambda s: s.value_counts().index[0])
    wanted = {int(r): fraction * int(n) for r, n in frame["r"].value_counts().items()}
    order = rng.permutation(sizes.index.to_numpy())
    taken, have = [], {r: 0 for r in wanted}
    total, limit = 0, len(group_ids) // 2
    for g in order:
        r, size = int(dominant[g]), int(sizes[g])
        lacking = wanted[r] - have[r]
        if lacking <= 0 or size > max(2 * lacking, 1) or total + size > limit:
            continue
        taken.append(g)
        have[r] += size
        total += size
    return np.array(taken, dtype=group_ids.dtype)


def split(prompts: np.ndarray, ratings: np.ndarray, groups: np.ndarray | None, *, fraction: float,
          seed: int, min_rows: int) -> Split:
    """The three sets for rows with these prompts, ratings and (optional) groups; see the module."""
    import numpy as np
    import pandas as pd

    n = len(prompts)
    everything = np.arange(n, dtype=np.int64)
    empty = np.empty(0, dtype=np.int64)
    if n < min_rows or fraction <= 0:
        return Split(everything, empty, empty, empty, "none",
                     {"reason": f"fewer than {min_rows} usable rows (defaults.min_rows)" if n < min_rows
                      else "defaults.validation_fraction is 0"})
    texts = pd.Series([normalized(p) for p in prompts], dtype=object)
    cluster, uniques = pd.factorize(texts)
    first = pd.Series(everything).groupby(cluster).min().to_numpy()  # each text's first row
    info: dict[str, Any] = {"duplicate_rows": int(n - len(uniques))}
    rng = np.random.default_rng(seed)
    new_kinds_units = empty
    kind = "random"
    if groups is not None:
        row_group = np.asarray(groups, dtype=object)
        # a row without a group (no code) is a group of its own: its text's
        row_group = np.where(row_group == "", np.array([f"\x00{c}" for c in cluster], dtype=object), row_group)
        unit_group = row_group[first]  # a text's copies follow its first row's group
        group_ids, group_names = pd.factorize(pd.Series(unit_group, dtype=object))
        info["groups"] = int(len(group_names))
        if len(group_names) >= MIN_GROUPS:
            picked = _pick_groups(group_ids, ratings[first], fraction, rng)
            new_kinds_units = np.flatnonzero(np.isin(group_ids, picked))
            info["held_out_groups"] = int(len(picked))
            if len(new_kinds_units):
                kind = "grouped"
            else:
                info["reason"] = "no group is small enough to hold out"
        else:
            info["reason"] = f"{len(group_names)} groups, fewer than {MIN_GROUPS}"
    rest = np.setdiff1d(np.arange(len(uniques)), new_kinds_units)
    familiar_units = stratified(rest, ratings[first][rest], fraction, rng)
    held_units = np.concatenate([familiar_units, new_kinds_units])
    held_mask = np.isin(cluster, held_units)
    representatives = np.zeros(n, dtype=bool)
    representatives[first] = True
    familiar = np.flatnonzero(np.isin(cluster, familiar_units) & representatives)
    new_kinds = np.flatnonzero(np.isin(cluster, new_kinds_units) & representatives)
    set_aside = np.flatnonzero(held_mask & ~representatives)
    info["duplicates_set_aside"] = int(len(set_aside))
    return Split(everything[~held_mask], familiar, new_kinds, set_aside, kind, info)


__all__ = ["DIAGNOSIS_COLUMNS", "Grouping", "Split", "groups_of", "normalized", "split"]
