"""A topic's training rows: what each model learned, and the union a retrain learns from.

Every job that builds a model for a topic records the rows it trained on (``rows_of``): in the
journal their keys, content hashes and ratings (``Journal.succeed`` with a ``TrainingSet``), and
in the topic's rows file the cells that make each row, addressed by content hash:
``<state>/topic_rows/<sha256 of the topic>.jsonl``, private (0700 folder, 0600 file), rewritten
atomically under a lock on its folder, never holding the same content twice. A row's key is
``id:`` + sha256 of its record id (``Row_ID`` / ``C_BioSense_ID``) where the input has one, else
``text:`` + sha256 of its normalised prompt (``holdout.normalized``); two rows are one when either
key matches.

A retrain (``prepare_retrain``) starts from the rows of the topic's model (its current model when
it recorded rows, else the latest job that did), reads the reviewed file with that model's mapping
and settings (rows without an ``Expert Rating`` are skipped and counted), adds each reviewed row
(a duplicate is kept once, the newest rating wins and a changed rating is counted as a conflict),
and writes the union as one CSV with the rows' own columns, so the job trains and is evaluated
like any other. A reviewed file that changes nothing is ``NothingNew``. No log line, message or
journal row holds a cell value.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.jobsettings import JobSettings, job_settings
from ..errors import DatasetError, EmptyDatasetError, FineTunerError
from .. import fsutil
from ..text import printable
from .journal import Journal, JobRecord, TrainingSet, normal_topic, utc_now
from .paths import Paths
from ..quality.review import LEFT_OUT_COLUMNS, REVIEW_RANK_COLUMN

ROWS_DIR = "topic_rows"
SCRATCH_DIR = "retrain"  # a retrain's union CSV and mapping while the job runs (removed at its end)
UNION_FILE = "union.csv"
MAPPING_FILE = "union.mapping.json"
# the base job's settings a retrain keeps unless its job file gives them
INHERITED = ("model", "topics", "epochs", "learning_rate", "batch_size", "fallback", "topic_definition", "group_by",
             "code_knowledge")


class TopicRowsError(FineTunerError):
    """A retrain cannot start: no model of the topic recorded its rows, or its rows file lacks some."""

    default_hint = "build a model for the topic first (drop its rated dataset with topics: in a job file)"


class NothingNew(Exception):
    """Every reviewed row is already among the topic's rows with the same content."""

    def __init__(self, base_job: str, counts: dict) -> None:
        super().__init__("nothing new")
        self.base_job = base_job
        self.counts = counts


@dataclass
class Row:
    """One training row: its keys, content hash, rating, the cells that make it and where it came from."""

    row_key: str
    text_key: str
    content_sha256: str
    rating: int
    cells: dict[str, str]
    rationale: str
    reviewed: bool = False
    added_by: str | None = None
    added_at: str | None = None

    def journal_row(self) -> dict:
        return {"row_key": self.row_key, "text_key": self.text_key, "content_sha256": self.content_sha256,
                "rating": self.rating, "reviewed": self.reviewed, "added_by": self.added_by,
                "added_at": self.added_at}


@dataclass
class Retrain:
    """A prepared retrain: the union's files, the settings, the counts and each row's origin."""

    topic: str
    base_job: str
    csv_path: Path
    mapping_path: Path
    settings: JobSettings
    counts: dict
    origins: dict[str, Row] = field(default_factory=dict)  # content sha256 -> the union's row


# --- keys and content ------------------------------------------------------------------------------

def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _excluded_columns() -> set[str]:
    # the input's rating and rationale, and what needs_review.csv adds (the experts' and the model's
    # answers, the review order): never part of a row's content
    return set(LEFT_OUT_COLUMNS)


def rows_of(ds: Any, csv_path: Path) -> list[Row]:
    """The usable rows of a loaded dataset with their keys and content: the cells of the file's row
    (all its own columns but ratings, rationales and the review's model columns; empty cells left
    out), the rating and the rationale. The file is read again for the cells."""
    from ..data.csvfile import canonical_columns, read_csv
    from ..data.holdout import normalized

    raw, _info = read_csv(csv_path)
    raw.columns = canonical_columns(raw.columns)
    skip = _excluded_columns()
    keep = [c for c in raw.columns if c not in skip]
    values = raw[keep].to_numpy(dtype=object)
    frame = ds.frame
    ids = frame["row_id"].to_numpy(dtype=object) if "row_id" in frame.columns else None
    out = []
    for i, (prompt, rating, rationale, source_row) in enumerate(zip(
            frame["prompt"].to_numpy(dtype=object), frame["rating"].to_numpy(),
            frame["rationale"].to_numpy(dtype=object), frame["source_row"].to_numpy())):
        cells = {c: str(v) for c, v in zip(keep, values[int(source_row) - 1]) if str(v) != ""}
        text_key = "text:" + _sha(normalized(str(prompt)))
        record_id = str(ids[i]).strip() if ids is not None else ""
        row_key = "id:" + _sha(record_id) if record_id else text_key
        content = json.dumps({"cells": cells, "rating": int(rating), "rationale": str(rationale)},
                             sort_keys=True, ensure_ascii=False)
        out.append(Row(row_key, text_key, _sha(content), int(rating), cells, str(rationale)))
    return out


def add_rows(union: dict[str, Row], rows: Iterable[Row], *, counts: dict) -> bool:
    """Add ``rows`` to ``union`` (slot -> row, in order): a row whose record id or normalised text
    is there already is a duplicate, kept once in its place; a different content replaces it (the
    newest wins), a different rating counted as a conflict. Returns whether ``union`` changed."""
    by_key = {r.row_key: slot for slot, r in union.items()}
    by_text = {r.text_key: slot for slot, r in union.items()}
    changed = False
    for row in rows:
        slot = by_key.get(row.row_key) or by_text.get(row.text_key)
        if slot is None:
            slot = row.row_key
            while slot in union:  # a slot named after a row that was replaced since
                slot += "'"
            union[slot] = row
            counts["rows_added"] += 1
            changed = True
        else:
            counts["duplicates"] += 1
            old = union[slot]
            if old.content_sha256 == row.content_sha256:
                continue
            counts["conflicts"] += old.rating != row.rating
            union[slot] = row
            changed = True
            for index, key in ((by_key, old.row_key), (by_text, old.text_key)):
                if index.get(key) == slot:
                    del index[key]  # the replaced row's keys no longer name it
        by_key[row.row_key] = slot
        by_text[row.text_key] = slot
    return changed


def training_set(topic: str, rows: list[Row], counts: dict | None = None) -> TrainingSet:
    """What the journal records of a job's rows: a plain build's rows (duplicates in the file kept
    once, the later one winning) or a retrain's union, with its counts."""
    if counts is None:
        counts = {"rows_before": 0, "rows_added": 0, "duplicates": 0, "conflicts": 0, "unreviewed_skipped": 0}
        union: dict[str, Row] = {}
        add_rows(union, rows, counts=counts)
        rows = list(union.values())
    return TrainingSet(topic=normal_topic(topic), rows=tuple(r.journal_row() for r in rows), counts=counts)


def job_topic(meta: Mapping) -> str:
    """The topic a job's model is for, as promote names it (its topics, joined, case aside)."""
    topics = meta.get("target_topics") if isinstance(meta.get("target_topics"), list) else []
    return normal_topic(", ".join(str(t) for t in topics))


# --- the topic's rows file -------------------------------------------------------------------------

def rows_file(paths: Paths, topic: str) -> Path:
    return paths.state_dir / ROWS_DIR / f"{_sha(normal_topic(topic))[:32]}.jsonl"


@contextlib.contextmanager
def _locked_rows_dir(paths: Paths):
    folder = fsutil.make_private_dir(paths.state_dir / ROWS_DIR)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in folder.glob(".*.tmp"):  # a write cut short by a kill: nobody else writes while we hold the lock
            stale.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)  # closing drops the lock


def sweep(paths: Paths) -> None:
    """At start-up: remove what a write of a rows file cut short by a kill left behind."""
    if (paths.state_dir / ROWS_DIR).is_dir():
        with _locked_rows_dir(paths):
            pass


def _read_store(path: Path) -> dict[str, dict]:
    """Content sha256 -> ``{"cells", "rating", "rationale"}`` from a topic's rows file ({} when missing)."""
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        return {}
    out = {}
    with fh:
        for line in fh:
            if line.strip():
                entry = json.loads(line)
                if "sha256" in entry:
                    out[entry["sha256"]] = entry
    return out


def keep_rows(paths: Paths, topic: str, rows: Iterable[Row]) -> None:
    """Add the rows' content to the topic's rows file (content already there is not written twice)."""
    path = rows_file(paths, topic)
    with _locked_rows_dir(paths):
        store = _read_store(path)
        fresh = [r for r in rows if r.content_sha256 not in store]
        if not fresh and path.exists():
            return
        for r in fresh:
            store[r.content_sha256] = {"sha256": r.content_sha256, "cells": r.cells, "rating": r.rating,
                                       "rationale": r.rationale}

        def lines():
            yield json.dumps({"topic": normal_topic(topic)}, ensure_ascii=False) + "\n"
            for entry in store.values():
                yield json.dumps(entry, ensure_ascii=False) + "\n"
        fsutil.write_lines(path, lines())
        os.chmod(path, 0o600)


# --- a retrain --------------------------------------------------------------------------------------

def base_job(journal: Journal, topic: str) -> JobRecord | None:
    """The job whose rows a retrain of ``topic`` starts from: the topic's current model when it
    recorded rows, else the latest succeeded job that recorded rows for the topic."""
    sets = journal.training_sets(topic)
    recorded = {s["job_id"] for s in sets}
    current = journal.current_model(topic)
    if current is not None and current["job_id"] in recorded:
        return journal.get(current["job_id"])
    return journal.get(sets[-1]["job_id"]) if sets else None


def is_reviewed_file(path: Path) -> bool:
    """Whether ``path`` is a ``needs_review.csv`` sent back (its header has the review order's
    column): dropped without a job file, it is a retrain of its topic."""
    from ..data.csvfile import scan_csv

    try:
        return REVIEW_RANK_COLUMN in scan_csv(path).columns
    except (FineTunerError, OSError, ValueError):
        return False  # not a readable CSV: the build job reports why


def lone_topic(journal: Journal, topic: str) -> str:
    """The topic a reviewed file dropped on its own joins: ``topic`` (the config's defaults.topics)
    when set, else the one topic whose models recorded training rows; '' when that is not one."""
    if normal_topic(topic):
        return topic
    topics = {s["topic"] for s in journal.training_sets()}
    return topics.pop() if len(topics) == 1 else ""


def prepare_retrain(journal: Journal, paths: Paths, cfg: Config, *, job_id: str, topic: str, reviewed: Path,
                    mapping_path: Path | None, values: Mapping[str, Any]) -> Retrain:
    """Read the reviewed file and write the union of the topic's rows and its rows into the job's
    scratch folder; ``NothingNew`` when it changes nothing."""
    from ..data.dataset import load_dataset
    from ..outputs import names
    from ..outputs.folder import read_json

    topic = normal_topic(topic)
    if not topic:
        raise TopicRowsError("a retrain needs a topic: none was given, and a reviewed file dropped on its own "
                             "joins defaults.topics or the one topic whose models recorded training rows",
                             hint="name it with topic: in a job file beside it (or fine-tuner retrain --topic T)")
    base = base_job(journal, topic)
    if base is None:
        raise TopicRowsError(f"no model of the topic {printable(topic)!r} has recorded its training rows, so the "
                             "reviewed rows have nothing to be added to")
    meta, problem = read_json(paths.output_folder(base.output_path) or paths.outputs / base.id, names.METADATA)
    if problem:
        raise TopicRowsError(f"the topic's model (job {base.id}): {problem}",
                             hint="put the job's output folder back, or promote another job of the topic")
    settings = _settings(cfg, meta, values)
    labels = (meta.get("mapping") or {}).get("labels") or {}
    try:
        ds = load_dataset(reviewed, mapping_path, mapping=None if mapping_path else dict(labels),
                          template=settings.prompt_template, group_by=settings.group_by,
                          code_knowledge=settings.code_knowledge)
    except EmptyDatasetError as exc:
        raise DatasetError("no row of the reviewed file has an Expert Rating filled in", file=reviewed.name,
                           hint="fill in the Expert Rating of the records the experts reviewed and drop it "
                                "again") from exc
    reviewed_rows = rows_of(ds, reviewed)
    now = utc_now()
    for row in reviewed_rows:
        row.reviewed, row.added_by, row.added_at = True, job_id, now
    union = _base_union(paths, journal, base.id, topic)
    counts = {"base_job": base.id, "rows_before": len(union), "rows_added": 0, "duplicates": 0, "conflicts": 0,
              "unreviewed_skipped": int(ds.dropped.get("empty_rating", 0)), "reviewed_rows_read": len(reviewed_rows)}
    if not add_rows(union, reviewed_rows, counts=counts):
        raise NothingNew(base.id, counts)
    counts["rows"] = len(union)
    scratch = fsutil.make_private_dir(paths.state_dir / SCRATCH_DIR)
    folder = fsutil.make_private_dir(scratch / job_id)
    csv_path, out_mapping = folder / UNION_FILE, folder / MAPPING_FILE
    _write_union(csv_path, union.values())
    fsutil.write_json(out_mapping, dict(ds.mapping.labels))
    return Retrain(topic=topic, base_job=base.id, csv_path=csv_path, mapping_path=out_mapping, settings=settings,
                   counts=counts, origins={r.content_sha256: r for r in union.values()})


def _settings(cfg: Config, meta: Mapping, values: Mapping[str, Any]) -> JobSettings:
    """The base job's settings (its actual approach, base model, topics and recipe) with the
    retrain's job file on top."""
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    inherited = {k: params.get(k) for k in INHERITED}
    if isinstance(meta.get("approach"), str):
        inherited["approach"] = meta["approach"]
    if isinstance(meta.get("model"), str):
        inherited["model"] = meta["model"]
    source = meta.get("prompt_source") if isinstance(meta.get("prompt_source"), dict) else {}
    if meta.get("prompt_template") and source.get("builtin") is False:  # a template the job gave
        from ..data.template import Template

        inherited["prompt_template"] = Template.from_json(meta["prompt_template"])
    given = {k: v for k, v in values.items() if k not in ("task", "topic", "force")}
    return job_settings(cfg.defaults, {**inherited, **given, "task": "retrain"}, source="the retrain's job file")


def _base_union(paths: Paths, journal: Journal, job_id: str, topic: str) -> dict[str, Row]:
    """The base job's rows with their content from the topic's rows file."""
    store = _read_store(rows_file(paths, topic))
    recorded = journal.training_rows(job_id, topic)
    missing = sum(1 for r in recorded if r["content_sha256"] not in store)
    if missing:
        raise TopicRowsError(f"{missing} of the {len(recorded)} training rows of the topic's model (job {job_id}) "
                             f"are missing from the topic's rows file {rows_file(paths, topic).name}",
                             hint="restore the state folder's topic_rows/ from a backup, or build the topic's "
                                  "model again from its rated dataset")
    union: dict[str, Row] = {}
    for r in recorded:
        entry = store[r["content_sha256"]]
        union[r["row_key"]] = Row(r["row_key"], r["text_key"], r["content_sha256"], int(r["rating"]),
                                  dict(entry["cells"]), str(entry.get("rationale") or ""), bool(r["reviewed"]),
                                  r["added_by"], r["added_at"])
    return union


def _write_union(path: Path, rows: Iterable[Row]) -> None:
    """The union as one CSV: the rows' own columns (first seen first), then the rating and rationale."""
    from ..data.csvfile import RATING_COLUMN, csv_text

    rows = list(rows)
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r.cells))
    header = [*columns, RATING_COLUMN, "Rationale_of_Rating"]
    fsutil.write_text(path, csv_text([header, *([*(r.cells.get(c, "") for c in columns), r.rating, r.rationale]
                                                for r in rows)]))


def with_origins(rows: list[Row], retrain: Retrain | None) -> list[Row]:
    """A retrain's rows keep where each came from (matched by content); a plain build's rows are its own."""
    if retrain is None:
        return rows
    for row in rows:
        origin = retrain.origins.get(row.content_sha256)
        if origin is not None:
            row.reviewed, row.added_by, row.added_at = origin.reviewed, origin.added_by, origin.added_at
    return rows
