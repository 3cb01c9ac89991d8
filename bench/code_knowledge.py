"""Benchmark: what ICD-10-CM code knowledge does for the bag-of-words baseline on generated visits.

Generates rated emergency-department visits (``daemon.data.visits``: vocabulary "a", 5 % second-reviewer
noise), loads them through the product's own loader with ``code_knowledge`` on and off (the built-in
template, so the prompts are exactly a job's), fits the bag-of-words baseline (``quality.baseline``,
what every job fits) on 80 % of them, and scores Cohen's kappa on the other 20 % (familiar records)
and on visits of vocabulary "b" (diagnoses and wording never seen in training: new kinds of records).
Twice: with the diagnosis as written by the generator ("J06.9 Acute upper respiratory infection") and
as bare codes (";J06.9;", as many exports carry it). Prints each kappa, the ratio with/without the
expansion, and what the expansion costs at load time (the first load imports the code sets).

Usage: ``python bench/code_knowledge.py [--rows 400] [--new-kinds 200] [--seeds 3 7 11 19]``. About a
minute on a 2-core machine; not part of ``make test``.
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

from daemon.data.codes import find_codes  # noqa: E402
from daemon.data.dataset import load_dataset  # noqa: E402
from daemon.data.visits import DIAGNOSIS_COLUMN, MAPPING, generate_visits, write_csv  # noqa: E402
from daemon.quality import baseline  # noqa: E402


def bare_codes(rows: list[dict]) -> list[dict]:
    """The rows with each diagnosis cell reduced to its codes, ";J06.9;I10;" (an empty cell stays empty)."""
    out = []
    for row in rows:
        codes = find_codes(row[DIAGNOSIS_COLUMN])
        out.append({**row, DIAGNOSIS_COLUMN: f";{';'.join(codes)};" if codes else ""})
    return out


def prompts(rows: list[dict], folder: Path, name: str, setting: str) -> tuple[list[str], list[int], float]:
    path = write_csv(folder / f"{name}.csv", rows)
    started = time.perf_counter()
    frame = load_dataset(path, mapping=MAPPING, code_knowledge=setting).frame
    return frame["prompt"].tolist(), frame["rating"].astype(int).tolist(), time.perf_counter() - started


def kappa(model: baseline.Baseline, texts: list[str], truth: list[int]) -> float:
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(truth, model.predict(texts)))


def measure(train_rows: list[dict], new_rows: list[dict], seed: int, folder: Path, setting: str) -> dict:
    texts, ratings, load_s = prompts(train_rows, folder, f"train-{seed}-{setting}", setting)
    new_texts, new_ratings, _ = prompts(new_rows, folder, f"new-{seed}-{setting}", setting)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * 0.8)
    train, familiar = order[:cut], order[cut:]
    model = baseline.fit([texts[i] for i in train], [ratings[i] for i in train], seed=seed)
    return {"familiar": kappa(model, [texts[i] for i in familiar], [ratings[i] for i in familiar]),
            "new_kinds": kappa(model, new_texts, new_ratings), "load_s": load_s,
            "prompt_chars": sum(len(t) for t in texts) / len(texts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--new-kinds", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 7, 11, 19])
    args = parser.parse_args()
    print("| diagnosis cells | seed | familiar: off -> on | new kinds: off -> on | ratio (new kinds) | "
          "prompt chars: off -> on |")
    print("|---|---|---|---|---|---|")
    totals: dict[str, list[float]] = {}
    load = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in args.seeds:
            train = generate_visits(args.rows, seed=seed, vocabulary="a", noise=0.05)
            new = generate_visits(args.new_kinds, seed=seed + 1000, vocabulary="b", noise=0.05)
            for kind, (tr, nw) in (("codes with text", (train, new)),
                                   ("bare codes", (bare_codes(train), bare_codes(new)))):
                off = measure(tr, nw, seed, folder, "off")
                on = measure(tr, nw, seed, folder, "on")
                load.setdefault("off", off["load_s"])
                load.setdefault("on (first, imports the code sets)", on["load_s"])
                load["on (later)"] = on["load_s"]
                for key, value in (("off", off["new_kinds"]), ("on", on["new_kinds"])):
                    totals.setdefault(f"{kind} {key}", []).append(value)
                ratio = on["new_kinds"] / off["new_kinds"] if off["new_kinds"] else float("nan")
                print(f"| {kind} | {seed} | {off['familiar']:.2f} -> {on['familiar']:.2f} | "
                      f"{off['new_kinds']:.2f} -> {on['new_kinds']:.2f} | {ratio:.2f} | "
                      f"{off['prompt_chars']:.0f} -> {on['prompt_chars']:.0f} |")
    for kind in ("codes with text", "bare codes"):
        off, on = (sum(totals[f"{kind} {k}"]) / len(totals[f"{kind} {k}"]) for k in ("off", "on"))
        print(f"{kind}: new kinds kappa {off:.2f} -> {on:.2f} (ratio {on / off:.2f}), mean of seeds {args.seeds}")
    print("load of the training file (s): " + ", ".join(f"{k} {v:.2f}" for k, v in load.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
