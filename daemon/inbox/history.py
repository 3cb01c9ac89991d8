"""``fine-tuner report``: every finished job's evaluation side by side over time, so that analysts
see whether the models improve as the experts rate more records. It reads the journal's succeeded
jobs (never a rating job, never a duplicate) and, in each job's output folder,
``fine_tuning_metadata.json`` (topic, base model, rows) and ``evaluation.json`` (each model's kappa
with its interval, kappa on new kinds of records, macro-F1, invalid rate, the verdict): one row per
job and evaluated model, oldest first, or one row with the reason for a job that was not evaluated.
The rows become a text table (every value escaped with ``text.printable``), CSV (a text cell that
a spreadsheet would run as a formula is quoted), JSON, or one self-contained HTML page (every value
HTML-escaped, no script allowed, each job's confusion matrix inline, the new model's kappa over time
per topic as an SVG chart). ``curve_rows`` is the learning curve (``report --curve``): per topic,
each model's agreement on familiar records and on new kinds of records, and the baseline's, over
the number of expert-rated rows it was trained on (the journal's ``training_sets``), oldest first.
It only reads: nothing is created where the journal or a folder is missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import Config
from ..data import csvfile
from ..fsutil import open_regular
from ..text import printable
from .journal import Journal, JobRecord, normal_topic
from .paths import Paths, resolve_paths
from ..outputs import names
from ..outputs.folder import evaluation_file, read_json
from .status import existing_journal

FORMATS = ("text", "csv", "json", "html")
COLUMNS = ("job_id", "finished_at", "topic", "approach", "base_model", "rows", "train_rows", "held_out",
           "model", "model_name", "kappa", "kappa_ci_low", "kappa_ci_high", "kappa_new_kinds", "accuracy",
           "macro_f1", "invalid_rate", "recommended", "verdict", "note", "output_path")
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # a confusion matrix is ~60 KB; a larger file is not one of ours
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the page runs nothing and loads nothing but its own inline images: a value that escaped escaping
# still could not act
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# --- the rows --------------------------------------------------------------------------------------

def report_rows(cfg: Config, *, topic: str | None = None, since: str | None = None) -> list[dict]:
    """One row per finished job and evaluated model (one row with the reason for a job not
    evaluated), by finish time; ``topic`` keeps the jobs of that topic (case and spacing aside),
    ``since`` (an ISO date or time, UTC when it names no zone) those finished at or after it. A
    missing journal is a ``JournalError``."""
    paths = resolve_paths(cfg)
    with Journal(existing_journal(cfg)) as journal:
        jobs = finished_jobs(journal)
    bound = _aware(since) if since is not None else None
    rows: list[dict] = []
    for job in jobs:
        if bound is not None and _finished(job) < bound:
            continue
        job_rows = rows_of_job(job, paths)
        if topic is not None and not _same_topic(topic, job_rows[0]["topic_list"]):
            continue
        rows.extend(job_rows)
    for row in rows:
        del row["topic_list"]
    return rows


def finished_jobs(journal: Journal) -> list[JobRecord]:
    """The succeeded jobs that built a model (not rating jobs), oldest finish first."""
    jobs = [j for j in journal.jobs(["succeeded"]) if j.approach != "rate" and j.output_path]
    return sorted(jobs, key=lambda j: (_finished(j), j.id))


def _finished(job: JobRecord) -> datetime:
    return _aware(job.finished_at or job.updated_at)


def _aware(text: str) -> datetime:
    """An ISO date or time as a UTC-aware time (the journal writes UTC)."""
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _same_topic(wanted: str, topics: Sequence[str]) -> bool:
    return normal_topic(wanted) in {normal_topic(t) for t in topics}


def rows_of_job(job: JobRecord, paths: Paths) -> list[dict]:
    """The job's rows: one per model in its ``evaluation.json``, else one saying why there is none.
    Its folder is the one under ``paths``' root (a moved or copied root reads its own)."""
    folder = paths.output_folder(job.output_path) or paths.outputs / job.id
    meta, problem = read_json(folder, names.METADATA)
    report, eval_problem = evaluation_file(folder) if meta else ({}, None)
    problem = problem or eval_problem
    common = _job_fields(job, meta, report, folder)
    models = [m for m in report.get("models") or [] if isinstance(m, dict)]
    if not models:
        return [_row(common, {"note": f"{problem} (in {folder})" if problem else _not_evaluated(meta, folder)})]
    new_kinds = _new_kinds_kappas(report)
    verdict = report.get("verdict") if isinstance(report.get("verdict"), dict) else {}
    judged = {"recommended": _flag(verdict.get("recommended")), "verdict": _text(verdict.get("headline"))}
    # the verdict is about the job's new model: it goes on that row only
    return [_row(common, {**_model_fields(m, new_kinds), **(judged if m.get("key") == "new" else {})})
            for m in models]


def _row(common: dict, fields: dict) -> dict:
    """A row with every column in ``COLUMNS`` order (None where there is no value), and the job's
    topics as a list for the topic filter."""
    merged = {**common, **fields}
    return {**{c: merged.get(c) for c in COLUMNS}, "topic_list": common["topic_list"]}


def _job_fields(job: JobRecord, meta: dict, report: dict, folder: Path) -> dict:
    """The job's own columns (the same on each of its rows)."""
    listed = meta.get("target_topics")
    topics = [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else []
    rows = meta.get("rows") if isinstance(meta.get("rows"), dict) else {}
    split = meta.get("split") if isinstance(meta.get("split"), dict) else {}
    return {"job_id": job.id, "finished_at": job.finished_at or job.updated_at, "topic": ", ".join(topics),
            "approach": _text(meta.get("approach")) or job.approach, "base_model": _text(meta.get("model")),
            "rows": _count(rows.get("used")), "train_rows": _count(split.get("train_rows")),
            "held_out": _count(report.get("n")), "topic_list": topics, "output_path": str(folder)}


def _model_fields(model: dict, new_kinds: dict) -> dict:
    ci = model.get("kappa_ci95")
    low, high = (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    return {"model": _text(model.get("key")), "model_name": _text(model.get("model")),
            "kappa": _number(model.get("kappa")), "kappa_ci_low": _number(low), "kappa_ci_high": _number(high),
            "kappa_new_kinds": new_kinds.get(_text(model.get("key"))), "accuracy": _number(model.get("accuracy")),
            "macro_f1": _number(model.get("macro_f1")), "invalid_rate": _number(model.get("invalid_rate"))}


def _new_kinds_kappas(report: dict) -> dict:
    """Model key → kappa on the new kinds of records (a grouped split only)."""
    figures = report.get("figures") if isinstance(report.get("figures"), dict) else {}
    part = figures.get("new_kinds") if isinstance(figures.get("new_kinds"), dict) else {}
    return {_text(m.get("key")): _number(m.get("kappa")) for m in part.get("models") or [] if isinstance(m, dict)}


def _not_evaluated(meta: dict, folder: Path) -> str:
    """Why a job has no figures, in the words an analyst can act on."""
    if not meta:
        return f"its output folder has no readable fine_tuning_metadata.json (moved or removed?): {folder}"
    evaluation = meta.get("evaluation") if isinstance(meta.get("evaluation"), dict) else {}
    status = _text(evaluation.get("status"))
    if status == "off":
        return "not evaluated: evaluation.enabled was off"
    if status in ("skipped", "failed"):
        return f"not evaluated ({status}): {_text(evaluation.get('reason')) or 'no reason recorded'}"
    if status == "done":
        return "evaluated, but its evaluation.json is missing or unreadable"
    return "not evaluated"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


# --- text, CSV, JSON -------------------------------------------------------------------------------

TEXT_COLUMNS = (("finished", "finished_at"), ("job", "job_id"), ("topic", "topic"), ("approach", "approach"),
                ("base model", "base_model"), ("rows", "rows"), ("model", "model"), ("kappa", "kappa"),
                ("95% CI", "kappa_ci"), ("new kinds", "kappa_new_kinds"), ("macro-F1", "macro_f1"),
                ("invalid", "invalid_rate"))
RIGHT = {"rows", "kappa", "kappa_ci", "kappa_new_kinds", "macro_f1", "invalid_rate"}
JOB_ONLY = {"finished_at", "job_id", "topic", "approach", "base_model", "rows"}  # shown on a job's first row


def render(rows: list[dict], fmt: str, *, title: str = "Model quality over time") -> str:
    """The rows in ``fmt`` (one of ``FORMATS``)."""
    if fmt == "csv":
        return csv_text(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "html":
        return html_page(rows, title=title)
    return format_text(rows)


def format_text(rows: list[dict]) -> str:
    """A table for the terminal: a job's own cells on its first row, its verdict or the reason it
    was not evaluated on the line below. Every value is escaped (``text.printable``)."""
    if not rows:
        return "no finished jobs to report\n"
    cells = [[printable(_text_cell(row, key, first), limit=200) for _, key in TEXT_COLUMNS]
             for row, first in _with_first(rows)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(TEXT_COLUMNS)]
    lines = [_text_line([h for h, _ in TEXT_COLUMNS], widths)]
    verdicts = job_verdicts(rows)
    for (row, _), line, last in zip(_with_first(rows), cells, _last_of_job(rows)):
        lines.append(_text_line(line, widths))
        if last and verdicts.get(row["job_id"]):
            lines.append(printable(f"    {verdicts[row['job_id']]}", limit=2000))
    return "\n".join(lines) + "\n"


def job_verdicts(rows: list[dict]) -> dict[str, str]:
    """Job id → its verdict, or the reason it was not evaluated."""
    out: dict[str, str] = {}
    for row in rows:
        text = row.get("verdict") or row.get("note")
        if text and not out.get(row["job_id"]):
            out[row["job_id"]] = text
    return out


def _with_first(rows: list[dict]) -> list[tuple[dict, bool]]:
    return [(row, i == 0 or rows[i - 1]["job_id"] != row["job_id"]) for i, row in enumerate(rows)]


def _last_of_job(rows: list[dict]) -> list[bool]:
    return [i == len(rows) - 1 or rows[i + 1]["job_id"] != row["job_id"] for i, row in enumerate(rows)]


def _text_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.rjust(w) if key in RIGHT else c.ljust(w)
                     for c, w, (_, key) in zip(cells, widths, TEXT_COLUMNS)).rstrip()


def _text_cell(row: dict, key: str, first: bool) -> str:
    if key in JOB_ONLY and not first:
        return ""
    if key == "finished_at":
        return str(row["finished_at"] or "")[:16].replace("T", " ")
    return display(row, key)


def display(row: dict, key: str) -> str:
    """A cell as people read it: kappas to two places, the interval as low..high, rates in percent,
    ``-`` where there is no figure."""
    if key == "kappa_ci":
        low, high = row.get("kappa_ci_low"), row.get("kappa_ci_high")
        return "-" if low is None or high is None else f"{low:.2f}..{high:.2f}"
    value = row.get(key)
    if key == "recommended":
        return {True: "yes", False: "no"}.get(value, "-")
    if value is None or value == "":
        return "-" if key not in ("job_id", "topic", "verdict", "note") else ""
    if key == "invalid_rate":
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV (header ``COLUMNS``; numbers as measured, booleans as true/false, none as an
    empty cell). Text is escaped (``text.printable``: no terminal escape or control character
    from a topic or a job id reaches whoever shows the file) and written by ``csvfile.csv_text``
    (a cell a spreadsheet would run as a formula gets a leading ``'``)."""
    return csvfile.csv_text([COLUMNS, *([_csv_cell(row.get(c)) for c in COLUMNS] for row in rows)])


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return printable(value, limit=1 << 20)
    return value


# --- the HTML page ---------------------------------------------------------------------------------

HTML_COLUMNS = (*TEXT_COLUMNS, ("recommended", "recommended"))

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#5b6473;margin:0 0 16px}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.charts figure{margin:0;border:1px solid #d8dde6;border-radius:6px;padding:8px 10px}
figcaption{font-weight:600;margin-bottom:4px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 6px;border-bottom:1px solid #e3e7ee;text-align:left;vertical-align:top}
th{background:#f2f4f8;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.first td{border-top:2px solid #b9c1cf}
td.when{min-width:6em} td.job,td.topic{overflow-wrap:anywhere} td.job{min-width:14em} td.topic{min-width:11em}
tr.verdict td{color:#3a4250;padding-bottom:10px;overflow-wrap:anywhere}
.yes{color:#17702f;font-weight:600} .no{color:#a3261b;font-weight:600}
.matrices figure{margin:0 0 16px;border:1px solid #d8dde6;border-radius:6px;padding:8px;max-width:1000px}
.matrices img{display:block;width:100%;height:auto}
.empty{color:#5b6473;font-style:italic}
"""


def html_page(rows: list[dict], *, title: str = "Model quality over time", generated_at: str | None = None) -> str:
    """One self-contained page: the charts, the table and the confusion matrices. Every value
    from the journal or a job's files is HTML-escaped."""
    generated_at = generated_at or datetime.now(UTC).isoformat(timespec="seconds")
    jobs = len({row["job_id"] for row in rows})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP)}">',
             f"<title>{_h(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_h(title)}</h1>",
             f'<p class="meta">{jobs} job{"s" if jobs != 1 else ""}, {len(rows)} row{"s" if len(rows) != 1 else ""}; '
             f"generated {_h(generated_at)}</p>"]
    if not rows:
        parts.append('<p class="empty">No finished jobs to report.</p>')
    else:
        parts += _charts_section(rows) + _table(rows) + _matrices_section(rows)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _h(value: Any) -> str:
    """A value for the page: control and direction-changing characters shown as escapes (as in the
    text form), then HTML-escaped."""
    return html.escape(printable(str(value), limit=10_000), quote=True)


def _table(rows: list[dict]) -> list[str]:
    head = "".join(f"<th>{_h(h)}</th>" for h, _ in HTML_COLUMNS)
    out = ["<h2>Every job's models</h2>", '<table id="jobs">', f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    verdicts = job_verdicts(rows)
    for (row, first), last in zip(_with_first(rows), _last_of_job(rows)):
        cells = "".join(_html_cell(row, key, first) for _, key in HTML_COLUMNS)
        out.append(f'<tr class="{"first" if first else "more"}" data-job="{_h(row["job_id"])}">{cells}</tr>')
        if last and verdicts.get(row["job_id"]):
            out.append(f'<tr class="verdict"><td></td><td colspan="{len(HTML_COLUMNS) - 1}">'
                       f'{_h(verdicts[row["job_id"]])}</td></tr>')
    out += ["</tbody>", "</table>"]
    return out


def _html_cell(row: dict, key: str, first: bool) -> str:
    if key in JOB_ONLY and not first:
        return "<td></td>"
    if key == "finished_at":
        return f'<td class="when">{_h(str(row["finished_at"] or "")[:16].replace("T", " "))}</td>'
    if key in ("job_id", "topic"):
        return f'<td class="{"job" if key == "job_id" else "topic"}">{_h(row[key])}</td>'
    text = display(row, key)
    if key == "recommended":
        return f'<td class="{text if text in ("yes", "no") else ""}">{_h(text)}</td>'
    return f'<td class="num">{_h(text)}</td>' if key in RIGHT else f"<td>{_h(text)}</td>"


def _matrices_section(rows: list[dict]) -> list[str]:
    out = []
    for row, first in _with_first(rows):
        if not first or not row.get("output_path"):
            continue
        uri = png_data_uri(Path(row["output_path"]) / "confusion_matrix.png")
        if uri is not None:
            out.append(f'<figure><figcaption>{_h(row["job_id"])}</figcaption>'
                       f'<img src="{uri}" alt="confusion matrix of {_h(row["job_id"])}"></figure>')
    return ['<h2>Confusion matrices</h2>', '<section class="matrices">', *out, "</section>"] if out else []


def png_data_uri(path: Path) -> str | None:
    """The PNG at ``path`` as a ``data:`` URI; None when it is missing, not a regular file, larger
    than ``MAX_IMAGE_BYTES`` or not a PNG."""
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            data = fh.read(MAX_IMAGE_BYTES + 1)
    except OSError:  # missing, a link, a FIFO or a folder (NotRegularFileError) or unreadable
        return None
    if len(data) > MAX_IMAGE_BYTES or not data.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# --- the chart: the new model's kappa over time, per topic -------------------------------------------

CHART_W, CHART_H = 560, 250
PAD_L, PAD_R, PAD_T, PAD_B = 44, 16, 14, 46
INSET = 48  # the first and last points stand this far inside the plot, so their date labels fit


def _charts_section(rows: list[dict]) -> list[str]:
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("model") in ("new", "base") and row.get("kappa") is not None:
            by_topic.setdefault(row["topic"] or "(no topic)", []).append(row)
    charts = [chart_svg(topic, points) for topic, points in by_topic.items()
              if any(p["model"] == "new" for p in points)]
    if not charts:
        return []
    return ["<h2>Kappa of the new model over time, per topic</h2>", '<section class="charts">', *charts, "</section>"]


class _Scale:
    """Where a finish time and a kappa go on the chart: time left to right, kappa from 1 at the top
    down to 0 or the lowest figure (interval included), at a multiple of 0.2."""

    def __init__(self, points: list[dict]) -> None:
        times = [_finish_seconds(p) for p in points]
        self.t0, self.t1 = min(times), max(times)
        lows = [p["kappa_ci_low"] for p in points if p.get("kappa_ci_low") is not None]
        self.y0 = max(-1.0, math.floor(min(0.0, *(p["kappa"] for p in points), *lows) * 5) / 5)

    def x(self, row: dict) -> float:
        inner = CHART_W - PAD_L - PAD_R - 2 * INSET
        t = _finish_seconds(row)
        return PAD_L + INSET + (inner / 2 if self.t1 == self.t0 else (t - self.t0) / (self.t1 - self.t0) * inner)

    def y(self, kappa: float) -> float:
        return PAD_T + (1.0 - kappa) / (1.0 - self.y0) * (CHART_H - PAD_T - PAD_B)


def chart_svg(topic: str, points: list[dict]) -> str:
    """A line chart of the new model's kappa (with its 95% interval) and the base model's (dashed)
    at each job's finish time."""
    scale = _Scale(points)
    new = [p for p in points if p["model"] == "new"]
    parts = [f"<figure><figcaption>{_h(topic)}</figcaption>",
             f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
             f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="kappa over time: {_h(topic)}">',
             *_axes(scale, new),
             *_series(scale, [p for p in points if p["model"] == "base"], "#8a93a3", dashed=True),
             *_series(scale, new, "#1f5fbf", dashed=False),
             f'<text x="{PAD_L}" y="{CHART_H - 6}" font-size="11" fill="#1f5fbf">'
             "&#9679; new model (bar: 95% CI)</text>",
             f'<text x="{PAD_L + 190}" y="{CHART_H - 6}" font-size="11" fill="#8a93a3">- - base model</text>',
             "</svg></figure>"]
    return "\n".join(parts)


def _series(scale: _Scale, points: list[dict], colour: str, *, dashed: bool) -> list[str]:
    """One model's kappas: a line through them, a point each (its job and figures as a tooltip)
    and, where known, its interval as a bar."""
    out = []
    if len(points) > 1:
        path = " ".join(f"{scale.x(p):.1f},{scale.y(p['kappa']):.1f}" for p in points)
        dash = ' stroke-dasharray="5 4"' if dashed else ""
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{path}"/>')
    for p in points:
        px, py = scale.x(p), scale.y(p["kappa"])
        if not dashed and p.get("kappa_ci_low") is not None and p.get("kappa_ci_high") is not None:
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{scale.y(p["kappa_ci_low"]):.1f}" '
                       f'y2="{scale.y(p["kappa_ci_high"]):.1f}" stroke="{colour}" stroke-opacity="0.45" '
                       'stroke-width="6"/>')
        tip = f"{p['job_id']}: {p['model']} model kappa {p['kappa']:.2f}, {display(p, 'rows')} rows"
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"><title>{_h(tip)}</title></circle>')
    return out


def _axes(scale: _Scale, new_points: Iterable[dict]) -> list[str]:
    """Grid lines at every 0.2 of kappa, and each new model's finish date and rows under the axis."""
    out = []
    for i in range(round((1.0 - scale.y0) / 0.2) + 1):
        k = scale.y0 + i * 0.2
        out.append(f'<line x1="{PAD_L}" x2="{CHART_W - PAD_R}" y1="{scale.y(k):.1f}" y2="{scale.y(k):.1f}" '
                   f'stroke="{"#9aa3b2" if abs(k) < 1e-9 else "#e3e7ee"}"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{scale.y(k) + 4:.1f}" font-size="11" text-anchor="end" '
                   f'fill="#5b6473">{k:.1f}</text>')
    for p in new_points:
        label = f"{str(p['finished_at'] or '')[:10]}, {display(p, 'rows')} rows"
        out.append(f'<text x="{scale.x(p):.1f}" y="{CHART_H - PAD_B + 16}" font-size="10" text-anchor="middle" '
                   f'fill="#5b6473">{_h(label)}</text>')
    return out


def _finish_seconds(row: dict) -> float:
    return _aware(str(row["finished_at"])).timestamp()


# --- the learning curve: agreement over the number of expert-rated rows, per topic -----------------

CURVE_COLUMNS = ("topic", "job_id", "finished_at", "rated_rows", "reviewed_rows", "rows_added", "conflicts",
                 "approach", "kappa_familiar", "kappa_new_kinds", "baseline_kappa_familiar",
                 "baseline_kappa_new_kinds", "note")
CURVE_TEXT = (("topic", "topic"), ("rated rows", "rated_rows"), ("reviewed", "reviewed_rows"), ("job", "job_id"),
              ("approach", "approach"), ("kappa familiar", "kappa_familiar"), ("new kinds", "kappa_new_kinds"),
              ("baseline familiar", "baseline_kappa_familiar"), ("baseline new kinds", "baseline_kappa_new_kinds"))
CURVE_RIGHT = {"rated_rows", "reviewed_rows", "kappa_familiar", "kappa_new_kinds", "baseline_kappa_familiar",
               "baseline_kappa_new_kinds"}


def curve_rows(cfg: Config, *, topic: str | None = None) -> list[dict]:
    """One row per job that recorded its training rows: its topic, the expert-rated rows it was
    trained on (and how many came from reviewed files), and from its ``evaluation.json`` the new
    model's and the baseline's kappa on familiar records and on new kinds of records (a random
    split has familiar records only); by topic, then oldest first."""
    paths = resolve_paths(cfg)
    with Journal(existing_journal(cfg)) as journal:
        sets = journal.training_sets(topic)
        records = {s["job_id"]: journal.get(s["job_id"]) for s in sets}
    rows = []
    for s in sets:
        record = records[s["job_id"]]
        folder = (paths.output_folder(record.output_path) if record else None) or paths.outputs / s["job_id"]
        meta, _ = read_json(folder, names.METADATA)
        report, problem = evaluation_file(folder) if meta else ({}, None)
        kappas = _set_kappas(report)
        row = {c: None for c in CURVE_COLUMNS} | {
            "topic": s["topic"], "job_id": s["job_id"], "finished_at": s["finished_at"], "rated_rows": s["rows"],
            "reviewed_rows": s["reviewed_rows"], "rows_added": s["rows_added"], "conflicts": s["conflicts"],
            "approach": _text(meta.get("approach")) or (record.approach if record else None),
            "kappa_familiar": kappas.get(("new", "familiar")), "kappa_new_kinds": kappas.get(("new", "new_kinds")),
            "baseline_kappa_familiar": kappas.get(("baseline", "familiar")),
            "baseline_kappa_new_kinds": kappas.get(("baseline", "new_kinds"))}
        if not kappas:
            row["note"] = problem or _not_evaluated(meta, folder)
        rows.append(row)
    order = {t: i for i, t in enumerate(dict.fromkeys(r["topic"] for r in rows))}
    return sorted(rows, key=lambda r: order[r["topic"]])  # stable: oldest first within a topic


def _set_kappas(report: dict) -> dict[tuple[str, str], float | None]:
    """(model key, "familiar" | "new_kinds") -> kappa; a split without new kinds: every held-out
    row is a familiar record, so the overall kappa is the familiar one."""
    figures = report.get("figures") if isinstance(report.get("figures"), dict) else {}
    out: dict[tuple[str, str], float | None] = {}
    for part in ("familiar", "new_kinds"):
        block = figures.get(part) if isinstance(figures.get(part), dict) else {}
        for m in block.get("models") or []:
            if isinstance(m, dict) and _text(m.get("key")):
                out[(m["key"], part)] = _number(m.get("kappa"))
    if not figures:
        for m in report.get("models") or []:
            if isinstance(m, dict) and _text(m.get("key")):
                out[(m["key"], "familiar")] = _number(m.get("kappa"))
    return out


def render_curve(rows: list[dict], fmt: str) -> str:
    """The learning curve as a text table (a topic's name on its first row), CSV or JSON."""
    if fmt == "csv":
        return csvfile.csv_text([CURVE_COLUMNS, *([_csv_cell(row.get(c)) for c in CURVE_COLUMNS] for row in rows)])
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if not rows:
        return "no job has recorded its training rows yet\n"
    cells = [[printable("" if key == "topic" and i and rows[i - 1]["topic"] == row["topic"] else display(row, key),
                        limit=200) for _, key in CURVE_TEXT] for i, row in enumerate(rows)]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, (h, _) in enumerate(CURVE_TEXT)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if key in CURVE_RIGHT else v.ljust(w)
                         for v, w, (_, key) in zip(values, widths, CURVE_TEXT)).rstrip()
    out = ["Learning curve: agreement with the experts over the expert-rated rows each model learned from",
           line([h for h, _ in CURVE_TEXT])]
    for row, values in zip(rows, cells):
        out.append(line(values))
        if row.get("note"):
            out.append(printable(f"    {row['note']}", limit=2000))
    return "\n".join(out) + "\n"
