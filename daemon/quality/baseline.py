"""The bag-of-words baseline: the classic classifier every evaluation measures beside the models.

A model is only worth its cost if it agrees with the experts better than what a data scientist
would try first: TF-IDF word 1–2-grams and character 3–5-grams (within words) with a class-balanced
logistic regression whose regularisation is chosen by cross-validation on the training rows. It
trains in seconds on exactly the job's training rows (the same prompt text the models see) and
rates thousands of records a second, its probabilities as the confidence. ``fit`` trains it;
``Baseline.to_json`` / ``Baseline.from_json`` store it as plain numbers and words (vocabularies,
idf weights, coefficients), never a pickle: a hostile output folder cannot make loading it run
code, and ``from_json`` checks every field's type and shape. Prediction needs only numpy and
scipy's sparse matrices; scikit-learn is imported inside ``fit`` and ``probabilities`` (the
daemon's import stays light).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..outputs import names

FILE = names.BASELINE
FORMAT = "fine-tuner-bag-of-words/1"
TITLE = "bag-of-words baseline"
KEY = "baseline"
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MAX_FOLDS = 5
# (name, CountVectorizer settings): the same settings at fitting and at rating
VECTORIZERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("word", {"analyzer": "word", "ngram_range": (1, 2), "lowercase": True, "min_df": 1}),
    ("char", {"analyzer": "char_wb", "ngram_range": (3, 5), "lowercase": True, "min_df": 1}),
)
MAX_FEATURES = 2_000_000  # a stored vocabulary larger than this is refused, not loaded
MAX_FILE_BYTES = 256 * 1024 * 1024


class BaselineError(ValueError):
    """A stored baseline that is not one fine-tuner wrote (which field, never its content)."""


@dataclass(frozen=True)
class Baseline:
    """A fitted bag-of-words classifier: per vectorizer its vocabulary (term -> column) and idf
    weights, then one logistic regression over the stacked columns."""

    classes: tuple[int, ...]
    vocabularies: tuple[dict[str, int], ...]
    idf: tuple[tuple[float, ...], ...]
    coef: tuple[tuple[float, ...], ...]
    intercept: tuple[float, ...]
    c: float
    train_rows: int

    def _features(self, texts: Sequence[str]):
        import numpy as np
        from scipy import sparse
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        blocks = []
        for (_, settings), vocabulary, idf in zip(VECTORIZERS, self.vocabularies, self.idf):
            counts = CountVectorizer(vocabulary=vocabulary, **settings).transform(list(texts)).astype(np.float64)
            blocks.append(normalize(counts @ sparse.diags(np.asarray(idf, dtype=np.float64))))
        return sparse.hstack(blocks).tocsr()

    def probabilities(self, texts: Sequence[str]) -> list[dict[int, float]]:
        """Per text, each rating's probability."""
        import numpy as np

        if not texts:
            return []
        scores = self._features(texts) @ np.asarray(self.coef, dtype=np.float64).T + np.asarray(self.intercept)
        return class_probabilities(scores, self.classes)

    def predict(self, texts: Sequence[str]) -> list[int]:
        return [most_likely(p) for p in self.probabilities(texts)]

    def to_json(self) -> dict:
        return {"format": FORMAT, "classes": list(self.classes), "c": self.c, "train_rows": self.train_rows,
                "vectorizers": [{"name": name, "vocabulary": vocab, "idf": list(idf)}
                                for (name, _), vocab, idf in zip(VECTORIZERS, self.vocabularies, self.idf)],
                "coef": [list(row) for row in self.coef], "intercept": list(self.intercept)}

    @classmethod
    def from_json(cls, data: Any) -> "Baseline":
        """The stored baseline, every field checked (``BaselineError`` names the first bad one)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BaselineError(f"{FILE} is not a fine-tuner bag-of-words baseline ({FORMAT})")
        classes = _ints(data.get("classes"), "classes")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise BaselineError(f"{FILE}: classes must be two or more distinct ratings")
        vecs = data.get("vectorizers")
        if not isinstance(vecs, list) or [v.get("name") if isinstance(v, dict) else None for v in vecs] \
                != [name for name, _ in VECTORIZERS]:
            raise BaselineError(f"{FILE}: vectorizers must be {[name for name, _ in VECTORIZERS]}")
        vocabularies, idfs, width = [], [], 0
        for v in vecs:
            vocab, idf = v.get("vocabulary"), finite_numbers(v.get("idf"), f"{v['name']}.idf")
            if not isinstance(vocab, dict) or len(vocab) != len(idf) or len(vocab) > MAX_FEATURES \
                    or sorted(vocab.values()) != list(range(len(vocab))) \
                    or not all(isinstance(k, str) and type(i) is int for k, i in vocab.items()):
                raise BaselineError(f"{FILE}: {v['name']}.vocabulary must map each term to its own column")
            vocabularies.append(vocab)
            idfs.append(idf)
            width += len(vocab)
        coef_rows, intercept, c, train_rows = stored_regression(data, classes, width)
        return cls(tuple(classes), tuple(vocabularies), tuple(idfs), coef_rows, intercept, c, train_rows)


def most_likely(probs: dict[int, float]) -> int:
    """The rating with the highest probability (the lower rating on a tie)."""
    return max(probs, key=lambda c: (probs[c], -c))


def _ints(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise BaselineError(f"{FILE}: {field} must be a list of integers")
    return value


def finite_numbers(value: Any, field: str, length: int | None = None, *, file: str = FILE,
                   error: type[ValueError] = BaselineError) -> tuple[float, ...]:
    """A stored list of finite numbers (``length`` of them when given), else ``error`` naming the
    file and the field (the stored classifiers, ``baseline.json`` and ``head.json``, share it)."""
    if not isinstance(value, list) or (length is not None and len(value) != length) or not all(
            type(v) in (int, float) and math.isfinite(v) for v in value):
        raise error(f"{file}: {field} must be a list of {length or 'some'} finite numbers")
    return tuple(float(v) for v in value)


def stored_regression(data: dict, classes: Sequence[int], width: int, *, file: str = FILE,
                      error: type[ValueError] = BaselineError) -> tuple[tuple[tuple[float, ...], ...],
                                                                        tuple[float, ...], float, int]:
    """A stored logistic regression's (coef rows, intercept, c, train_rows), checked: one row of
    ``width`` coefficients per class (one for two classes, as scikit-learn keeps a binary model),
    finite numbers, a positive C; else ``error`` naming the file and the field."""
    rows = 1 if len(classes) == 2 else len(classes)
    coef = data.get("coef")
    if not isinstance(coef, list) or len(coef) != rows:
        raise error(f"{file}: coef must have {rows} rows")
    coef_rows = tuple(finite_numbers(row, "coef", width, file=file, error=error) for row in coef)
    intercept = finite_numbers(data.get("intercept"), "intercept", rows, file=file, error=error)
    c, train_rows = data.get("c"), data.get("train_rows")
    if type(c) not in (int, float) or not math.isfinite(c) or c <= 0 or type(train_rows) is not int:
        raise error(f"{file}: c must be a positive number and train_rows an integer")
    return coef_rows, intercept, float(c), train_rows


def class_probabilities(scores: Any, classes: Sequence[int]) -> list[dict[int, float]]:
    """A logistic regression's scores (one row per record) as each class's probability: a sigmoid
    for scikit-learn's binary model (one column), else a softmax."""
    import numpy as np

    if len(classes) == 2:
        positive = 1.0 / (1.0 + np.exp(-np.clip(scores[:, 0], -700, 700)))
        probs = np.stack([1.0 - positive, positive], axis=1)
    else:
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    return [{c: float(p) for c, p in zip(classes, row)} for row in probs]


def folds(ratings: Sequence[int]) -> int:
    """Cross-validation folds for these ratings: five, or as many as the rarest rating has rows."""
    from collections import Counter

    return min(MAX_FOLDS, min(Counter(ratings).values()))


def fit(texts: Sequence[str], ratings: Sequence[int], *, seed: int = 42) -> Baseline:
    """Train on the job's training rows: C by stratified cross-validation (Cohen's kappa) when
    every rating has at least two rows, else C = 1."""
    import numpy as np
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score, make_scorer
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    if len(texts) != len(ratings) or len(set(ratings)) < 2:
        raise ValueError("a baseline needs training rows of at least two different ratings")
    from threadpoolctl import threadpool_limits

    vectorizers = [TfidfVectorizer(dtype=np.float64, **settings) for _, settings in VECTORIZERS]
    x = sparse.hstack([v.fit_transform(list(texts)) for v in vectorizers]).tocsr()
    y = np.asarray(ratings)
    model = LogisticRegression(class_weight="balanced", max_iter=5000)
    n_folds = folds(ratings)
    # one BLAS thread: each fit is a fraction of a second, and threads competing for the cores of a
    # busy machine made the same search 50 times slower (0.09 s against 5.4 s a fit, measured)
    with threadpool_limits(1):
        if n_folds >= 2:
            search = GridSearchCV(model, {"C": list(C_GRID)}, scoring=make_scorer(cohen_kappa_score),
                                  cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed))
            model = search.fit(x, y).best_estimator_
        else:
            model.set_params(C=1.0).fit(x, y)
    return Baseline(classes=tuple(int(c) for c in model.classes_),
                    vocabularies=tuple({str(k): int(i) for k, i in v.vocabulary_.items()} for v in vectorizers),
                    idf=tuple(tuple(float(w) for w in v.idf_) for v in vectorizers),
                    coef=tuple(tuple(float(w) for w in row) for row in model.coef_),
                    intercept=tuple(float(b) for b in model.intercept_), c=float(model.C),
                    train_rows=len(texts))


__all__ = ["Baseline", "BaselineError", "FILE", "KEY", "TITLE", "class_probabilities", "finite_numbers", "fit", "folds",
           "stored_regression"]
