"""``fine-tuner status``: queued and running jobs with what they are doing now (stage, percent, ETA,
rate), recent successes (topic, base model, approach, rows, duration, Ollama name, kappa beside the
base model's, the verdict, warnings) and failures from the journal, each topic's current model,
orphans and datasets waiting in the inbox; one job in full (``status JOB_ID``: its record, progress,
the operator's actions, its log's events, warnings and files); and the text form, escaped so that no
file name can forge a line. It only reads: SQLite's write-ahead log lets it read while the daemon
writes. A job's output folder is read as ``outputs.folder.read_json`` and ``evaluation_file``
read it: never through a link, never from a FIFO or a device, never more than a bounded size, and
``evaluation.json`` checked for the type of every value read, so that a file that cannot be read is
named on its job's line and never breaks the other jobs'.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import JobControlError, JournalError
from ..fsutil import read_problem, read_regular
from ..outputs import names
from ..outputs.folder import evaluation_file, read_json, registered_name
from ..text import printable
from .drops import DATASET, classify_name, orphans
from .journal import Journal, JobRecord, normal_topic
from .paths import Paths, resolve_paths


NO_JOURNAL_HINT = ("point at the daemon's folders: --root DIR (the folder holding its inbox/), --config FILE "
                   "(its configuration), or paths.state_dir in the config / FINE_TUNER_PATHS__STATE_DIR (its "
                   "state directory, /var/lib/fine-tuner under systemd)")


def existing_journal(cfg: Config) -> Path:
    """The journal's path; one that does not exist is a ``JournalError`` saying where we looked and
    how to point elsewhere (it is never created by a command that only reads or asks)."""
    paths = resolve_paths(cfg)
    if not os.path.lexists(paths.journal):  # a dangling link is the journal's problem, reported by Journal
        raise JournalError(f"there is no job journal at {paths.journal}: no daemon has run with this state "
                           "directory", path=str(paths.journal), reason="no such file", hint=NO_JOURNAL_HINT)
    return paths.journal


def status(cfg: Config, *, topic: str | None = None, since: str | None = None, failed_only: bool = False,
           limit: int | None = None) -> dict:
    """Queued and running jobs with their progress, recent successes and failures with reasons,
    each topic's current model, and orphans, from the journal. ``topic`` keeps the finished jobs
    of that topic (case aside), ``since`` those updated since an ISO date or time, ``failed_only``
    the failures, ``limit`` caps each finished list (default ``watch.recent``)."""
    paths = resolve_paths(cfg)
    journal_path = existing_journal(cfg)
    report: dict[str, Any] = {"inbox": str(paths.inbox), "outputs": str(paths.outputs),
                              "journal": str(journal_path), "counts": {}, "queued": [],
                              "running": [], "recent_succeeded": [], "recent_failed": [],
                              "current_models": {}, "orphans": orphans(paths.inbox),
                              "waiting_datasets": _waiting(paths)}
    limit = limit if limit is not None else cfg.watch.recent
    with Journal(journal_path) as journal:
        report["counts"] = journal.counts()
        report["current_models"] = journal.current_models()
        for key, states in (("queued", ["queued"]), ("running", ["running"])):
            report[key] = [_brief(j, journal, paths) for j in journal.jobs(states)]
        finished = [("recent_failed", ["failed"])] if failed_only else [
            ("recent_succeeded", ["succeeded", "duplicate"]), ("recent_failed", ["failed"])]
        for key, states in finished:
            jobs = (_brief(j, journal, paths) for j in journal.jobs(states, since=since))
            if topic is not None:
                jobs = (j for j in jobs if _same_topic(topic, j.get("topics")))
            report[key] = list(itertools.islice(jobs, limit))
    return report


def _same_topic(wanted: str, topics: list[str] | None) -> bool:
    return normal_topic(wanted) in {normal_topic(t) for t in topics or []}


def job_detail(cfg: Config, job_id: str) -> dict:
    """One job in full: its journal record (inputs named and hashed), progress, the operator's
    actions, the events of its log, its warnings, evaluation and the files it left."""
    paths = resolve_paths(cfg)
    with Journal(existing_journal(cfg)) as journal:
        record = journal.get(job_id)
        if record is None:
            raise job_not_found(job_id)
        out = _brief(record, journal, paths)
        out["record"] = {k: v for k, v in record.as_dict().items() if k not in ("content_key", "error")}
        out["actions"] = journal.events(job_id)
    folder = _job_folder(record, paths)
    out["folder"] = str(folder) if folder else None
    out["files"] = _files(folder)
    out["events"], problem = _log_events(folder / "job.log") if folder else ([], None)
    if problem:
        out.setdefault("unreadable", []).append(problem)
    return out


def job_not_found(job_id: str) -> JobControlError:
    return JobControlError(f"there is no job {printable(job_id)} in the journal", job_id=job_id,
                           hint="run 'fine-tuner status' for the job ids")


def _job_folder(record: JobRecord, paths: Paths) -> Path | None:
    """Where the job's files are now: its outputs, its inputs in failed/ or processed/, or its
    build folder while it runs."""
    output = paths.output_folder(record.output_path)
    candidates = [output] if output else []
    candidates += [paths.failed / record.id, paths.processed / record.id, paths.outputs / f".tmp-{record.id}"]
    return next((c for c in candidates if c.is_dir() and not c.is_symlink()), None)


def _files(folder: Path | None) -> list[dict]:
    if folder is None:
        return []
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            out.append({"name": entry.name, "size_bytes": st.st_size, "folder": entry.is_dir(follow_symlinks=False)})
    return out


LOG_FIELDS_SHOWN = 8  # the first fields of an event after its name, in the text form


LOG_TAIL_BYTES = 16 * 1024 * 1024  # the end of a job's log that is read; its last events are there


def _log_events(path: Path, limit: int = 500) -> tuple[list[dict], str | None]:
    """The job's own log lines (JSON), the last ``limit`` of them, and why the log cannot be read
    (None when it can, or when there is none). Only its last ``LOG_TAIL_BYTES`` are read, never
    through a link nor from a FIFO or a device (``fsutil.read_regular``); lines that are not JSON
    objects are skipped (a line cut off when its process was killed)."""
    try:
        data = read_regular(path, limit=LOG_TAIL_BYTES, tail=True)
    except (FileNotFoundError, NotADirectoryError):
        return [], None
    except OSError as exc:
        return [], f"{path.name} cannot be read: {read_problem(exc)}"
    events = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, RecursionError):
            item = json.loads(line)
            if isinstance(item, dict) and "event" in item:
                events.append({k: v for k, v in item.items() if k not in ("job_id", "logger")})
    return events[-limit:], None


def _waiting(paths: Paths) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(paths.inbox) if classify_name(n)[0] == DATASET)
    return []


def _brief(job: JobRecord, journal: Journal, paths: Paths) -> dict:
    out: dict[str, Any] = {"job_id": job.id, "state": job.state, "attempts": job.attempts,
                           "updated_at": job.updated_at,
                           "inputs": [f.name for f in job.inputs]}
    if job.state in ("queued", "running"):
        progress = journal.progress(job.id)
        if progress:
            out["progress"] = progress
        if job.id in journal.requests():
            out["cancel_requested"] = True
    output = paths.output_folder(job.output_path)  # under this root, wherever the job ran
    if output is not None:
        out["output_path"] = str(output)
        if job.state == "succeeded":
            meta, problem = read_json(output, names.METADATA)
            if problem:
                out["unreadable"] = [problem]
            out.update(_finished_brief(job, meta))
            out["evaluation"] = _evaluation_brief(output, meta)
            warnings = meta.get("warnings")
            out["warnings"] = [str(w) for w in warnings] if isinstance(warnings, list) else []
    if job.approach:
        out["approach"] = job.approach
    if job.state == "queued" and job.approach == "fine_tune":
        out["waiting_for"] = "training"
    if job.duplicate_of:
        out["duplicate_of"] = job.duplicate_of
    if job.error:
        out["error"] = {k: job.error.get(k) for k in ("error_type", "message", "hint")}
    return out


def _finished_brief(job: JobRecord, meta: dict) -> dict:
    """What the analyst needs of a finished job: its topic, base model, rows, duration and the
    name to use in Ollama (from its metadata; a rating job: the model it rated with)."""
    out: dict[str, Any] = {}
    topics = meta.get("target_topics")
    if isinstance(topics, list):
        out["topics"] = [str(t) for t in topics]
    if isinstance(meta.get("model"), str):
        out["base_model"] = meta["model"]
    rows = meta.get("rows")
    if isinstance(rows, dict) and isinstance(rows.get("used"), int):
        out["rows"] = rows["used"]
    if isinstance(meta.get("duration_s"), (int, float)):
        out["duration_s"] = meta["duration_s"]
    elif job.started_at and job.finished_at:
        with contextlib.suppress(ValueError):
            out["duration_s"] = round((datetime.fromisoformat(job.finished_at)
                                       - datetime.fromisoformat(job.started_at)).total_seconds(), 1)
    reg = meta.get("registration")
    if (name := registered_name(meta)) is not None:
        out["ollama_name"] = name
    elif isinstance(reg, dict) and not reg.get("registered") and isinstance(reg.get("reason"), str):
        out["not_registered"] = reg["reason"]  # our own words: why the model is not in Ollama
    return out


def _evaluation_brief(folder: Path, meta: dict) -> dict:
    """Kappa and accuracy of each evaluated model (``evaluation.json``), or why there are none."""
    report, problem = evaluation_file(folder)
    if problem:
        return {"status": "unreadable", "reason": problem}
    if report.get("models"):
        brief: dict = {m.get("key"): {"kappa": m.get("kappa"), "accuracy": m.get("accuracy"),
                                      "invalid_rate": m.get("invalid_rate")} for m in report["models"]}
        figures = report.get("figures")
        if isinstance(figures, dict):
            for name in ("familiar", "new_kinds"):
                for m in (figures.get(name) or {}).get("models") or []:
                    if isinstance(brief.get(m.get("key")), dict):
                        brief[m["key"]][f"kappa_{name}"] = m.get("kappa")
        split = report.get("split")
        if isinstance(split, dict):
            brief["split"] = {k: split.get(k) for k in ("kind", "duplicate_rows", "duplicates_set_aside")}
        learned = [g.get("key") for g in report.get("generalisation") or []
                   if isinstance(g, dict) and g.get("learned_examples_more_than_rule")]
        if learned:
            brief["learned_examples_more_than_rule"] = learned
        effect = report.get("adapter_effect")
        if isinstance(effect, dict) and effect.get("ignored"):
            brief["adapter_ignored"] = True
        verdict = report.get("verdict")
        if isinstance(verdict, dict) and verdict.get("headline"):
            brief["recommended"] = verdict.get("recommended")
            brief["verdict"] = verdict["headline"]
        gate = report.get("quality_gate")
        if isinstance(gate, dict) and gate.get("status") in ("passed", "failed"):
            brief["quality_gate"] = {"status": gate["status"], "reason": gate.get("reason")}
        return brief
    evaluation = meta.get("evaluation") if isinstance(meta.get("evaluation"), dict) else {}
    return {"status": evaluation.get("status"), "reason": evaluation.get("reason")} if evaluation else {}


def _kappa_text(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    if "new" in evaluation:
        def k(key: str) -> str:
            value = (evaluation.get(key) or {}).get("kappa")
            return "n/a" if value is None else f"{value:.2f}"
        ignored = ("  ADAPTER HAD NO EFFECT (answers identical to the base model)"
                   if evaluation.get("adapter_ignored") else "")
        # evaluation.compare: none leaves the base model out of the evaluation
        base = f"base {k('base')}" if "base" in evaluation else "base not compared"
        new = evaluation.get("new") or {}
        if "kappa_new_kinds" in new:
            def v(value) -> str:
                return "n/a" if value is None else f"{value:.2f}"
            text = f"  kappa {v(new.get('kappa_familiar'))} familiar / {v(new.get('kappa_new_kinds'))} new kinds"
            if "new" in (evaluation.get("learned_examples_more_than_rule") or []):
                text += " (learned the examples more than the rule)"
            bow = (f", bag-of-words {v((evaluation.get('baseline') or {}).get('kappa_new_kinds'))} new kinds"
                   if "baseline" in evaluation else "")
            return text + f" ({base}{bow}){ignored}"
        split = evaluation.get("split") or {}
        kind = f", {split['kind']} split" if split.get("kind") else ""
        bow = f", bag-of-words {k('baseline')}" if "baseline" in evaluation else ""
        return f"  kappa {k('new')} ({base}{bow}{kind}){ignored}"
    if evaluation.get("status") in ("skipped", "failed"):
        reason = evaluation.get("reason")
        return f"  not evaluated: {reason}" if isinstance(reason, str) and reason else "  not evaluated"
    if evaluation.get("status") == "unreadable":
        return "  evaluation unreadable"
    return ""


def format_status(report: dict) -> str:
    """The status report as a few human-readable lines. Every name and message is escaped
    (``text.printable``): a file name with a newline, an escape sequence or a right-to-left override
    must not be able to forge a line of this report."""
    return "\n".join(printable(line, limit=10_000) for line in _status_lines(report))


def _status_lines(report: dict) -> list[str]:
    counts = report.get("counts") or {}
    lines = [f"inbox: {report['inbox']}",
             "jobs: " + (", ".join(f"{k} {v}" for k, v in counts.items()) if any(counts.values()) else "none yet")]
    for title, key in (("queued", "queued"), ("running", "running"),
                       ("recent successes", "recent_succeeded"), ("recent failures", "recent_failed")):
        jobs = report.get(key) or []
        if not jobs:
            continue
        lines.append(f"{title}:")
        for job in jobs:
            line = f"  {job['job_id']}"
            if job.get("duplicate_of"):
                line += f"  duplicate of {job['duplicate_of']}"
            elif job.get("waiting_for"):
                line += f"  waiting for {job['waiting_for']}"
            elif job.get("output_path"):
                line += f"  {job.get('approach')} -> {job['output_path']}{_kappa_text(job.get('evaluation'))}"
            elif job.get("approach"):
                line += f"  {job['approach']}"
            if job.get("error"):
                err = job["error"]
                line += f"  {err.get('error_type')}: {err.get('message')}"
                if err.get("hint"):
                    line += f" ({err['hint']})"
            lines.append(line)
            if job.get("progress"):
                lines.append(f"    {progress_text(job['progress'])}")
            if job.get("cancel_requested"):
                lines.append("    cancel requested")
            if (finished := _finished_text(job)):
                lines.append(f"    {finished}")
            lines.extend(f"    {problem}" for problem in job.get("unreadable") or [])
            evaluation = job.get("evaluation") or {}
            if evaluation.get("status") == "unreadable":
                lines.append(f"    {evaluation.get('reason')}")
            if (evaluation.get("quality_gate") or {}).get("status") == "failed":
                lines.append(f"    quality gate failed: {evaluation['quality_gate'].get('reason')}")
            if evaluation.get("verdict"):
                lines.append(f"    {evaluation['verdict']}")
            lines.extend(f"    warning: {w}" for w in job.get("warnings") or [])
    if report.get("current_models"):
        lines.append("current models:")
        lines.extend(f"  {topic}: {_current_text(c)}" for topic, c in report["current_models"].items())
    if report.get("waiting_datasets"):
        lines.append("datasets in the inbox: " + ", ".join(report["waiting_datasets"]))
    if report.get("orphans"):
        lines.append("waiting for their dataset:")
        lines.extend(f"  {o['name']} ({o['kind']}, {o['waiting_s']} s)" for o in report["orphans"])
    return lines


def progress_text(p: dict) -> str:
    """``training 42 % (step 21 of 50), 310 tokens/s, about 3 min left``."""
    text = str(p.get("stage"))
    if isinstance(p.get("percent"), (int, float)):
        text += f" {p['percent']:.0f} %"
    if p.get("done") is not None and p.get("total"):
        unit = "step" if p.get("rate_unit") == "tokens" else "record"
        text += f" ({unit} {p['done']} of {p['total']})"
    if isinstance(p.get("rate"), (int, float)):
        text += f", {p['rate']:.1f} {p.get('rate_unit') or 'items'}/s"
    if isinstance(p.get("eta_s"), (int, float)):
        text += f", about {duration_text(p['eta_s'])} left"
    return text


def duration_text(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _finished_text(job: dict) -> str:
    parts = []
    if job.get("topics"):
        parts.append("topic " + ", ".join(job["topics"]))
    if job.get("base_model"):
        parts.append(f"base {job['base_model']}")
    if isinstance(job.get("rows"), int):
        parts.append(f"{job['rows']} rows")
    if isinstance(job.get("duration_s"), (int, float)):
        parts.append(f"took {duration_text(job['duration_s'])}")
    if job.get("ollama_name"):
        parts.append(f"in Ollama as {job['ollama_name']}")
    elif job.get("not_registered"):
        parts.append(f"not in Ollama: {job['not_registered']}")
    return "; ".join(parts)


def _current_text(current: dict) -> str:
    text = f"job {current.get('job_id')}"
    if current.get("model"):
        text += f", {current['model']}"
    if current.get("alias"):
        text += f" (alias {current['alias']})"
    return text + (" [promoted with --force]" if current.get("forced") else "")


def format_job(detail: dict) -> str:
    """``status JOB_ID`` as text: the summary lines, then the files, the operator's actions and the
    log's events (escaped like the rest of status)."""
    lines = _status_lines({"inbox": "", "counts": {}, detail["state"] if detail["state"] in ("queued", "running")
                           else ("recent_failed" if detail["state"] == "failed" else "recent_succeeded"): [detail]})[2:]
    record = detail.get("record") or {}
    lines.append(f"  state {detail['state']}, attempts {detail['attempts']}, created {record.get('created_at')}, "
                 f"started {record.get('started_at') or '-'}, finished {record.get('finished_at') or '-'}")
    lines.append("  inputs: " + ", ".join(f"{f['name']} ({f['role']}, sha256 {f['sha256'][:12]})"
                                          for f in record.get("inputs") or []))
    if detail.get("folder"):
        lines.append(f"files in {detail['folder']}:")
        lines.extend(f"  {f['name']}{'/' if f['folder'] else ''}  {f['size_bytes']} bytes" for f in detail["files"])
    if detail.get("actions"):
        lines.append("actions:")
        lines.extend(f"  {a['at']}  {a['event']}"
                     + "".join(f" {k}={v}" for k, v in a.items() if k not in ("at", "event"))
                     for a in detail["actions"])
    if detail.get("events"):
        lines.append("events:")
        for e in detail["events"]:
            fields = [(k, v) for k, v in e.items() if k not in ("timestamp", "event", "level")][:LOG_FIELDS_SHOWN]
            lines.append(f"  {e.get('timestamp', '')}  {e.get('level', '')}  {e['event']}"
                         + "".join(f" {k}={json.dumps(v, default=str)}" for k, v in fields))
    return "\n".join(printable(line, limit=10_000) for line in lines)
