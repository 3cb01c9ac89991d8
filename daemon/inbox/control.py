"""Job control from the command line, safe while the daemon runs: ``cancel``, ``retry``, ``promote``,
``retrain`` and the current model of a topic.

Nothing here touches a job the daemon holds: ``cancel`` records a request in the journal, which the
daemon acts on within a second (``service``) and ``wait_for_cancel`` watches; ``retry`` copies a failed
job's inputs back into the inbox (companions first, the dataset last and renamed into place, so the
daemon never sees half a drop), with a job file carrying the overrides; ``promote`` records the
topic's current model in the journal and gives it an Ollama alias (``<topic-slug>:current``,
through ``/api/copy``) when Ollama is reachable; it refuses a model that the quality gate withdrew
and a job whose output folder is gone. ``retrain`` drops a reviewed file into the inbox with a
``task: retrain`` job file (and the mapping, when given) for the daemon to add to the topic's
training rows. Every action is recorded as the job's event in the journal and logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, model_name_problem
from ..data.jobsettings import read_job_file
from ..errors import JobControlError
from ..fsutil import write_text
from ..logconfig import get_logger
from ..text import printable
from .drops import DATASET, JOB, MAPPING, classify_name
from .journal import Journal, normal_topic, utc_now
from .paths import resolve_paths
from ..outputs import names
from ..outputs.folder import evaluation_file, read_json, registered_name
from .status import existing_journal, job_not_found

log = get_logger("control")

CANCEL_POLL_S = 0.2
RETRY_KEYS = ("epochs", "learning_rate", "batch_size", "approach", "model", "force")


# --- cancel --------------------------------------------------------------------------------------

def request_cancel(cfg: Config, job_id: str) -> str:
    """Ask the daemon to cancel a queued or running job; returns its state when asked."""
    with Journal(existing_journal(cfg)) as journal:
        record = journal.get(job_id)
        if record is None:
            raise job_not_found(job_id)
        if not journal.request(job_id, "cancel"):
            raise JobControlError(f"job {printable(job_id)} is {record.state}: only a queued or running job "
                                  "can be cancelled", job_id=job_id,
                                  hint="'fine-tuner retry JOB_ID' runs a failed job again")
    log.info("job_cancel_requested", job_id=job_id, state=record.state)
    return record.state


def wait_for_cancel(cfg: Config, job_id: str, timeout_s: float) -> str | None:
    """The job's state once the daemon acted on the request (``failed`` when it was cancelled; a
    job that finished first keeps its state), None when nothing happened within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with Journal(existing_journal(cfg)) as journal:
        while True:
            record = journal.get(job_id)
            if record is not None and record.state not in ("queued", "running"):
                return record.state
            if time.monotonic() >= deadline:
                return None
            time.sleep(CANCEL_POLL_S)


# --- retry ---------------------------------------------------------------------------------------

def retry(cfg: Config, job_id: str, overrides: dict[str, Any]) -> list[str]:
    """Drop a failed job's inputs into the inbox again, with ``overrides`` (``RETRY_KEYS``) written
    into its job file; returns the names dropped. The failed job's folder is left as it is."""
    paths = resolve_paths(cfg)
    with Journal(existing_journal(cfg)) as journal:
        record = journal.get(job_id)
        if record is None:
            raise job_not_found(job_id)
        if record.state != "failed":
            raise JobControlError(f"job {printable(job_id)} is {record.state}: only a failed job can be retried",
                                  job_id=job_id, hint="drop its files again (with force: true in a job file "
                                                      "to redo a success)")
        folder = paths.failed / job_id
        inputs = _inputs_in(folder)
        if DATASET not in inputs:
            raise JobControlError(f"job {printable(job_id)} has no dataset in {folder}", job_id=job_id,
                                  hint="it was refused at the door; drop a corrected file instead")
        dropped = _drop(paths.inbox, inputs, _job_text(inputs.get(JOB), overrides, job_id))
        journal.add_event(job_id, "retried", dropped=dropped, overrides=overrides)
    log.info("job_retried", job_id=job_id, dropped=dropped, overrides=sorted(overrides))
    return dropped


def _inputs_in(folder: Path) -> dict[str, Path]:
    """The dataset, mapping and job file in a failed job's folder, by kind (not its notes)."""
    if not folder.is_dir() or folder.is_symlink():
        raise JobControlError(f"the failed job's folder {folder} is missing", job_id=folder.name,
                              hint="its inputs were moved away; drop them again")
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        kind, _ = classify_name(entry.name)
        if kind in (DATASET, MAPPING, JOB) and entry.is_file(follow_symlinks=False):
            found[kind] = Path(entry.path)
    return found


def _job_text(job_file: Path | None, overrides: dict[str, Any], job_id: str) -> str | None:
    """The job file to drop: the old one's values with the overrides on top (None: no job file)."""
    if job_file is None and not overrides:
        return None
    values: dict[str, Any] = {}
    if job_file is not None:
        try:
            values = dict(read_job_file(job_file))
        except ConfigError as exc:
            if not overrides:
                return job_file.read_text(encoding="utf-8")  # dropped as it was: the daemon says what is wrong
            raise JobControlError(f"job {printable(job_id)}'s job file cannot be read, so the overrides cannot "
                                  f"be added to it: {'; '.join(exc.problems)}", job_id=job_id,
                                  hint="fix the job file in its failed/ folder, then retry") from None
    values.update(overrides)
    return f"# retry of {job_id}\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _drop(inbox: Path, inputs: dict[str, Path], job_text: str | None) -> list[str]:
    """Companions first, the dataset last, each written as ``NAME.part`` and renamed; a name the
    inbox already holds is refused before anything is written."""
    dataset = inputs[DATASET]
    stem = classify_name(dataset.name)[1]
    plan: list[tuple[str, Path | str]] = []
    if job_text is not None:
        plan.append((f"{stem}.job.yaml", job_text))
    if MAPPING in inputs:
        plan.append((inputs[MAPPING].name, inputs[MAPPING]))
    plan.append((dataset.name, dataset))
    return _place(inbox, plan)


def _place(inbox: Path, plan: list[tuple[str, Path | str]]) -> list[str]:
    """Write ``plan``'s files into the inbox in its order (``_drop``)."""
    taken = [name for name, _ in plan if os.path.lexists(inbox / name)]
    if taken:
        raise JobControlError(f"the inbox already holds {', '.join(map(printable, taken))}", job_id=None,
                              hint="wait until it has been processed, then retry")
    for name, source in plan:
        part = inbox / f".{name}.part"
        if isinstance(source, str):
            write_text(part, source)
        else:
            shutil.copyfile(source, part)
        os.rename(part, inbox / name)
    return [name for name, _ in plan]


# --- promote and the current model ------------------------------------------------------------

def promote(cfg: Config, job_id: str, *, topic: str | None = None, force: bool = False) -> dict:
    """Make a succeeded job's model the current one for its topic (``topic`` overrides the job's
    own): recorded in the journal, and as ``<topic-slug>:current`` in Ollama when the model is
    registered there and Ollama answers. A model whose verdict is "not recommended" needs ``force``;
    a model below the quality gate's floor and a job whose output folder is gone are refused."""
    paths = resolve_paths(cfg)
    with Journal(existing_journal(cfg)) as journal:
        record = journal.get(job_id)
        if record is None:
            raise job_not_found(job_id)
        if record.state != "succeeded" or not record.output_path or record.approach == "rate":
            raise JobControlError(f"job {printable(job_id)} is {record.state}"
                                  f"{' (a rating job)' if record.approach == 'rate' else ''}: only a job that "
                                  "built a model can be promoted", job_id=job_id,
                                  hint="run 'fine-tuner status' for the jobs that built models")
        folder = _existing_output(paths.output_folder(record.output_path), job_id)
        meta, problem = read_json(folder, names.METADATA)
        report, eval_problem = evaluation_file(folder)
        if problem or (eval_problem and not force):  # a FIFO or a link there never blocks nor is followed
            raise JobControlError(f"job {printable(job_id)}'s {problem or eval_problem}", job_id=job_id,
                                  hint="put the job's own file back" if problem else
                                  "put the job's own file back, or promote it anyway with --force")
        gate = meta.get("quality_gate") if isinstance(meta.get("quality_gate"), dict) else {}
        if gate.get("status") == "failed":
            removed = " and was removed from Ollama" if gate.get("withdrawn") else ""
            raise JobControlError(f"job {printable(job_id)}'s model did not pass the quality gate{removed}: "
                                  f"{printable(str(gate.get('reason')), limit=300)}", job_id=job_id,
                                  hint="promote a job whose model passed it")
        topics = meta.get("target_topics") if isinstance(meta.get("target_topics"), list) else []
        topic = normal_topic(topic or ", ".join(str(t) for t in topics))
        if not topic:
            raise JobControlError(f"job {printable(job_id)} has no topic", job_id=job_id,
                                  hint="name it with --topic")
        verdict = report.get("verdict") or {}
        if verdict.get("recommended") is False and not force:
            raise JobControlError(f"job {printable(job_id)}'s model is not recommended: "
                                  f"{printable(str(verdict.get('headline')), limit=300)}", job_id=job_id,
                                  hint="promote it anyway with --force, or promote a better job")
        model = registered_name(meta)
        alias, note = _alias(cfg, model, topic)
        journal.promote(topic, job_id, model=model, alias=alias, forced=force)
    log.info("model_promoted", job_id=job_id, model=model, alias=alias, forced=force)
    return {"topic": topic, "job_id": job_id, "model": model, "alias": alias, "alias_note": note,
            "recommended": verdict.get("recommended")}


def topic_slug(topic: str) -> str:
    """``Respiratory infections`` → ``respiratory-infections`` (an Ollama model name's part)."""
    slug = re.sub(r"[^a-z0-9]+", "-", topic.casefold()).strip("-")[:60].strip("-")
    return slug or "topic"


def _alias(cfg: Config, model: str | None, topic: str) -> tuple[str | None, str | None]:
    """Copy ``model`` to ``<slug>:current`` in Ollama; (alias, None) or (None, why not)."""
    if model is None:
        return None, "the model is not registered in Ollama"
    from ..serving.ollama import OllamaClient, OllamaError

    alias = f"{topic_slug(topic)}:current"
    if model_name_problem(alias) is not None:
        return None, "the topic makes no valid Ollama name"
    try:
        with OllamaClient(cfg.ollama) as client:
            client.copy(model, alias)
    except OllamaError as exc:
        log.warning("model_alias_not_made", model=model, alias=alias, reason=exc.message)
        return None, f"Ollama: {exc.message}"
    return alias, None


def current_model_folder(cfg: Config, topic: str, *, journal: Journal | None = None) -> Path:
    """The output folder of ``topic``'s current model (``rate --topic``, ``task: rate`` with ``topic``).
    The daemon passes its own ``journal``: a process must not open a second one on the same file."""
    with contextlib.ExitStack() as stack:
        if journal is None:
            journal = stack.enter_context(Journal(existing_journal(cfg)))
        current = journal.current_model(topic)
        record = journal.get(current["job_id"]) if current else None
    if current is None or record is None or not record.output_path:
        raise JobControlError(f"there is no current model for the topic {printable(topic)!r} (topics are "
                              "compared without case)", hint="promote a job's model with 'fine-tuner promote "
                                                             "JOB_ID'; 'fine-tuner status' lists the current models")
    return _existing_output(resolve_paths(cfg).output_folder(record.output_path), record.id)


def _existing_output(folder: Path | None, job_id: str) -> Path:
    """``folder`` when it is a real folder (a link in its place is refused, never followed)."""
    if folder is None or not folder.is_dir() or folder.is_symlink():
        raise JobControlError(f"job {printable(job_id)}'s output folder {printable(str(folder), limit=4096)} is gone",
                              job_id=job_id, hint="put the folder back, or promote another job")
    return folder


# --- retrain ---------------------------------------------------------------------------------------

def retrain(cfg: Config, topic: str, reviewed: Path, *, mapping: Path | None = None) -> dict:
    """Drop ``reviewed`` into the inbox as a retrain of ``topic`` (``task: retrain``, the topic, and
    the mapping when given), after checking that a model of the topic recorded its training rows.
    Returns the names dropped, the dataset's sha256 and when it was dropped."""
    from ..fsutil import sha256_file
    from .topicrows import base_job

    paths = resolve_paths(cfg)
    wanted = normal_topic(topic)
    with Journal(existing_journal(cfg)) as journal:
        base = base_job(journal, wanted)
    if base is None:
        raise JobControlError(f"no model of the topic {printable(wanted)!r} has recorded its training rows",
                              job_id=None, hint="build the topic's model first (its rated dataset with topics: "
                                                "in a job file); 'fine-tuner status' lists the jobs")
    stem = classify_name(reviewed.name)[1] if classify_name(reviewed.name)[0] == DATASET else reviewed.stem
    plan: list[tuple[str, Path | str]] = [
        (f"{stem}.job.yaml", "# fine-tuner retrain\n" + yaml.safe_dump({"task": "retrain", "topic": wanted},
                                                                       sort_keys=False, allow_unicode=True))]
    if mapping is not None:
        suffix = ".mapping.yaml" if mapping.name.lower().endswith((".yaml", ".yml")) else ".mapping.json"
        plan.append((f"{stem}{suffix}", mapping))
    plan.append((f"{stem}.csv", reviewed))
    since = utc_now()
    sha = sha256_file(reviewed)
    dropped = _place(paths.inbox, plan)
    log.info("retrain_dropped", topic=wanted, base_job=base.id, dropped=dropped)
    return {"topic": wanted, "base_job": base.id, "dropped": dropped, "sha256": sha, "since": since}


def wait_for_retrain(cfg: Config, sha256: str, since: str, timeout_s: float) -> dict | None:
    """The job that took up a dropped reviewed file (by its dataset's sha256, created at or after
    ``since``) once it ended: its record and its training set; None when none ended in time."""
    deadline = time.monotonic() + timeout_s
    with Journal(existing_journal(cfg)) as journal:
        while True:
            for record in journal.jobs(["succeeded", "failed", "duplicate"], since=since):
                if record.created_at >= since and any(f.role == DATASET and f.sha256 == sha256
                                                      for f in record.inputs):
                    sets = [s for s in journal.training_sets() if s["job_id"] == record.id]
                    return {"record": record, "training": sets[0] if sets else None}
            if time.monotonic() >= deadline:
                return None
            time.sleep(CANCEL_POLL_S)
