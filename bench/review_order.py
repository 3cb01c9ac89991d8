"""Benchmark: what the order of needs_review.csv buys: the same agreement on new kinds of records with
fewer expert ratings.

The cheapest model of a job, the bag-of-words baseline (``quality.baseline``), is fitted on a small
rated seed set of generated visits (``data.visits``: vocabulary "a" and a few of "b"), then rates a
pool of unrated visits (half "a", half "b"). N pool visits get their expert rating and join the
training rows, chosen two ways from the same pool: (a) the first N of the product's review order
(``review.review_order`` on the baseline's own confidence, the visits grouped by the ICD-10-CM
block of their diagnosis as ``review.Kinds`` groups an input: exactly the ranking a rating run
writes) and (b) N at random; (c) the least confident first without spreading over the kinds shows
what the round-robin adds. Cohen's kappa is measured on visits of vocabulary "b" that are not in
the pool (new kinds of records), for several N and several seeds, all in one run. Prints the kappa
per N (mean of the seeds), and the smallest N at which the review order reaches the kappa that
random choice reaches at the largest N, as a ratio of that N. Target: the same kappa with at most
half the expert ratings (ratio <= 0.5).

Usage: ``python bench/review_order.py [--n 25 50 100 150 200] [--seeds 3 7 11]``. A minute or two on
2 cores; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.data.dataset import load_dataset  # noqa: E402
from daemon.data.holdout import normalized  # noqa: E402
from daemon.data.visits import DIAGNOSIS_COLUMN, HEADER, MAPPING, generate_visits, write_csv  # noqa: E402
from daemon.quality import baseline  # noqa: E402
from daemon.quality.confidence import confidence  # noqa: E402
from daemon.quality.review import Candidate, Kinds, review_order  # noqa: E402

TARGET_RATIO = 0.5
WAYS = ("random", "review order", "confidence only")


def visits(rows: list[dict], folder: Path, name: str) -> tuple[list[str], list[int], list[str]]:
    """(prompts as a job builds them, ratings, diagnosis cells) of the rows the loader keeps."""
    frame = load_dataset(write_csv(folder / f"{name}.csv", rows), mapping=MAPPING).frame
    dx = [rows[int(r) - 1][DIAGNOSIS_COLUMN] for r in frame["source_row"]]
    return frame["prompt"].tolist(), frame["rating"].astype(int).tolist(), dx


def kappa(model: baseline.Baseline, texts: list[str], truth: list[int]) -> float:
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(truth, model.predict(texts)))


def choices(model: baseline.Baseline, pool: list[str], dx: list[str], seed: int) -> dict[str, list[int]]:
    """Pool positions in the order each way picks them."""
    probs = model.probabilities(pool)
    sure = [confidence(p, baseline.most_likely(p)) for p in probs]
    kinds = Kinds(HEADER, None)
    kinds.count(dx)
    kinds.finish()
    ranked = review_order([Candidate(i, False, s, kinds.key(kinds.raw(c))) for i, (s, c) in
                           enumerate(zip(sure, dx))], kinds.label())
    plain = review_order([Candidate(i, False, s) for i, s in enumerate(sure)])
    shuffled = list(range(len(pool)))
    random.Random(seed).shuffle(shuffled)
    return {"random": shuffled, "review order": [p.row for p in ranked], "confidence only": [p.row for p in plain]}


def run_seed(seed: int, args, folder: Path) -> dict[str, dict[int, float]]:
    seed_texts, seed_ratings, _ = visits(generate_visits(args.seed_rows, seed=seed, vocabulary="a") +
                                         generate_visits(args.seed_b, seed=seed + 100, vocabulary="b"),
                                         folder, f"seed-{seed}")
    pool_texts, pool_ratings, pool_dx = visits(generate_visits(args.pool // 2, seed=seed + 200, vocabulary="a") +
                                               generate_visits(args.pool - args.pool // 2, seed=seed + 300,
                                                               vocabulary="b"), folder, f"pool-{seed}")
    seen = {normalized(t) for t in seed_texts + pool_texts}
    test_texts, test_ratings, _ = visits(generate_visits(args.new_kinds * 2, seed=seed + 400, vocabulary="b"),
                                         folder, f"test-{seed}")
    kept = [i for i, t in enumerate(test_texts) if normalized(t) not in seen][:args.new_kinds]
    test_texts, test_ratings = [test_texts[i] for i in kept], [test_ratings[i] for i in kept]
    first = baseline.fit(seed_texts, seed_ratings, seed=seed)
    picked = choices(first, pool_texts, pool_dx, seed)
    out: dict[str, dict[int, float]] = {way: {0: kappa(first, test_texts, test_ratings)} for way in WAYS}
    for way in WAYS:
        for n in args.n:
            rows = picked[way][:n]
            model = baseline.fit(seed_texts + [pool_texts[i] for i in rows],
                                 seed_ratings + [pool_ratings[i] for i in rows], seed=seed)
            out[way][n] = kappa(model, test_texts, test_ratings)
    b_share = {way: sum(1 for i in picked[way][:max(args.n)] if i >= args.pool // 2) / max(args.n) for way in WAYS}
    print(f"seed {seed}: {len(seed_texts)} seed rows, {len(pool_texts)} in the pool, {len(test_texts)} new-kinds "
          "test rows; share of vocabulary b among the first "
          f"{max(args.n)} picked: " + ", ".join(f"{w} {s:.0%}" for w, s in b_share.items()), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-rows", type=int, default=80, help="rated seed visits of vocabulary a")
    parser.add_argument("--seed-b", type=int, default=6, help="rated seed visits of vocabulary b")
    parser.add_argument("--pool", type=int, default=400, help="unrated visits, half a, half b")
    parser.add_argument("--new-kinds", type=int, default=200, help="test visits of vocabulary b, not in the pool")
    parser.add_argument("--n", type=int, nargs="+", default=[25, 50, 100, 150, 200], help="expert ratings added")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 7, 11])
    args = parser.parse_args()
    args.n = sorted(args.n)
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        for seed in args.seeds:
            results.append(run_seed(seed, args, Path(tmp)))
    mean = {way: {n: sum(r[way][n] for r in results) / len(results) for n in [0, *args.n]} for way in WAYS}
    print("\nkappa on new kinds of records (mean of seeds " + " ".join(map(str, args.seeds)) + ")")
    print("| expert ratings added | " + " | ".join(WAYS) + " |")
    print("|---|" + "---|" * len(WAYS))
    for n in [0, *args.n]:
        print(f"| {n} | " + " | ".join(f"{mean[w][n]:.3f}" for w in WAYS) + " |")
    largest = args.n[-1]
    goal = mean["random"][largest]
    for way in WAYS[1:]:
        reached = next((n for n in args.n if mean[way][n] >= goal), None)
        if reached is None:
            print(f"{way}: never reaches random's kappa {goal:.3f} at N={largest} (at N={largest}: "
                  f"{mean[way][largest]:.3f})")
            continue
        ratio = reached / largest
        met = "met" if ratio <= TARGET_RATIO else "not met"
        print(f"{way}: kappa {mean[way][reached]:.3f} at N={reached} >= random's {goal:.3f} at N={largest}: "
              f"ratio {ratio:.2f} of the expert ratings (target <= {TARGET_RATIO}: {met})")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
