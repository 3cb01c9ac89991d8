"""Benchmark: rating throughput of the two rater backends, each against its own baseline, same run.

(a) Local backend (``daemon.quality.generate`` child on the tiny Llama of the test suite): batched greedy
    generation (batch 8) vs one record at a time; records/s of the generation itself (the child's
    start-up, identical for both, is reported separately). Target: >= 3x.
(b) Ollama backend against a loopback server that answers every ``/api/chat`` after a fixed delay:
    ``ollama.parallel: 4`` vs 1. Target: >= 3x.

Usage: ``python bench/eval_throughput.py [--rows 48] [--delay-ms 50] [--requests 80]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import OllamaConfig  # noqa: E402
from daemon.data.prompts import system_prompt  # noqa: E402
from daemon.quality.backends import LocalRater, OllamaRater  # noqa: E402
from daemon.data.synthetic import MAPPING, synthetic_rows  # noqa: E402

TARGET = 3.0


def conversations(rows: int) -> list[list[dict]]:
    system = {"role": "system", "content": system_prompt("respiratory infections", MAPPING)}
    return [[system, {"role": "user", "content": r[1]}] for r in synthetic_rows(rows, seed=3)]


def local(rows: int) -> tuple[float, float]:
    from daemon.training.tinymodel import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        convs = conversations(rows)
        rates = {}
        for batch in (1, 8, 1, 8):  # alternate, keep the best of two each
            rater = LocalRater(model, batch_size=batch, max_new_tokens=48)
            answers = rater.answer(convs)
            gen_s = sum(a.latency_s for a in answers)  # per-record share of each batch's time
            rates[batch] = max(rates.get(batch, 0.0), rows / gen_s)
    print(f"(a) local backend, {rows} records: one at a time {rates[1]:.1f} records/s, "
          f"batch 8 {rates[8]:.1f} records/s -> {rates[8] / rates[1]:.2f}x (target >= {TARGET:.0f}x)")
    return rates[1], rates[8]


class _Slow(BaseHTTPRequestHandler):
    delay_s = 0.05

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        json.loads(body)
        time.sleep(self.delay_s)
        data = json.dumps({"model": "m", "message": {"role": "assistant", "content": '{"rating": 1, "rationale": ""}'},
                           "done": True, "done_reason": "stop"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def ollama(requests: int, delay_ms: float) -> tuple[float, float]:
    _Slow.delay_s = delay_ms / 1000
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = dataclasses.replace(OllamaConfig(), host=f"http://127.0.0.1:{server.server_address[1]}")
        convs = conversations(requests)
        rates = {}
        for parallel in (1, 4, 1, 4):
            started = time.monotonic()
            OllamaRater(cfg, parallel=parallel).answer("m", convs)
            rates[parallel] = max(rates.get(parallel, 0.0), requests / (time.monotonic() - started))
    finally:
        server.shutdown()
        server.server_close()
    print(f"(b) ollama backend, {requests} requests at {delay_ms:g} ms each: parallel 1 "
          f"{rates[1]:.1f} records/s, parallel 4 {rates[4]:.1f} records/s -> {rates[4] / rates[1]:.2f}x "
          f"(target >= {TARGET:.0f}x)")
    return rates[1], rates[4]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--delay-ms", type=float, default=50.0)
    args = ap.parse_args()
    one, batched = local(args.rows)
    serial, parallel = ollama(args.requests, args.delay_ms)
    ok = batched / one >= TARGET and parallel / serial >= TARGET
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
