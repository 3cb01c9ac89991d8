"""Whether to trust a model, in plain words: the verdict on an evaluation and the quality gate.

``verdict`` reads an evaluation report (``evaluation.evaluation_report``) and says whether the job's
new model is recommended and why, from the measured figures only: its kappa and the band it falls
in, on the honest figure (the new kinds of records when the split was grouped and holds enough of
them, else all held-out rows); whether it beats always answering the most common rating and the
base model beyond the overlap of their intervals; its invalid rate; whether it learned the examples
more than the rule (a reason not to recommend it when the verdict rests on all held-out rows, a
caution when it rests on the new kinds, which already measure records unlike the training rows);
and whether there were enough held-out rows to tell at all. ``quality_gate`` applies the
configured floor (``evaluation.min_kappa``, ``evaluation.max_invalid_rate``), off unless set.
Pure functions on the report's numbers: no data text ever enters a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .baseline import KEY as BASELINE_KEY
from .evalreport import new_model

# Landis and Koch's bands, the ones evaluation.md explains
BANDS = ((0.8, "almost perfect agreement"), (0.6, "substantial agreement"), (0.4, "moderate agreement"),
         (0.2, "fair agreement"), (0.0, "slight agreement"))
NEW_KINDS_MIN_ROWS = 20  # fewer new-kinds rows than this: the verdict rests on all held-out rows


@dataclass(frozen=True)
class Thresholds:
    """What a recommended model must reach (``evaluation.recommend_*``; ``min_rows``: the fewest
    held-out rows a verdict is given on)."""

    min_kappa: float = 0.6
    max_invalid_rate: float = 0.05
    min_rows: int = 30


def band(kappa: float | None) -> str:
    if kappa is None:
        return "no measurable agreement"
    for floor, name in BANDS:
        if kappa > floor:
            return name
    return "no agreement beyond chance"


def _pct(rate: float | None) -> str:
    return f"{(rate or 0) * 100:.0f} %"


def _kappa_text(kappa: float | None, ci: list[float] | None) -> str:
    if kappa is None:
        return "kappa n/a"
    return f"kappa {kappa:.2f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def _new_kinds_basis(report: dict) -> dict | None:
    """The new kinds' figures when the verdict rests on them (a grouped split with enough of them)."""
    new_kinds = (report.get("figures") or {}).get("new_kinds")
    return new_kinds if new_kinds and new_kinds.get("n", 0) >= NEW_KINDS_MIN_ROWS else None


def _basis_models(report: dict) -> tuple[str, dict[str, dict]]:
    """(what the verdict rests on, every model's figures there by key)."""
    new_kinds = _new_kinds_basis(report)
    if new_kinds is not None:
        return f"new kinds of records ({new_kinds['n']} rows)", {m["key"]: m for m in new_kinds["models"]}
    return f"all held-out rows ({report.get('n', 0)})", {m["key"]: m for m in report.get("models", [])}


def _basis(report: dict) -> tuple[str, dict | None, dict | None]:
    """(what the verdict rests on, the new model's figures there, the base model's)."""
    basis, by_key = _basis_models(report)
    return basis, by_key.get("new"), by_key.get("base")


def _against_baseline(report: dict, new: dict) -> tuple[str | None, str | None, str | None, bool]:
    """What the verdict says of the bag-of-words baseline trained on the same rows: (a reason, a
    problem, a caveat, whether it agrees better than every model). A model that loses to it is not
    recommended; one that does not beat it beyond the intervals is told so plainly."""
    _, by_key = _basis_models(report)
    baseline = by_key.get(BASELINE_KEY)
    kappa, ci = new.get("kappa"), new.get("kappa_ci95")
    if baseline is None or baseline.get("kappa") is None or kappa is None:
        return None, None, None, False
    b_kappa, b_ci = baseline["kappa"], baseline.get("kappa_ci95")
    others = [m.get("kappa") for k, m in by_key.items() if k != BASELINE_KEY]
    best = all(k is None or b_kappa > k for k in others)
    what = f"a bag-of-words classifier trained on the same rows ({_kappa_text(b_kappa, b_ci)})"
    if ci and b_ci and ci[0] > b_ci[1]:
        return f"better than {what}, the intervals apart", None, None, best
    if b_kappa > kappa:
        return None, f"{what} agrees better with the experts", None, best
    return None, None, (f"{what[0].upper()}{what[1:]} agrees as well: the {new.get('title', 'new model')} "
                        "does not beat it beyond their intervals."), best


def verdict(report: dict, thresholds: Thresholds = Thresholds()) -> dict:
    """``{"recommended": bool | None, "headline": one sentence, "reasons": [...], ...}`` for the
    job's new model; ``recommended`` is None when there were too few held-out rows to tell (unless
    even the top of the kappa's interval is below the bar: then it is False)."""
    new_all = new_model(report)
    if new_all is None:
        return {"recommended": None, "headline": "No verdict: the new model was not evaluated.", "reasons": []}
    title = new_all.get("title", "the new model")
    n = int(report.get("n") or 0)
    if n < thresholds.min_rows:
        below = _whole_interval_below(report, new_all, thresholds, n)
        if below is not None:
            return below
        return {"recommended": None, "basis": f"all held-out rows ({n})", "kappa": new_all.get("kappa"),
                "band": band(new_all.get("kappa")),
                "headline": f"Cannot tell yet: only {n} held-out rows were rated (at least {thresholds.min_rows} are "
                            "needed for a verdict); rate more records with the experts and build the model again.",
                "reasons": [f"{n} held-out rows: the intervals are too wide to tell a good model from a lucky one"]}
    basis, new, base = _basis(report)
    new = new or new_all
    kappa, ci = new.get("kappa"), new.get("kappa_ci95")
    reasons, problems = [], []
    what = band(kappa)
    kappa_ok = kappa is not None and kappa >= thresholds.min_kappa
    (reasons if kappa_ok else problems).append(
        f"{what} with the experts on {basis}: {_kappa_text(kappa, ci)}"
        + ("" if kappa_ok else f", below the {thresholds.min_kappa:.2f} a recommended model needs"))
    maj = report.get("majority_class") or {}
    acc, acc_ci = new_all.get("accuracy"), new_all.get("accuracy_ci95")
    if maj.get("accuracy") is not None and acc is not None:
        beats = bool(acc_ci) and acc_ci[0] > maj["accuracy"]
        (reasons if beats else problems).append(
            f"accuracy {acc:.2f} " + ("beats" if beats else "does not beat") +
            f" always answering \"{maj.get('label')}\" ({maj['accuracy']:.2f})"
            + ("" if beats else " beyond its interval"))
    if base is not None and base is not new and base.get("kappa") is not None and kappa is not None:
        base_ci = base.get("kappa_ci95")
        beats = bool(ci and base_ci) and ci[0] > base_ci[1]
        (reasons if beats else problems).append(
            (f"better than the base model ({_kappa_text(base.get('kappa'), base_ci)}), the intervals apart"
             if beats else f"not better than the base model beyond their intervals "
                           f"({_kappa_text(base.get('kappa'), base_ci)})"))
    invalid = new_all.get("invalid_rate")
    invalid_ok = invalid is not None and invalid <= thresholds.max_invalid_rate
    (reasons if invalid_ok else problems).append(
        f"{_pct(invalid)} of its answers were invalid"
        + ("" if invalid_ok else f" (at most {_pct(thresholds.max_invalid_rate)} for a recommended model)"))
    beats_baseline, baseline_problem, caveat, use_baseline = _against_baseline(report, new)
    if beats_baseline:
        reasons.append(beats_baseline)
    if baseline_problem:
        problems.append(baseline_problem)
    effect = report.get("adapter_effect") or {}
    if effect.get("ignored"):
        problems.insert(0, "its adapter had no effect: it answered exactly like the base model")
    learned = next((g for g in report.get("generalisation", []) if g.get("key") == "new"), None)
    gap = None
    if learned and learned.get("learned_examples_more_than_rule"):
        if _new_kinds_basis(report) is not None:
            # the verdict already rests on the new kinds: the gap says what to expect, it is no reason more
            gap = ("It agrees less on new kinds of records than on familiar ones (it learned the examples more "
                   "than the rule): expect records unlike the training rows to score like the new kinds.")
        else:
            problems.append("it agrees less on new kinds of records than on familiar ones: it learned the "
                            "examples more than the rule")
    recommended = not problems
    if recommended:
        headline = f"Recommended: the {title} shows " + "; ".join(reasons) + "."
    else:
        headline = f"Not recommended: the {title}: " + "; ".join(problems) + "."
    if gap:
        headline += " " + gap
    if caveat:
        headline += " " + caveat
    if use_baseline:
        headline += (" Use the bag-of-words classifier instead: it agrees better than every model measured "
                     "(fine-tuner rate --backend baseline).")
    return {"recommended": recommended, "use_baseline": use_baseline, "basis": basis, "kappa": kappa,
            "kappa_ci95": ci, "band": what,
            "headline": headline, "reasons": reasons, "problems": problems,
            "thresholds": {"min_kappa": thresholds.min_kappa, "max_invalid_rate": thresholds.max_invalid_rate,
                           "min_rows": thresholds.min_rows}}


def _whole_interval_below(report: dict, new_all: dict, thresholds: Thresholds, n: int) -> dict | None:
    """With too few rows for a verdict either way, a kappa whose whole interval lies below the bar
    still says enough: not recommended (None when the interval reaches the bar, or there is none)."""
    basis, new, _ = _basis(report)
    new = new or new_all
    kappa, ci = new.get("kappa"), new.get("kappa_ci95")
    if kappa is None or not ci or ci[1] >= thresholds.min_kappa:
        return None
    problem = (f"{band(kappa)} with the experts on {basis}: {_kappa_text(kappa, ci)}, the whole interval below "
               f"the {thresholds.min_kappa:.2f} a recommended model needs, even with only {n} held-out rows")
    return {"recommended": False, "basis": basis, "kappa": kappa, "kappa_ci95": ci, "band": band(kappa),
            "headline": f"Not recommended: the {new_all.get('title', 'the new model')}: {problem}.",
            "reasons": [], "problems": [problem],
            "thresholds": {"min_kappa": thresholds.min_kappa, "max_invalid_rate": thresholds.max_invalid_rate,
                           "min_rows": thresholds.min_rows}}


def quality_gate(report: dict, min_kappa: float | None, max_invalid_rate: float | None) -> dict:
    """``{"status": "off" | "passed" | "failed", "reason": ...}``: the configured floor on the new
    model's kappa (on the verdict's basis) and invalid rate."""
    if min_kappa is None and max_invalid_rate is None:
        return {"status": "off"}
    new_all = new_model(report) or {}
    basis, new, _ = _basis(report)
    kappa = (new or new_all).get("kappa")
    invalid = new_all.get("invalid_rate")
    failures = []
    if min_kappa is not None and (kappa is None or kappa < min_kappa):
        failures.append(f"kappa {'n/a' if kappa is None else f'{kappa:.2f}'} on {basis} is below "
                        f"evaluation.min_kappa {min_kappa:.2f}")
    if max_invalid_rate is not None and (invalid is None or invalid > max_invalid_rate):
        failures.append(f"{_pct(invalid)} invalid answers is above evaluation.max_invalid_rate "
                        f"{_pct(max_invalid_rate)}")
    out: dict[str, Any] = {"status": "failed" if failures else "passed", "min_kappa": min_kappa,
                           "max_invalid_rate": max_invalid_rate, "kappa": kappa, "invalid_rate": invalid}
    out["reason"] = "; ".join(failures) if failures else f"kappa and invalid rate within the floor on {basis}"
    return out
