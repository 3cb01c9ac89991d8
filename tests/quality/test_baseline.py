"""The bag-of-words baseline: it learns, it is stored as plain numbers and loads back identically, and a
hostile stored file is refused."""

from __future__ import annotations

import json

import pytest
from sklearn.metrics import cohen_kappa_score

from daemon.data.visits import generate_visits
from daemon.quality import baseline

SKIP = ("C_BioSense_ID", "Expert Rating", "Standardized_Rating", "Rationale_of_Rating")


def _text(row: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in row.items() if k not in SKIP)


@pytest.fixture(scope="module")
def fitted():
    train = generate_visits(240, seed=11)
    return baseline.fit([_text(r) for r in train], [int(r["Standardized_Rating"]) for r in train])


def test_the_baseline_learns_the_experts_ratings_on_visits_it_never_saw(fitted):
    """Trained on 240 generated visits, it agrees with the experts on 100 others far beyond chance."""
    held = generate_visits(100, seed=12)
    predicted = fitted.predict([_text(r) for r in held])
    assert cohen_kappa_score([int(r["Standardized_Rating"]) for r in held], predicted) > 0.8
    assert fitted.classes == (-1, 0, 1) and fitted.train_rows == 240 and fitted.c in baseline.C_GRID


def test_a_stored_baseline_loads_back_with_the_same_probabilities(fitted):
    """to_json -> JSON text -> from_json gives the same probabilities for every record, summing to one."""
    texts = [_text(r) for r in generate_visits(20, seed=13, vocabulary="b")]
    loaded = baseline.Baseline.from_json(json.loads(json.dumps(fitted.to_json())))
    before, after = fitted.probabilities(texts), loaded.probabilities(texts)
    assert [sorted(p) for p in after] == [[-1, 0, 1]] * 20
    assert all(abs(sum(p.values()) - 1) < 1e-9 for p in after)
    assert all(abs(a[c] - b[c]) < 1e-12 for a, b in zip(before, after) for c in a)


def test_the_stored_probabilities_are_scikit_learns_own(fitted):
    """The stored form rates exactly as the fitted scikit-learn pipeline it came from would."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = generate_visits(240, seed=11)
    texts, y = [_text(r) for r in train], [int(r["Standardized_Rating"]) for r in train]
    vecs = [TfidfVectorizer(**settings) for _, settings in baseline.VECTORIZERS]
    model = LogisticRegression(C=fitted.c, class_weight="balanced", max_iter=5000)
    model.fit(sparse.hstack([v.fit_transform(texts) for v in vecs]).tocsr(), y)
    new = [_text(r) for r in generate_visits(10, seed=14, vocabulary="b")]
    expected = model.predict_proba(sparse.hstack([v.transform(new) for v in vecs]).tocsr())
    got = fitted.probabilities(new)
    assert all(abs(got[i][c] - expected[i][j]) < 1e-6 for i in range(10) for j, c in enumerate(model.classes_))


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(format="pickle"), "bag-of-words baseline"),
    (lambda d: d.update(classes=["1", "2"]), "classes"),
    (lambda d: d["vectorizers"][0]["vocabulary"].update({"zzz-new-term": 10 ** 9}), "word.vocabulary"),
    (lambda d: d["coef"][0].append(1.0), "coef"),
    (lambda d: d["coef"][1].__setitem__(0, "1"), "coef"),
    (lambda d: d.update(intercept=[float("nan")] * 3), "intercept"),
    (lambda d: d.update(c=-1), "c must be"),
])
def test_a_hostile_stored_baseline_is_refused_naming_the_field(fitted, change, field):
    """Each wrong type, shape or value is refused with the field's name."""
    data = json.loads(json.dumps(fitted.to_json()))
    change(data)
    with pytest.raises(baseline.BaselineError, match=field):
        baseline.Baseline.from_json(data)
