"""Inbox daemon latency and throughput against the old one-cold-process-per-file way.

(1) 50 sequential 500-row model-set jobs through a running ``python -m daemon watch``: latency from
the dataset's rename into the inbox to its folder appearing in ``processed/`` (p50, p99). Each drop
has a job file (dropped with the mapping, before the dataset), so it is claimed as soon as it is
complete; (1b) 10 more drops of a dataset and mapping only (with the default ``watch.job_wait_s`` of 0
they are taken at once, too).
(2) The same 50 datasets, one cold ``python scripts/fine_tuner.py`` process each (p50, p99, ratio).
(3) A burst of N (default 1,000) drops renamed in at once: time to drain, jobs/s, nothing lost.
Targets: p50 <= 150 ms, >= 10x faster than a cold process, burst >= 20 jobs/s with nothing lost.

Usage: ``python bench/daemon_latency.py [--jobs 50] [--burst 1000] [--rows 500]``. Uses the
model-set path with Ollama registration off (no network) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.data.synthetic import MAPPING, write_csv  # noqa: E402

CONFIG = """\
defaults: {model: "no-such-model:1b", topics: "respiratory infections", approach: model_set}
ollama: {register: "off"}
watch: {pair_timeout_s: 5.0, settle_s: 0.5, rescan_s: 30.0, workers: 2}
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def wait(predicate, timeout: float, what: str, interval: float = 0.001):
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def make_sources(folder: Path, count: int, rows: int, seed0: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        path = folder / f"ds{seed0 + i:05d}.csv"
        write_csv(path, rows, seed0 + i)
        (folder / f"ds{seed0 + i:05d}.mapping.json").write_text(json.dumps(MAPPING))
        (folder / f"ds{seed0 + i:05d}.job.yaml").write_text("topics: respiratory infections\n")
        out.append(path)
    return out


def start_daemon(root: Path, config: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "watch", "--config", str(config), "--root", str(root)],
                            cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    # steady state: the first drop should not pay for the daemon's start-up imports
    wait(lambda: b"warm_up_done" in log.read_bytes(), 60, "warm_up_done", 0.01)
    return proc


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def processed_has(processed: Path, stem: str) -> bool:
    return any(name.startswith(stem + "-") for name in os.listdir(processed))


def bench_sequential(root: Path, sources: list[Path], *, job_file: bool = True) -> list[float]:
    inbox, processed = root / "inbox", root / "inbox" / "processed"
    latencies = []
    for src in sources:
        stem = src.stem
        os.rename(src.with_name(f"{stem}.mapping.json"), inbox / f"{stem}.mapping.json")
        if job_file:
            os.rename(src.with_name(f"{stem}.job.yaml"), inbox / f"{stem}.job.yaml")
        t0 = time.perf_counter()
        os.rename(src, inbox / src.name)
        wait(lambda stem=stem: processed_has(processed, stem), 60, f"{stem} processed")
        latencies.append(time.perf_counter() - t0)
    return latencies


def bench_cold(sources: list[Path], out: Path, config: Path) -> list[float]:
    env = {**os.environ, "FINE_TUNER_CONFIG": str(config)}
    times = []
    for src in sources:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "scripts" / "fine_tuner.py"), "--input", str(src),
                        "--mapping", str(src.with_name(f"{src.stem}.mapping.json")),
                        "--model", "no-such-model:1b", "--topics", "respiratory infections",
                        "--output-dir", str(out / src.stem)], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def bench_burst(root: Path, sources: list[Path]) -> tuple[float, int, int, int]:
    inbox, processed, failed = root / "inbox", root / "inbox" / "processed", root / "inbox" / "failed"
    t0 = time.perf_counter()
    for src in sources:
        os.rename(src.with_name(f"{src.stem}.mapping.json"), inbox / f"{src.stem}.mapping.json")
        os.rename(src.with_name(f"{src.stem}.job.yaml"), inbox / f"{src.stem}.job.yaml")
    for src in sources:
        os.rename(src, inbox / src.name)
    before_p, before_f = len(os.listdir(processed)), len(os.listdir(failed))
    target = len(sources)
    wait(lambda: len(os.listdir(processed)) - before_p + len(os.listdir(failed)) - before_f >= target,
         600, "burst drained", 0.01)
    drain = time.perf_counter() - t0
    done = {name.rsplit("-", 2)[0] for name in os.listdir(processed)}
    lost = sum(1 for src in sources if src.stem not in done)
    return drain, len(os.listdir(processed)) - before_p, len(os.listdir(failed)) - before_f, lost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        tmp_path = Path(tmp)
        root, config = tmp_path / "root", tmp_path / "config.yaml"
        (root / "inbox").mkdir(parents=True)
        config.write_text(CONFIG)
        seq = make_sources(root / "staging-seq", args.jobs, args.rows, 0)
        no_job = make_sources(root / "staging-nojob", 10, args.rows, 5_000)
        cold_sources = make_sources(tmp_path / "cold", args.jobs, args.rows, 0)
        burst = make_sources(root / "staging-burst", args.burst, args.rows, 10_000)

        proc = start_daemon(root, config, tmp_path / "daemon.log")
        try:
            latencies = bench_sequential(root, seq)
            waited = bench_sequential(root, no_job, job_file=False)
            drain, ok, failed, lost = bench_burst(root, burst) if args.burst else (0.0, 0, 0, 0)
        finally:
            stop_daemon(proc)
        cold = bench_cold(cold_sources, tmp_path / "cold-out", config)

    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    c50, c99 = percentile(cold, 50), percentile(cold, 99)
    ratio = c50 / p50
    rate = ok / drain if drain else 0.0
    print(f"(1) daemon, {args.jobs} sequential {args.rows}-row jobs: p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, mean {statistics.mean(latencies) * 1000:.0f} ms "
          f"[target p50 <= 150 ms: {'ok' if p50 <= 0.150 else 'MISSED'}]")
    print(f"(1b) daemon, 10 drops of dataset + mapping only (watch.job_wait_s default 0): "
          f"p50 {percentile(waited, 50) * 1000:.0f} ms")
    print(f"(2) cold process per file: p50 {c50 * 1000:.0f} ms, p99 {c99 * 1000:.0f} ms; "
          f"daemon is {ratio:.1f}x faster [target >= 10x: {'ok' if ratio >= 10 else 'MISSED'}]")
    if args.burst:
        print(f"(3) burst of {args.burst}: drained in {drain:.1f} s, {rate:.1f} jobs/s, {ok} processed, "
              f"{failed} failed, {lost} lost [target >= 20 jobs/s, none lost: "
              f"{'ok' if rate >= 20 and lost == 0 and failed == 0 else 'MISSED'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
