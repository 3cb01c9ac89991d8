"""Agreement with the experts, the statistics every report shares: ratings as scikit-learn classes
(an invalid answer is its own class, ``invalid``), Cohen's kappa, seeded bootstrap resamples and
their 95 % intervals, and the rounding every reported number gets. The evaluation report
(``evalreport``) and the coverage table (``confidence``) both count with these, so this module
imports nothing of theirs. numpy and scikit-learn are imported inside the functions (the daemon's
import stays light), scikit-learn under ``IMPORT_LOCK``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

INVALID = "invalid"
BOOTSTRAP_SAMPLES = 1000
# The daemon's workers may evaluate two jobs at once: the first import of scikit-learn or
# matplotlib (C extensions with circular imports) from two threads together can fail with a
# "partially initialized module" error, so they are imported one thread at a time. pyplot is
# not thread-safe either: figures are drawn under the same lock.
IMPORT_LOCK = threading.RLock()


def rounded(value: float | None) -> float | None:
    """A reported number: 4 decimals; None for none or NaN."""
    if value is None or math.isnan(value):
        return None
    return round(float(value), 4)


def ci95(values: list[float]) -> list[float] | None:
    """The 95 % interval (2.5th and 97.5th percentiles) of bootstrap values, NaN left out; None
    when none is finite."""
    import numpy as np

    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def encode(ratings: Sequence[int | None]) -> list[str]:
    """Ratings as class names for scikit-learn: the rating's text, or ``invalid``."""
    return [INVALID if r is None else str(int(r)) for r in ratings]


def kappa(y_true: list[str], y_pred: list[str]) -> float | None:
    """Cohen's kappa (scikit-learn's, unweighted) over the classes present; None when only one is."""
    with IMPORT_LOCK:
        from sklearn.metrics import cohen_kappa_score
    if len(set(y_true + y_pred)) < 2:
        return None
    return rounded(cohen_kappa_score(y_true, y_pred))


def bootstrap(y_true: Sequence[Any], y_pred: Sequence[Any], *, seed: int,
              samples: int = BOOTSTRAP_SAMPLES) -> tuple[list[float], list[float]]:
    """Accuracy and Cohen's kappa of ``samples`` seeded resamples of the rows (NaN for a kappa
    whose resample holds one class only). Each round counts over the classes present in the rows
    (at most two per row), never over the mapping's whole scale, so its cost is O(rows) whatever
    the number of labels. The kappa is scikit-learn's unweighted one, from the same counts:
    1 - (rows - hits) / (rows - sum(true count x predicted count per class) / rows)."""
    import numpy as np

    n = len(y_true)
    if n == 0:
        return [], []
    _, codes = np.unique(np.array([str(v) for v in (*y_true, *y_pred)]), return_inverse=True)
    codes = codes.reshape(-1)  # one class index per answer: the expert's n, then the model's n
    true_idx, pred_idx = codes[:n], codes[n:]
    classes = int(codes.max()) + 1
    correct = true_idx == pred_idx
    rng = np.random.default_rng(seed)
    accuracies, kappas = [], []
    for _ in range(samples):
        idx = rng.integers(0, n, n)  # one draw per round, as before: the same seed gives the same rows
        hits = int(np.count_nonzero(correct[idx]))
        true_counts = np.bincount(true_idx[idx], minlength=classes)
        pred_counts = np.bincount(pred_idx[idx], minlength=classes)
        accuracies.append(hits / n)
        if np.count_nonzero(true_counts + pred_counts) < 2:
            kappas.append(float("nan"))
            continue
        chance = float(np.dot(true_counts, pred_counts)) / n
        kappas.append(1.0 - (n - hits) / (n - chance))
    return accuracies, kappas
