"""Benchmark: rating a file (``daemon.quality.rating.rate_file``) through Ollama, each number against its
own baseline in the same run.

A loopback server stands in for Ollama and answers every ``/api/chat`` after a fixed delay (the
model's time); ``/api/version`` and ``/api/show`` answer at once, so the backend choice runs as in
production. Each run is a child process, so that its peak RSS (``VmHWM``) is its own.

(a) Throughput: ``ollama.parallel: 4`` vs 1 on the same records. Target: >= 3x.
(b) Memory: peak RSS rating 10x the records vs the small run, both at parallel 4. Target: <= 1.5x
    (the records are rated in chunks; only one chunk's conversations and answers are held).
(c) ``--memory [ROWS ...]`` (default 10,000 and 1,000,000): peak RSS of rating each size, then the
    ratio of the largest to the smallest. Target: <= 1.5x (the input is streamed: checked and
    counted in one pass that keeps no rows, then read again a chunk at a time). A million records
    through the loopback HTTP server take about an hour on 2 cores (about 250 records/s with no
    delay at all), so this section answers in-process with zero latency: the child replaces the
    backend (``rating._choose`` / ``rating._rater``) with a function that returns a fixed valid
    answer for every conversation; everything else (the checks, the row count, the chunked reads,
    building the conversations, parsing the answers, writing and fsyncing the part file) runs as
    in production.

Usage: ``python bench/rate_throughput.py [--records 10000] [--small 1000] [--delay-ms 10]`` or
``python bench/rate_throughput.py --memory [10000 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THROUGHPUT_TARGET = 3.0
RSS_TARGET = 1.5
ANSWER = json.dumps({"rating": 1, "rationale": "scripted"})


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client thread, as with Ollama
    # headers and body go out as two writes: without TCP_NODELAY (Go's default, so Ollama's) Nagle's
    # algorithm and the client's delayed ACK add 40 ms to every answer
    disable_nagle_algorithm = True
    delay_s = 0.01

    def _send(self, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send({"version": "0.12.3"})

    def do_POST(self) -> None:  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.path == "/api/chat":
            time.sleep(self.delay_s)
            self._send({"model": request.get("model"), "message": {"role": "assistant", "content": ANSWER},
                        "done": True, "done_reason": "stop"})
        else:  # /api/show
            self._send({"details": {"family": "llama"}, "capabilities": ["completion"]})

    def log_message(self, *args) -> None:
        pass


def _answer_in_process() -> None:
    """The zero-latency backend of section (c): every conversation gets ``ANSWER`` at once."""
    from daemon.quality import rating
    from daemon.quality.rater import Answer

    def answer(conversations, *, on_progress=None, stop_event=None):
        answers = [Answer(ANSWER, 0.0) for _ in conversations]
        if on_progress is not None:
            on_progress(len(answers), len(answers))
        return answers

    rating._choose = lambda model, backend, config, memory: ("ollama", None)
    rating._rater = lambda model, backend, weights, config, schema, memory: (answer, "in-process")


def child(spec_path: str) -> int:
    """One run in its own process: rate the file, print records/s and this process's peak RSS."""
    from daemon.config import load_config
    from daemon.quality.rating import model_from_name, rate_file
    from daemon.data.synthetic import MAPPING

    spec = json.loads(Path(spec_path).read_text())
    config = load_config(None, {}, overrides={"ollama": {"host": spec["host"], "parallel": spec["parallel"],
                                                         "retries": 0}})
    if spec.get("in_process"):
        _answer_in_process()
    model = model_from_name("llama3.2:1b", system="Rate the visit.", labels=MAPPING)
    summary = rate_file(model, spec["input"], spec["output"], config, backend="ollama")
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print(json.dumps({"records_per_s": summary["records_per_s"], "rated": summary["rated"],
                      "seconds": summary["durations_s"]["rating"], "peak_rss_mib": round(hwm / 1024, 1)}))
    return 0


def run(host: str, work: Path, csv_path: Path, parallel: int, tag: str, *, in_process: bool = False) -> dict:
    spec = work / f"{tag}.json"
    spec.write_text(json.dumps({"host": host, "parallel": parallel, "input": str(csv_path),
                                "output": str(work / f"{tag}-ratings.csv"), "in_process": in_process}))
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {tag} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    ap.add_argument("--memory", nargs="*", type=int, metavar="ROWS",
                    help="only section (c): peak RSS of rating each number of rows (default 10000 1000000)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.memory is not None:
        return memory(sorted(args.memory or [10_000, 1_000_000]))

    from daemon.data.synthetic import write_csv

    _Slow.delay_s = args.delay_ms / 1000
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            big, small = work / "big.csv", work / "small.csv"
            write_csv(big, args.records, seed=3)
            write_csv(small, args.small, seed=3)
            small4 = run(host, work, small, 4, "small-p4")
            big4 = run(host, work, big, 4, "big-p4")
            big1 = run(host, work, big, 1, "big-p1")
    finally:
        server.shutdown()
        server.server_close()
    speedup = big4["records_per_s"] / big1["records_per_s"]
    rss = big4["peak_rss_mib"] / small4["peak_rss_mib"]
    print(f"(a) {args.records} records at {args.delay_ms:g} ms per answer: parallel 1 "
          f"{big1['records_per_s']:.1f} records/s ({big1['seconds']:.1f} s), parallel 4 "
          f"{big4['records_per_s']:.1f} records/s ({big4['seconds']:.1f} s) -> {speedup:.2f}x "
          f"(target >= {THROUGHPUT_TARGET:.0f}x)")
    print(f"(b) peak RSS: {args.small} records {small4['peak_rss_mib']:.1f} MiB, {args.records} records "
          f"{big4['peak_rss_mib']:.1f} MiB -> {rss:.2f}x (target <= {RSS_TARGET}x)")
    ok = speedup >= THROUGHPUT_TARGET and rss <= RSS_TARGET
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


def memory(sizes: list[int]) -> int:
    """Section (c): one child per size, answered in-process with zero latency (see the docstring)."""
    from daemon.data.synthetic import write_csv

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rows in sizes:
            csv_path = work / f"rows-{rows}.csv"
            write_csv(csv_path, rows, seed=3)
            size_mib = csv_path.stat().st_size / 2**20
            started = time.monotonic()
            results[rows] = run("http://127.0.0.1:9", work, csv_path, 1, f"mem-{rows}", in_process=True)
            wall = time.monotonic() - started
            if results[rows]["rated"] != rows:
                raise SystemExit(f"the {rows}-row run rated {results[rows]['rated']} records")
            print(f"(c) {rows} rows ({size_mib:.1f} MiB CSV): peak RSS {results[rows]['peak_rss_mib']:.1f} MiB, "
                  f"{results[rows]['records_per_s']:.0f} records/s, child {wall:.1f} s", flush=True)
            csv_path.unlink()
            (work / f"mem-{rows}-ratings.csv").unlink()
    small, big = results[sizes[0]], results[sizes[-1]]
    ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
    print(f"(c) peak RSS: {sizes[-1]} rows {big['peak_rss_mib']:.1f} MiB vs {sizes[0]} rows "
          f"{small['peak_rss_mib']:.1f} MiB -> {ratio:.2f}x (target <= {RSS_TARGET}x)")
    print("target met" if ratio <= RSS_TARGET else "target NOT met")
    return 0 if ratio <= RSS_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
