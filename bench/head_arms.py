"""Benchmark: which head on Gemma 3 270M's hidden states generalises, against the bag-of-words baseline.

For each seed: 400 generated visits of vocabulary "a" (``daemon.data.visits``), split as a job
splits them (``data.holdout``: familiar records and new kinds of records, the latter whole ICD-10
categories held out), and 200 visits of vocabulary "b" (another site: other codes, phrasings, units
and formats). The training rows' vectors and every held-out visit's come from the product's own
features child (``head.compute_features``, the dequantized GGUF, one pass per visit) at six layers
(a sixth of the depth to the last) and both poolings, for the prompts with the codes as written and
with the codes explained (``code_knowledge``). Measured on the three sets, per seed and as a mean:

- the bag-of-words baseline (codes as written, codes explained);
- every (layer, pooling) head, C by stratified cross-validation (what ``head.fit`` does per candidate);
- the product's head (``head.fit`` over its candidate layers: every candidate's probabilities averaged);
- the choice by grouped cross-validation (folds that hold out whole ICD-10 categories, as the new
  kinds are held out);
- probability averages: the means, the last tokens, and every candidate with the baseline.

Usage: ``python bench/head_arms.py [--seeds 11 23 37] [--rows 400] [--other-site 200] [--dtype auto]
[--states normed]``; about 8 minutes a seed on two cores in float32, about 3 in bfloat16 (a CPU with
AVX512-BF16 or AMX); not part of ``make test``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config.schema import Defaults  # noqa: E402
from daemon.data import holdout  # noqa: E402
from daemon.data.dataset import load_dataset  # noqa: E402
from daemon.data.visits import MAPPING, generate_visits, write_csv  # noqa: E402
from daemon.quality import baseline, head  # noqa: E402
from daemon.training.features import DTYPES, POOLINGS, STATES, candidate_layers  # noqa: E402
from head_quality import NAME, TOPIC, gemma_weights  # noqa: E402  (this folder: the same model and topic)

SETS = ("familiar", "new kinds", "another site")
FRACTIONS = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
LAYERS_TOTAL = 18  # Gemma 3 270M's decoder layers


def kappa(truth, predicted) -> float:
    """Cohen's kappa; where it is undefined (a fold of one rating, answered alike), the agreement."""
    import warnings

    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = cohen_kappa_score(truth, predicted)
    return float(sum(a == b for a, b in zip(truth, predicted)) / len(truth)) if math.isnan(value) else float(value)


def regression(x, y, groups=None):
    """Standardised, class-balanced logistic regression, C by 5-fold CV (grouped when ``groups``):
    (the model fitted on every row, its CV kappa)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = GroupKFold(5) if groups is not None else StratifiedKFold(5, shuffle=True, random_state=42)
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)),
                          {"logisticregression__C": list(head.C_GRID)}, scoring=make_scorer(kappa), cv=folds)
    search.fit(x, y, groups=groups)
    return search.best_estimator_, float(search.best_score_)


def one_seed(weights, seed: int, rows: int, other_site: int, work: Path,
             dtype: str = "auto", states: str = "normed") -> dict[str, dict[str, float]]:
    import numpy as np

    d = Defaults()
    own, other = work / f"a-{seed}.csv", work / f"b-{seed}.csv"
    write_csv(own, generate_visits(rows, seed=seed, vocabulary="a"))
    write_csv(other, generate_visits(other_site, seed=seed + 1, vocabulary="b"))
    results: dict[str, dict[str, float]] = {}
    for setting in ("off", "on"):
        ds = load_dataset(own, mapping=MAPPING, code_knowledge=setting)
        frame = ds.frame
        groups = frame["group"].to_numpy(dtype=object)
        split = holdout.split(frame["prompt"].to_numpy(dtype=object), frame["rating"].to_numpy(), groups,
                              fraction=d.validation_fraction, seed=d.seed, min_rows=d.min_rows)
        far = load_dataset(other, mapping=MAPPING, code_knowledge=setting).frame
        texts = [str(t) for t in frame["prompt"]] + [str(t) for t in far["prompt"]]
        y = np.concatenate([frame["rating"].to_numpy(), far["rating"].to_numpy()]).astype(int)
        far_pos = np.arange(len(frame), len(texts))
        where = {"familiar": split.familiar, "new kinds": split.new_kinds, "another site": far_pos}
        train = split.train

        classes = np.array(sorted(set(int(v) for v in y[train])))

        def score(name: str, p, y=y, where=where, classes=classes) -> None:
            """Each set's kappa of the ratings most likely under the probabilities ``p`` (one row a visit)."""
            results[name] = {s: kappa(y[pos], classes[p[pos].argmax(1)]) for s, pos in where.items()}

        bag = baseline.fit([texts[i] for i in train], list(y[train]))
        bag_p = np.array([[p[c] for c in sorted(p)] for p in bag.probabilities(texts)])
        score(f"baseline, codes {setting}", bag_p)

        started = time.monotonic()
        layers = sorted({max(1, round(f * LAYERS_TOTAL)) for f in FRACTIONS})
        info, arrays = head.compute_features(weights, texts, layers=layers, poolings=POOLINGS,
                                             question=head.question_text(TOPIC), dtype=dtype,
                                             states=states)
        print(f"seed {seed}, codes {setting}: {len(texts)} forward passes ({info['dtype']}) in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        probs = {}
        gcv = {}
        for key, x in sorted(arrays.items()):
            x = x.astype(np.float64)
            model, _ = regression(x[train], y[train])
            probs[key] = model.predict_proba(x)
            score(f"head L{key[0]} {key[1]}, codes {setting}", probs[key])
            _, gcv[key] = regression(x[train], y[train], groups=groups[train])
        fitted = head.fit({k: v[train] for k, v in arrays.items() if k[0] in candidate_layers(info["layers_total"])},
                          list(y[train]))
        product = head.Head(fitted.members, "", head.MAX_TOKENS, fitted.classes, len(train), fitted.cv,
                            {"model": NAME, "weights_sha256": "0" * 64, "layers_total": info["layers_total"],
                             "hidden_size": len(fitted.members[0].mean)})
        averaged = np.array([[p[c] for c in classes] for p in product.probabilities(arrays)])
        score(f"the product's head (every candidate averaged), codes {setting}", averaged)
        chosen = max(gcv, key=gcv.get)
        score(f"grouped-CV choice, codes {setting}", probs[chosen])
        print(f"  grouped CV chose L{chosen[0]} {chosen[1]} (its kappa {gcv[chosen]:.2f})", flush=True)
        for label, keys in (("the means", [k for k in probs if k[1] == "mean"]),
                            ("the last tokens", [k for k in probs if k[1] == "last"])):
            average = sum(probs[k] for k in keys) / len(keys)
            score(f"average of {label}, codes {setting}", average)
        both = (sum(probs.values()) / len(probs) + bag_p) / 2
        score(f"average of every candidate and the baseline, codes {setting}", both)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 23, 37])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--other-site", type=int, default=200)
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="the forward passes' dtype (default auto: what a job picks on this machine)")
    parser.add_argument("--states", default="normed", choices=STATES,
                        help="each layer's states through the final norm (the default, as a job) or raw")
    args = parser.parse_args()
    weights = gemma_weights()
    if weights is None:
        return 1
    work = Path(tempfile.mkdtemp(prefix="head-arms-"))
    try:
        per_seed = [one_seed(weights, seed, args.rows, args.other_site, work, args.dtype, args.states)
                for seed in args.seeds]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seeds = " / ".join(str(s) for s in args.seeds)
    print(f"\nCohen's kappa, seeds {seeds} (mean); {args.rows} visits of vocabulary a per seed, "
          f"{args.other_site} of another site")
    print("| arm | " + " | ".join(SETS) + " |\n|---|" + "---|" * len(SETS))
    bags = {s: sum(r["baseline, codes on"][s] for r in per_seed) / len(per_seed) for s in SETS}
    for arm in per_seed[0]:
        cells = []
        for s in SETS:
            values = [r[arm][s] for r in per_seed]
            cells.append(" / ".join(f"{v:.2f}" for v in values) + f" ({sum(values) / len(values):.2f})")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print("\nthe baseline with the codes explained, mean: " + ", ".join(f"{s} {bags[s]:.2f}" for s in SETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
