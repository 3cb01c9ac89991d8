"""``fine-tuner status``: queued, running, recent successes (with their evaluation and warnings) and
failures from the journal, orphans and datasets waiting in the inbox; and its text form, escaped so
that no file name can forge a line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..config import Config, printable
from ..errors import JournalError
from ..fsutil import read_json_object
from .drops import DATASET, classify_name, orphans
from .journal import Journal, JobRecord
from .paths import Paths, resolve_paths


NO_JOURNAL_HINT = ("point at the daemon's folders: --root DIR (the folder holding its inbox/), --config FILE "
                   "(its configuration), or paths.state_dir in the config / FINE_TUNER_PATHS__STATE_DIR (its "
                   "state directory, /var/lib/fine-tuner under systemd)")


def status(cfg: Config) -> dict:
    """Queued, running, recent successes and failures with reasons, and orphans, from the journal.
    A journal that does not exist is a ``JournalError`` saying where status looked and how to point
    it elsewhere (it is never created here: status only reads)."""
    paths = resolve_paths(cfg)
    if not os.path.lexists(paths.journal):  # a dangling link is the journal's problem, reported by Journal
        raise JournalError(f"there is no job journal at {paths.journal}: no daemon has run with this state "
                           "directory", path=str(paths.journal), reason="no such file", hint=NO_JOURNAL_HINT)
    report: dict[str, Any] = {"inbox": str(paths.inbox), "outputs": str(paths.outputs),
                              "journal": str(paths.journal), "counts": {}, "queued": [],
                              "running": [], "recent_succeeded": [], "recent_failed": [],
                              "orphans": orphans(paths.inbox), "waiting_datasets": _waiting(paths)}
    recent = cfg.watch.recent
    with Journal(paths.journal) as journal:
        report["counts"] = journal.counts()
        report["queued"] = [_brief(j) for j in journal.jobs(["queued"])]
        report["running"] = [_brief(j) for j in journal.jobs(["running"])]
        report["recent_succeeded"] = [_brief(j) for j in journal.jobs(["succeeded", "duplicate"], limit=recent)]
        report["recent_failed"] = [_brief(j) for j in journal.jobs(["failed"], limit=recent)]
    return report


def _waiting(paths: Paths) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(paths.inbox) if classify_name(n)[0] == DATASET)
    return []


def _brief(job: JobRecord) -> dict:
    out: dict[str, Any] = {"job_id": job.id, "state": job.state, "attempts": job.attempts,
                           "updated_at": job.updated_at,
                           "inputs": [f.name for f in job.inputs]}
    if job.output_path:
        out["output_path"] = job.output_path
        if job.state == "succeeded":
            meta = read_json_object(Path(job.output_path) / "fine_tuning_metadata.json")
            out["evaluation"] = _evaluation_brief(Path(job.output_path), meta)
            out["warnings"] = list(meta.get("warnings") or [])
    if job.approach:
        out["approach"] = job.approach
    if job.state == "queued" and job.approach == "fine_tune":
        out["waiting_for"] = "training"
    if job.duplicate_of:
        out["duplicate_of"] = job.duplicate_of
    if job.error:
        out["error"] = {k: job.error.get(k) for k in ("error_type", "message", "hint")}
    return out


def _evaluation_brief(folder: Path, meta: dict) -> dict:
    """Kappa and accuracy of each evaluated model (``evaluation.json``), or why there are none."""
    report = read_json_object(folder / "evaluation.json")
    if report.get("models"):
        brief: dict = {m["key"]: {"kappa": m.get("kappa"), "accuracy": m.get("accuracy"),
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
    evaluation = meta.get("evaluation") or {}
    return {"status": evaluation.get("status"), "reason": evaluation.get("reason")} if evaluation else {}


def _kappa_text(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    if "new" in evaluation:
        def k(key: str) -> str:
            value = (evaluation.get(key) or {}).get("kappa")
            return "n/a" if value is None else f"{value:.2f}"
        ignored = "  ADAPTER HAD NO EFFECT (answers identical to the base model)" if evaluation.get("adapter_ignored") else ""
        new = evaluation.get("new") or {}
        if "kappa_new_kinds" in new:
            def v(value) -> str:
                return "n/a" if value is None else f"{value:.2f}"
            text = f"  kappa {v(new.get('kappa_familiar'))} familiar / {v(new.get('kappa_new_kinds'))} new kinds"
            if "new" in (evaluation.get("learned_examples_more_than_rule") or []):
                text += " (learned the examples more than the rule)"
            return text + f" (base {k('base')}){ignored}"
        split = evaluation.get("split") or {}
        kind = f", {split['kind']} split" if split.get("kind") else ""
        return f"  kappa {k('new')} (base {k('base')}{kind}){ignored}"
    if evaluation.get("status") in ("skipped", "failed"):
        return "  not evaluated"
    return ""


def format_status(report: dict) -> str:
    """The status report as a few human-readable lines. Every name and message is escaped
    (``config.printable``): a file name with a newline, an escape sequence or a right-to-left override
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
            evaluation = job.get("evaluation") or {}
            if (evaluation.get("quality_gate") or {}).get("status") == "failed":
                lines.append(f"    quality gate failed: {evaluation['quality_gate'].get('reason')}")
            if evaluation.get("verdict"):
                lines.append(f"    {evaluation['verdict']}")
            lines.extend(f"    warning: {w}" for w in job.get("warnings") or [])
    if report.get("waiting_datasets"):
        lines.append("datasets in the inbox: " + ", ".join(report["waiting_datasets"]))
    if report.get("orphans"):
        lines.append("waiting for their dataset:")
        lines.extend(f"  {o['name']} ({o['kind']}, {o['waiting_s']} s)" for o in report["orphans"])
    return lines
