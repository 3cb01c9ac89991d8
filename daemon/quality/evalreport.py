"""Answer quality: agreement metrics against the experts, and the report files.

Each answer is judged by ``prompts.parse_answer`` (``INVALID_RULE``): an invalid answer counts as
wrong, never guessed or repaired. ``score`` computes, for one model on
the held-out rows, what an analyst needs to judge it (accuracy, Cohen's kappa, macro-F1, per-label
precision / recall / F1, the confusion matrix with invalid answers as their own column, seeded
bootstrap 95 % intervals, latency) with scikit-learn. ``write_report`` writes ``evaluation.json``,
``evaluation.md``, ``confusion_matrix.png`` and ``predictions.csv`` atomically; labels and other
text from the user are escaped for Markdown (``md_text``), never read as mathtext in the figure, and
CSV cells never start a spreadsheet formula. No prompt, rationale
or other cell text is ever part of a metric, a report or a log line. numpy, scikit-learn and
matplotlib are imported inside the functions (the daemon's import stays light).
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import fsutil
from ..data.csvfile import csv_text
from ..data.prompts import INVALID_RULE
from ..outputs import names
from .agreement import BOOTSTRAP_SAMPLES, IMPORT_LOCK, INVALID, bootstrap, ci95, encode, rounded

REPORT_FILES = names.REPORT_FILES
CALIBRATION_FILE = names.CALIBRATION  # the new model's temperature, applied when it rates


@dataclass
class ModelResult:
    """One model's answers on the evaluated rows, in row order."""

    key: str  # "new", "base", "model_set"
    title: str  # what the report calls it: "fine-tune", "model set", "base model (zero-shot)"
    model: str  # the Ollama name, or the base weights (+ adapter) used by the local backend
    ratings: list[int | None]
    latencies_s: list[float]
    duration_s: float
    backend: str
    extra: dict = field(default_factory=dict)
    # per row, each allowed rating's probability at the answer's rating position (None: the
    # backend gave none for that row); None: no probabilities at all
    probs: list[dict[int, float] | None] | None = None


def score(result: ModelResult, expert: Sequence[int], labels: Mapping[str, int], *, seed: int = 42,
          samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Every metric of one model against the expert ratings (same rows, same order)."""
    import numpy as np

    with IMPORT_LOCK:  # see IMPORT_LOCK
        from sklearn.metrics import (
            accuracy_score,
            cohen_kappa_score,
            confusion_matrix,
            f1_score,
            precision_recall_fscore_support,
        )

    if len(result.ratings) != len(expert):
        raise ValueError("one answer per evaluated row is needed")
    n = len(expert)
    names = {int(v): str(k) for k, v in labels.items()}
    values = sorted(names)
    classes = [str(v) for v in values]
    y_true = encode(expert)
    y_pred = encode(result.ratings)
    invalid = sum(r is None for r in result.ratings)
    out: dict[str, Any] = {"key": result.key, "title": result.title, "model": result.model,
                           "backend": result.backend, "n": n, **result.extra}
    if n == 0:
        return {**out, "accuracy": None, "kappa": None, "macro_f1": None, "invalid": 0, "invalid_rate": None}
    everything = classes + [INVALID]
    kappa = cohen_kappa_score(y_true, y_pred, labels=everything) if len(set(y_true + y_pred)) > 1 else float("nan")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=everything)[: len(classes)]
    boot_acc, boot_kappa = bootstrap(y_true, y_pred, seed=seed, samples=samples)
    latencies = np.array(result.latencies_s, dtype=float) if result.latencies_s else np.zeros(0)
    out.update({
        "accuracy": rounded(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": ci95(boot_acc),
        "kappa": rounded(kappa),
        "kappa_ci95": ci95(boot_kappa),
        "macro_f1": rounded(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "invalid": int(invalid),
        "invalid_rate": rounded(invalid / n),
        "per_label": [{"label": names[v], "rating": v, "precision": rounded(precision[i]),
                       "recall": rounded(recall[i]), "f1": rounded(f1[i]), "support": int(support[i])}
                      for i, v in enumerate(values)],
        "confusion_matrix": {"rows": [names[v] for v in values],
                             "columns": [names[v] for v in values] + [INVALID],
                             "counts": matrix.astype(int).tolist()},
        "latency_s": {"p50": rounded(float(np.percentile(latencies, 50))) if latencies.size else None,
                      "p95": rounded(float(np.percentile(latencies, 95))) if latencies.size else None},
        "duration_s": rounded(result.duration_s),
        "records_per_s": rounded(n / result.duration_s) if result.duration_s > 0 else None,
    })
    return out


def majority(expert: Sequence[int], labels: Mapping[str, int]) -> dict:
    """The accuracy of always answering the most common expert rating (ties: the higher rating)."""
    from collections import Counter

    if not expert:
        return {"label": None, "rating": None, "accuracy": None}
    counts = Counter(int(r) for r in expert)
    rating = max(counts, key=lambda v: (counts[v], v))
    names = {int(v): str(k) for k, v in labels.items()}
    return {"label": names.get(rating, str(rating)), "rating": rating,
            "accuracy": rounded(counts[rating] / len(expert))}


def adapter_effect(new_answers: Sequence[str], base_answers: Sequence[str]) -> dict:
    """Did the adapter change the model? The fine-tune's raw answers against the base model's on
    the same rows: identical on every row means the adapter was silently ignored (a known failure
    with quantized bases), whatever the scores say."""
    pairs = list(zip(new_answers, base_answers))
    same = sum(a == b for a, b in pairs)
    ignored = bool(pairs) and same == len(pairs)
    return {"compared_rows": len(pairs), "identical_answers": same, "ignored": ignored,
            "message": (f"the fine-tune answered exactly like the base model on all {len(pairs)} held-out rows: "
                        "its adapter had no effect (not loaded, or trained to nothing); do not use this model"
                        if ignored else f"the fine-tune answered differently from the base model on "
                                        f"{len(pairs) - same} of {len(pairs)} held-out rows")}


SETS = {"familiar": "familiar records", "new_kinds": "new kinds of records"}


def figures(results: Sequence[ModelResult], expert: Sequence[int], labels: Mapping[str, int],
            sets: Sequence[str], *, seed: int) -> dict:
    """Each model scored separately on the familiar and the new-kinds held-out rows."""
    out = {}
    for name in SETS:
        idx = [i for i, s in enumerate(sets) if s == name]
        part = [ModelResult(r.key, r.title, r.model, [r.ratings[i] for i in idx],
                            [r.latencies_s[i] for i in idx] if r.latencies_s else [], r.duration_s, r.backend)
                for r in results]
        scored = [score(r, [expert[i] for i in idx], labels, seed=seed) for r in part]
        keep = ("key", "title", "n", "accuracy", "accuracy_ci95", "kappa", "kappa_ci95", "macro_f1",
                "invalid", "invalid_rate")
        out[name] = {"n": len(idx), "models": [{k: m.get(k) for k in keep} for m in scored]}
    return out


def generalisation(fig: dict) -> list[dict]:
    """Per model: does it agree with the experts less on new kinds of records than on familiar
    ones, by more than the two intervals allow? Then it has learned the examples more than the rule."""
    out = []
    for familiar, new in zip(fig["familiar"]["models"], fig["new_kinds"]["models"]):
        fk, nk = familiar.get("kappa"), new.get("kappa")
        fci, nci = familiar.get("kappa_ci95"), new.get("kappa_ci95")
        apart = bool(fk is not None and nk is not None and fci and nci and fci[0] > nci[1])
        if fk is None or nk is None:
            message = f"{familiar['title']}: kappa cannot be compared (too few rows of one kind)"
        elif apart:
            message = (f"{familiar['title']}: kappa {fk:.2f} on familiar records but {nk:.2f} on new kinds of "
                       "records, further apart than their intervals: it has learned the examples more than the "
                       "rule, so expect records unlike the training rows to score like the new kinds")
        else:
            message = (f"{familiar['title']}: kappa {fk:.2f} on familiar records and {nk:.2f} on new kinds of "
                       "records, within their intervals of each other")
        out.append({"key": familiar["key"], "familiar_kappa": fk, "new_kinds_kappa": nk,
                    "learned_examples_more_than_rule": apart, "message": message})
    return out


def evaluation_report(results: Sequence[ModelResult], expert: Sequence[int], rows: Sequence[int | str],
                      labels: Mapping[str, int], *, seed: int, source: str, created_at: str,
                      adapter_check: dict | None = None, sets: Sequence[str] | None = None,
                      split: dict | None = None, ids: Sequence[str] | None = None,
                      id_column: str | None = None) -> dict:
    """The machine-readable evaluation (``evaluation.json``); ``adapter_check``: ``adapter_effect``
    of a fine-tune; ``sets``: per row "familiar" or "new_kinds" (a grouped split), for the two
    figures side by side; ``split``: how the held-out rows were chosen; ``ids``: each row's record
    id from the input's ``id_column`` (``predictions.csv`` carries them)."""
    extra: dict[str, Any] = {}
    if split is not None:
        extra["split"] = split
    if sets is not None and len(set(sets)) == 2:
        fig = figures(results, expert, labels, sets, seed=seed)
        extra.update(figures=fig, generalisation=generalisation(fig))
    scored, confidences = [], {}
    for r in results:
        m = score(r, expert, labels, seed=seed)
        m["confidence"], confidences[r.key] = confidence_report(r, expert, seed=seed)
        scored.append(m)
    return {
        **({"adapter_effect": adapter_check} if adapter_check is not None else {}),
        **extra,
        "created_at": created_at, "source": source, "n": len(expert), "seed": seed,
        "bootstrap_samples": BOOTSTRAP_SAMPLES, "invalid_answer_rule": INVALID_RULE,
        "labels": {str(k): int(v) for k, v in labels.items()},
        "majority_class": majority(expert, labels),
        "models": scored,
        "_predictions": {"rows": list(rows), "expert": [int(e) for e in expert],
                         "models": {r.key: r.ratings for r in results}, "confidence": confidences,
                         **({"ids": list(ids), "id_column": id_column} if ids is not None and id_column else {})},
    }


CONFIDENCE_SOURCES = {"ollama": "Ollama's token log-probabilities (/api/chat logprobs)",
                      "openai": "the server's token log-probabilities (logprobs)",
                      "llama-server": "llama-server's token log-probabilities (logprobs)",
                      "local": "teacher forcing of each allowed rating at the rating position",
                      "baseline": "the bag-of-words classifier's own probabilities",
                      "head": "the head's own probabilities (logistic regression on the base model's hidden states)"}


def confidence_report(result: ModelResult, expert: Sequence[int], *, seed: int) -> tuple[dict, list]:
    """(what the report says of one model's confidences, the calibrated confidence per row):
    where they come from, how many rows have one, the temperature fitted on these rows with the
    expected calibration error before and after, the reliability points, and the coverage table."""
    from . import confidence as conf

    n = len(expert)
    probs = result.probs if result.probs is not None else [None] * n
    available = sum(p is not None and r is not None for p, r in zip(probs, result.ratings))
    if not available:
        return {"available": 0, "source": None,
                "note": f"the {result.backend} backend gave no probabilities for these answers: no confidence "
                        "is reported (it is never guessed)"}, [None] * n
    correct = [r is not None and r == e for r, e in zip(result.ratings, expert)]
    raw = [conf.confidence(p, r) for p, r in zip(probs, result.ratings)]
    temperature = conf.fit_temperature(probs, expert, result.ratings)
    calibrated = raw if temperature is None else [
        conf.confidence(conf.with_temperature(p, temperature), r) for p, r in zip(probs, result.ratings)]
    return {"available": available, "source": CONFIDENCE_SOURCES.get(result.backend, result.backend),
            "calibration": {"temperature": temperature, "ece_before": conf.ece(raw, correct),
                            "ece_after": conf.ece(calibrated, correct) if temperature is not None else None,
                            "reliability_before": conf.reliability(raw, correct),
                            "reliability_after": conf.reliability(calibrated, correct),
                            "fitted_on": "these held-out rows"},
            "coverage": conf.coverage(calibrated, result.ratings, expert, seed=seed)}, [
        None if c is None else round(c, 4) for c in calibrated]


# --- report files ------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return _fmt(value) + (f" ({_fmt(ci[0])}–{_fmt(ci[1])})" if ci else "")


_MD_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_MD_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_[]|~$"})


def md_text(value: Any) -> str:
    """Text from the user (a label of the mapping, a model's title, a file name) as it goes into
    Markdown: one line (control characters and line breaks become a space), ``<``, ``>`` and ``&``
    as HTML entities, and the characters that make emphasis, code, links, images, math or a table
    cell (``\\ ` * _ [ ] | ~ $``) backslash-escaped, so that it shows as written and never becomes
    markup or breaks a table."""
    text = _MD_BREAKS.sub(" ", str(value))
    return html.escape(text, quote=False).translate(_MD_ESCAPES)


def markdown(report: dict) -> str:
    """``evaluation.md``: the side-by-side table and each model's confusion matrix, with label names
    (every text from the user through ``md_text``)."""
    models = report["models"]
    head = "| | " + " | ".join(md_text(m["title"]) for m in models) + " |"
    rule = "|---|" + "---|" * len(models)

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(m) for m in models) + " |"

    maj = report["majority_class"]
    effect = report.get("adapter_effect") or {}
    verdict = report.get("verdict") or {}
    gate = report.get("quality_gate") or {}
    lines = [
        "# Evaluation against the expert ratings", "",
        *([f"**{md_text(verdict['headline'])}**", ""] if verdict.get("headline") else []),
        *([f"**Quality gate failed: {md_text(gate['reason'])}.** fine-tuner does not keep a model below the "
           "floor registered in Ollama under its name.", ""] if gate.get("status") == "failed" else []),
        *([f"**Warning: {effect['message']}.**", ""] if effect.get("ignored") else []),
        f"{report['n']} held-out rows the models never saw in training ({md_text(report['source'])}). "
        f"Always answering the most common expert rating (\"{md_text(maj['label'])}\") would score "
        f"accuracy {_fmt(maj['accuracy'])}.", "",
        head, rule,
        row("accuracy (95% CI)", lambda m: _with_ci(m.get("accuracy"), m.get("accuracy_ci95"))),
        row("Cohen's kappa (95% CI)", lambda m: _with_ci(m.get("kappa"), m.get("kappa_ci95"))),
        row("macro-F1", lambda m: _fmt(m.get("macro_f1"))),
        row("invalid answers", lambda m: f"{m.get('invalid', 0)} ({_fmt((m.get('invalid_rate') or 0) * 100, 0)}%)"),
        row("latency p50 / p95 (s)", lambda m: f"{_fmt((m.get('latency_s') or {}).get('p50'), 3)} / "
                                               f"{_fmt((m.get('latency_s') or {}).get('p95'), 3)}"),
        row("records/s", lambda m: _fmt(m.get("records_per_s"), 1)),
        row("backend", lambda m: md_text(m.get("backend", ""))),
        "",
        f"Invalid answers: {report['invalid_answer_rule']}.",
        "",
        "Kappa is agreement beyond chance: 1 is perfect agreement with the experts, 0 is what "
        "guessing with the same label frequencies gives. As a rough guide: below 0.4 poor, 0.4–0.6 "
        "moderate, 0.6–0.8 substantial, above 0.8 almost perfect. Intervals are seeded bootstrap "
        f"95% intervals over {report['bootstrap_samples']} resamples: with few held-out rows they are wide.",
        *_split_lines(report),
        *_confidence_lines(report),
    ]
    for m in models:
        cm = m.get("confusion_matrix")
        if not cm:
            continue
        lines += ["", f"## {md_text(m['title'])}: confusion matrix (rows: expert, columns: model)", "",
                  "| expert \\ model | " + " | ".join(md_text(c) for c in cm["columns"]) + " |",
                  "|---|" + "---|" * len(cm["columns"])]
        lines += [f"| {md_text(name)} | " + " | ".join(str(c) for c in counts) + " |"
                  for name, counts in zip(cm["rows"], cm["counts"])]
        lines += ["", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {md_text(p['label'])} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | {_fmt(p['f1'])} | "
                  f"{p['support']} |" for p in m["per_label"]]
    return "\n".join(lines) + "\n"


def split_text(split: dict) -> str:
    """How the held-out rows were chosen, in one sentence for the analyst (counts and names only)."""
    grouping = split.get("grouping") or {}
    if split.get("kind") == "grouped":
        text = (f"Held-out rows: {split.get('familiar_rows', 0)} familiar records (a random sample of the rows "
                f"beside the training rows) and {split.get('new_kinds_rows', 0)} new kinds of records "
                f"({split.get('held_out_groups', 0)} of {split.get('groups', 0)} groups of the column "
                f"\"{md_text(grouping.get('column'))}\", grouped by {md_text(grouping.get('rule'))}, chosen by "
                f"{md_text(grouping.get('chosen_by'))}, held out whole)")
    elif split.get("kind") == "random":
        why = split.get("reason") or grouping.get("reason") or "no grouping"
        text = f"Held-out rows: a random split only ({md_text(why)})"
    else:
        return "Held-out rows: none"
    return (text + f". {split.get('duplicate_rows', 0)} rows repeat another row's text (case, spacing and "
            f"punctuation aside): each text is all in training or all held out, and "
            f"{split.get('duplicates_set_aside', 0)} held-out copies were set aside.")


def _split_lines(report: dict) -> list[str]:
    """The two figures side by side and what they say, when the split was grouped."""
    lines: list[str] = []
    if report.get("split"):
        lines += ["", split_text(report["split"])]
    fig = report.get("figures")
    if not fig:
        return lines
    models = fig["familiar"]["models"]
    lines += ["", "## Familiar records and new kinds of records", "",
              "Agreement on familiar records is what to expect from records like the training rows; agreement "
              "on new kinds of records (diagnoses held out whole) is what to expect when next month brings "
              "new codes and new wording.", "",
              "| | " + " | ".join(md_text(m["title"]) for m in models) + " |", "|---|" + "---|" * len(models)]
    for name, title in SETS.items():
        part = fig[name]["models"]
        lines.append(f"| {title} ({fig[name]['n']} rows): kappa (95% CI) | "
                     + " | ".join(_with_ci(m.get("kappa"), m.get("kappa_ci95")) for m in part) + " |")
        lines.append(f"| {title}: invalid answers | "
                     + " | ".join(f"{_fmt((m.get('invalid_rate') or 0) * 100, 0)}%" for m in part) + " |")
    lines.append("")
    lines += [f"- {md_text(g['message'])}." for g in report.get("generalisation", [])]
    return lines


def new_model(report: dict) -> dict | None:
    """The report's entry for the job's new model (the fine-tune, or the model set), if evaluated."""
    return next((m for m in report.get("models") or [] if m.get("key") == "new"), None)


def _confidence_lines(report: dict) -> list[str]:
    """The new model's confidences: where they come from, calibration, and the coverage table
    (what share of the records to accept at each threshold, and how well those agree)."""
    new = new_model(report)
    if new is None or "confidence" not in new:
        return []
    info = new["confidence"]
    lines = ["", "## Confidence: which ratings to accept, which records to send to the experts", ""]
    if not info.get("available"):
        return lines + [f"{md_text(new['title'])}: {md_text(info.get('note', 'no confidence'))}."]
    cal = info["calibration"]
    t = cal.get("temperature")
    lines.append(f"Confidence is the probability the {md_text(new['title'])} gives its rating, from "
                 f"{md_text(info['source'])}, over the allowed ratings "
                 f"({info['available']} of {new['n']} rows have one)"
                 + (f", calibrated with temperature {t:.2f} fitted on these rows: expected calibration error "
                    f"{_fmt(cal.get('ece_before'))} before, {_fmt(cal.get('ece_after'))} after." if t is not None
                    else f"; too few rows to calibrate (expected calibration error {_fmt(cal.get('ece_before'))})."))
    lines += ["", "| accept when confidence ≥ | records accepted | kappa on them (95% CI) | accuracy on them (95% CI) "
              "| to the experts |", "|---|---|---|---|---|"]
    for row in info.get("coverage") or []:
        share = row.get("share") or 0
        lines.append(f"| {row['threshold']:.2f} | {row['accepted']} ({share * 100:.0f}%) | "
                     f"{_with_ci(row.get('kappa'), row.get('kappa_ci95'))} | "
                     f"{_with_ci(row.get('accuracy'), row.get('accuracy_ci95'))} | {(1 - share) * 100:.0f}% |")
    pick = next((r for r in info.get("coverage") or [] if r.get("threshold") == 0.9 and r.get("accepted")), None)
    if pick is not None:
        lines += ["", f"For example: accept ≥ 0.9: {pick['share'] * 100:.0f} % of records at kappa "
                      f"{_fmt(pick.get('kappa'))}; the other {(1 - pick['share']) * 100:.0f} % to review "
                      "(`rating.review_below` writes them to `needs_review.csv`)."]
    return lines


def table_text(report: dict) -> str:
    """The side-by-side tables and how to read them (``evaluation.md`` without the matrices)."""
    head, *sections = markdown(report).split("\n## ")
    keep = ("Familiar records", "Confidence")
    return "\n## ".join([head, *(s for s in sections if s.startswith(keep))]).rstrip("\n")


def predictions_csv(report: dict) -> str:
    """``predictions.csv``: the record id (when the input had an id column, under its name), row,
    expert rating, then each model's rating (empty when invalid), validity and calibrated confidence
    (empty when the backend gave none). No prompt or rationale text; every cell through
    ``csvfile.safe_cell``."""
    pred = report["_predictions"]
    keys = list(pred["models"])
    confidences = pred.get("confidence") or {}
    ids = pred.get("ids")
    lines: list[list[Any]] = [([pred["id_column"]] if ids else []) + ["row", "expert_rating"] + [
        c for k in keys for c in (f"{k}_rating", f"{k}_valid", f"{k}_confidence")]]
    for i, row in enumerate(pred["rows"]):
        cells: list[Any] = ([ids[i]] if ids else []) + [row, pred["expert"][i]]
        for k in keys:
            rating = pred["models"][k][i]
            value = (confidences.get(k) or [None] * len(pred["rows"]))[i]
            cells += ["" if rating is None else rating, "true" if rating is not None else "false",
                      "" if value is None else value]
        lines.append(cells)
    return csv_text(lines)


def confusion_png(report: dict, path: Path) -> None:
    """``confusion_matrix.png``: one panel per model, counts written in the cells (headless)."""
    import numpy as np

    with IMPORT_LOCK:  # see IMPORT_LOCK: pyplot's current figure is process-wide state
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        models = [m for m in report["models"] if m.get("confusion_matrix")]
        new = new_model(report) or {}
        calibration = (new.get("confidence") or {}).get("calibration")
        panels = max(1, len(models)) + (1 if calibration else 0)
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.9), squeeze=False)
        if calibration:
            _reliability_panel(axes[0][-1], new, calibration)
        for ax, m in zip(axes[0], models):
            cm = m["confusion_matrix"]
            counts = np.array(cm["counts"], dtype=float)
            ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1.0, counts.max()))
            # parse_math=False: a label is shown as written, never read as mathtext ($...$)
            ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=30, ha="right", fontsize=8,
                          parse_math=False)
            ax.set_yticks(range(len(cm["rows"])), cm["rows"], fontsize=8, parse_math=False)
            ax.set_xlabel("model")
            ax.set_ylabel("expert")
            kappa = m.get("kappa")
            ax.set_title(f"{m['title']}\naccuracy {_fmt(m.get('accuracy'))}, kappa {_fmt(kappa)}", fontsize=9,
                         parse_math=False)
            top = counts.max() if counts.size else 0
            for (r, c), value in np.ndenumerate(counts):
                ax.text(c, r, str(int(value)), ha="center", va="center", fontsize=9,
                        color="white" if top and value > top / 2 else "black")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
    with fsutil.atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


def _reliability_panel(ax: Any, model: dict, calibration: dict) -> None:
    """The reliability diagram of the new model: each confidence bin's accuracy against its mean
    confidence, before and after the temperature (the diagonal is perfect calibration)."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for key, label, style in (("reliability_before", f"raw (ECE {_fmt(calibration.get('ece_before'))})", "o--"),
                              ("reliability_after", f"T = {_fmt(calibration.get('temperature'))} "
                                                    f"(ECE {_fmt(calibration.get('ece_after'))})", "s-")):
        points = calibration.get(key) or []
        if points:
            ax.plot([p["confidence"] for p in points], [p["accuracy"] for p in points], style, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{model.get('title', 'new model')}: reliability", fontsize=9, parse_math=False)
    ax.legend(fontsize=7, loc="upper left")


def write_report(report: dict, dest: Path) -> list[str]:
    """Write the four report files into ``dest`` (each atomically); returns their names."""
    dest = Path(dest)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    fsutil.write_json(dest / names.EVALUATION, public)
    fsutil.write_text(dest / names.EVALUATION_MD, markdown(report))
    fsutil.write_text(dest / names.PREDICTIONS, predictions_csv(report))
    confusion_png(report, dest / names.CONFUSION_MATRIX)
    files = list(REPORT_FILES)
    new = new_model(report)
    calibration = ((new or {}).get("confidence") or {}).get("calibration") or {}
    if calibration.get("temperature") is not None:
        # stored with the model: rating applies it to every confidence it writes
        fsutil.write_json(dest / CALIBRATION_FILE, {
            "temperature": calibration["temperature"], "ece_before": calibration["ece_before"],
            "ece_after": calibration["ece_after"], "rows": new["confidence"]["available"],
            "backend": new.get("backend"), "fitted_at": report.get("created_at")})
        files.append(CALIBRATION_FILE)
    return files


def metadata_summary(report: dict, files: list[str]) -> dict:
    """What ``fine_tuning_metadata.json`` records under ``evaluation`` once the report is written."""
    effect = report.get("adapter_effect")
    split = report.get("split") or {}
    learned = [g["key"] for g in report.get("generalisation", []) if g["learned_examples_more_than_rule"]]
    verdict = report.get("verdict") or {}
    return {"status": "done", "backend": report["models"][0]["backend"], "rows": report["n"],
            "models": summary_line(report), "files": files,
            **({"recommended": verdict.get("recommended"), "verdict": verdict.get("headline")} if verdict else {}),
            **({"quality_gate": report["quality_gate"]} if "quality_gate" in report else {}),
            **({"split": split.get("kind"), "duplicates_set_aside": split.get("duplicates_set_aside")}
               if split else {}),
            **({"learned_examples_more_than_rule": learned} if "generalisation" in report else {}),
            **({"adapter_ignored": effect["ignored"]} if effect is not None else {})}


def summary_line(report: dict) -> list[dict]:
    """Per model: the numbers the ``evaluation_finished`` event and ``status`` show."""
    fig = report.get("figures") or {}
    by_set = {name: {m["key"]: m.get("kappa") for m in fig[name]["models"]} for name in fig}
    return [{"model": m["key"], "accuracy": m.get("accuracy"), "kappa": m.get("kappa"),
             "invalid_rate": m.get("invalid_rate"),
             **{f"kappa_{name}": kappas.get(m["key"]) for name, kappas in by_set.items()}}
            for m in report["models"]]
