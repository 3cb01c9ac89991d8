"""How sure a model is of each rating, from its own probabilities, and how far to trust that.

A rating's confidence is the probability the model gives it at the rating's position in the answer
(``"rating": <value>``), over the mapping's allowed values only, so that the values' probabilities
sum to 1. It comes from the backend and is never made up: ``probabilities_from_tokens`` reads the
token log-probabilities a server returns (Ollama's ``/api/chat`` ``logprobs``, an OpenAI-compatible
server's ``choices[0].logprobs.content``; both are lists of ``{token, logprob, top_logprobs}``), and
the local child scores each allowed value by teacher forcing (``daemon.quality.generate``). A value
whose first token is shared with another's (1 and 10) is resolved only along the path the model
took; what a backend does not reveal is left out, never guessed. When a backend gives no
probabilities the confidence is None and every report says so.

``fit_temperature`` calibrates on the held-out rows (one temperature T for the model: each row's
probabilities become ``p ** (1 / T)``, renormalised; T is chosen so that the answered rating's
confidence best forecasts whether the experts agree with it), ``ece`` is the expected calibration error of
the answered ratings' confidences (10 equal-width bins), and ``coverage`` says, for confidence
thresholds, what share of the records would be accepted and how well those agree with the experts.
Pure Python and numpy (``coverage`` counts agreement with ``agreement``'s statistics); no record
text is ever read here beyond the answer's rating.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .agreement import bootstrap, ci95, encode, kappa, rounded

TOP_LOGPROBS = 20  # alternatives asked for at each answer token (Ollama and OpenAI allow 0-20)
# an unescaped "rating" key and its integer value (inside a JSON string every quote is escaped)
_RATING = re.compile(r'(?<!\\)"rating"\s*:\s*(-?\d+)')
_NUMBER_HEAD = re.compile(r"-?\d*")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
ECE_BINS = 10
T_BOUNDS = (0.05, 20.0)  # where the fit searches
T_VALID = (1e-3, 1e3)  # what a stored temperature may be: beyond, every confidence is 0, 1 or NaN
# a log-probability is at most 0; servers round, but one above this is not a log-probability at all
MAX_LOGPROB = 1e-3
FLOOR = 1e-6  # a probability of 0 for the expert's rating would make the likelihood infinite

Probabilities = dict[int, float]


def rating_span(text: str | None) -> tuple[int, int] | None:
    """Where the rating's value is in a JSON answer (start, end), or None. The last unescaped
    ``"rating"`` key wins (answers are written reason first, the rating last)."""
    if not isinstance(text, str):
        return None
    matches = list(_RATING.finditer(text))
    return matches[-1].span(1) if matches else None


def token_entries(value: Any) -> list[tuple[str, float, list[tuple[str, float]]]] | None:
    """``[{token, logprob, top_logprobs: [{token, logprob}]}]`` as (token, logprob, alternatives),
    or None when the server sent something else, a log-probability that is not a finite number at
    most 0 included (then there is no confidence, and no error: the rating itself stands)."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for entry in value:
        if not isinstance(entry, dict):
            return None
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not _log_probability(logprob):
            return None
        alternatives = []
        for alt in entry.get("top_logprobs") or []:
            if (not isinstance(alt, dict) or not isinstance(alt.get("token"), str)
                    or not _log_probability(alt.get("logprob"))):
                return None
            alternatives.append((alt["token"], float(alt["logprob"])))
        out.append((token, float(logprob), alternatives))
    return out


def _log_probability(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value <= MAX_LOGPROB)


def probabilities_from_tokens(entries: Sequence[tuple[str, float, Sequence[tuple[str, float]]]] | None,
                              values: Sequence[int]) -> Probabilities | None:
    """Each allowed value's probability at the rating's position (summing to 1 over the values
    revealed), or None when the answer has no rating the tokens show, or its value got no mass."""
    if not entries:
        return None
    text = "".join(token for token, _, _ in entries)
    span = rating_span(text)
    if span is None:
        return None
    start, end = span
    chosen = int(text[start:end])
    offset, k = 0, 0
    for k, (token, _, _) in enumerate(entries):  # noqa: B007 (k is the token the loop stops at)
        if offset + len(token) > start:
            break
        offset += len(token)
    head = entries[k][0][: start - offset]  # what the token holds before the number (" " in " 1")
    names = {int(v): str(int(v)) for v in values}
    logs: dict[int, list[float]] = {}  # each value's log-probabilities, summed once scaled by the largest
    token, logprob, alternatives = entries[k]
    candidates = dict(alternatives)
    candidates[token] = max(candidates.get(token, -math.inf), logprob)
    for alt, alt_logprob in candidates.items():
        if not alt.startswith(head):
            continue
        rest = alt[len(head):]
        digits = _NUMBER_HEAD.match(rest).group(0)
        if not digits:
            continue
        complete = len(digits) < len(rest)
        matches = [v for v, n in names.items() if (n == digits if complete else n.startswith(digits))]
        if len(matches) == 1:
            logs.setdefault(matches[0], []).append(alt_logprob)
        elif alt == token and chosen in matches:
            # shared first token on the path taken: the rest of the number's tokens as generated
            path = alt_logprob
            covered = offset + len(token)
            for next_token, next_logprob, _ in entries[k + 1:]:
                if covered >= end:
                    break
                path += next_logprob
                covered += len(next_token)
            logs.setdefault(chosen, []).append(path)
    if chosen not in logs:
        return None
    # a softmax over the values' masses: scaled by the largest, no exp overflows or all underflows
    top = max(x for xs in logs.values() for x in xs)
    if not math.isfinite(top):
        return None
    mass = {v: math.fsum(math.exp(x - top) for x in xs) for v, xs in logs.items()}
    total = math.fsum(mass.values())
    if mass[chosen] <= 0:
        return None
    return {v: mass.get(v, 0.0) / total for v in sorted(names)}


def valid_temperature(value: Any) -> bool:
    """A calibration temperature that can be applied: a number from 0.001 to 1000."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and T_VALID[0] <= value <= T_VALID[1])


def confidence(probs: Mapping[int, float] | None, rating: int | None) -> float | None:
    """The probability of the answered rating (None without probabilities or a valid rating)."""
    if probs is None or rating is None:
        return None
    value = probs.get(int(rating))
    return None if value is None else float(value)


# --- calibration -------------------------------------------------------------------------------

def with_temperature(probs: Mapping[int, float] | None, temperature: float) -> Probabilities | None:
    """``p ** (1 / T)`` renormalised: T > 1 softens over-confident probabilities, T < 1 sharpens
    (T outside ``T_VALID`` is a ValueError: stored ones are checked where they are read)."""
    if probs is None:
        return None
    if not valid_temperature(temperature):
        raise ValueError(f"a calibration temperature must be a number from {T_VALID[0]:g} to {T_VALID[1]:g}")
    if temperature == 1.0:
        return dict(probs)
    logs = {v: math.log(max(p, FLOOR)) / temperature for v, p in probs.items() if p > 0}
    top = max(logs.values())
    weights = {v: math.exp(x - top) for v, x in logs.items()}
    total = sum(weights.values())
    return {v: weights.get(v, 0.0) / total for v in probs}


def _nll(rows: Sequence[tuple[Mapping[int, float], int, bool]], temperature: float) -> float:
    """The mean log-loss of the answered ratings' confidences as forecasts of being right."""
    total = 0.0
    for probs, answered, right in rows:
        sure = with_temperature(probs, temperature).get(answered, 0.0)
        sure = min(max(sure, FLOOR), 1 - FLOOR)
        total -= math.log(sure if right else 1 - sure)
    return total / len(rows)


def fit_temperature(probs: Sequence[Mapping[int, float] | None], expert: Sequence[int],
                    ratings: Sequence[int | None]) -> float | None:
    """The temperature under which the answered ratings' confidences best forecast whether they
    are right (the log-loss of confidence against agreement with the expert, on the held-out rows;
    bounded scalar search): what a confidence is used for, accepting a rating or sending it to the
    experts. None with fewer than 10 answered rows that have probabilities; 1 when no temperature
    does better (every answer certain)."""
    from scipy.optimize import minimize_scalar

    rows = [(p, int(r), int(r) == int(e)) for p, r, e in zip(probs, ratings, expert)
            if p is not None and r is not None]
    if len(rows) < 10:
        return None
    lo, hi = (math.log(b) for b in T_BOUNDS)
    best = minimize_scalar(lambda x: _nll(rows, math.exp(x)), bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-4})
    if not _nll(rows, 1.0) - float(best.fun) > 1e-6:
        return 1.0
    return round(math.exp(float(best.x)), 4)


def _binned(confidences: Sequence[float | None], correct: Sequence[bool],
            bins: int) -> tuple[int, list[tuple[float, float, list[tuple[float, bool]]]]]:
    """(rows with a confidence, the non-empty equal-width bins as (low, high, their rows))."""
    pairs = [(c, bool(ok)) for c, ok in zip(confidences, correct) if c is not None]
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, ok) for c, ok in pairs if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if inside:
            out.append((lo, hi, inside))
    return len(pairs), out


def ece(confidences: Sequence[float | None], correct: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: the rows' share-weighted gap between confidence and accuracy
    in equal-width confidence bins (rows without a confidence are left out)."""
    rows, binned = _binned(confidences, correct, bins)
    if not rows:
        return None
    total = 0.0
    for _lo, _hi, inside in binned:
        gap = abs(sum(c for c, _ in inside) / len(inside) - sum(ok for _, ok in inside) / len(inside))
        total += len(inside) / rows * gap
    return round(total, 4)


def reliability(confidences: Sequence[float | None], correct: Sequence[bool],
                bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's points: per non-empty bin, mean confidence, accuracy and rows."""
    return [{"bin": [lo, hi], "confidence": round(sum(c for c, _ in inside) / len(inside), 4),
             "accuracy": round(sum(ok for _, ok in inside) / len(inside), 4), "rows": len(inside)}
            for lo, hi, inside in _binned(confidences, correct, bins)[1]]


# --- coverage against agreement ----------------------------------------------------------------

def coverage(confidences: Sequence[float | None], ratings: Sequence[int | None], expert: Sequence[int],
             *, seed: int, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """For each threshold: the records whose answer is valid with a confidence at or above it are
    accepted; their share of all records, and their accuracy and kappa against the experts (with
    bootstrap intervals). The rest would go to the experts."""
    n = len(expert)
    out = []
    for t in thresholds:
        idx = [i for i in range(n) if ratings[i] is not None and confidences[i] is not None and confidences[i] >= t]
        row: dict[str, Any] = {"threshold": t, "accepted": len(idx), "share": rounded(len(idx) / n) if n else None}
        if idx:
            y_true = encode([expert[i] for i in idx])
            y_pred = encode([ratings[i] for i in idx])
            acc, kap = bootstrap(y_true, y_pred, seed=seed)
            hits = sum(a == b for a, b in zip(y_true, y_pred))
            row.update(accuracy=rounded(hits / len(idx)), accuracy_ci95=ci95(acc), kappa=kappa(y_true, y_pred),
                       kappa_ci95=ci95(kap))
        out.append(row)
    return out

