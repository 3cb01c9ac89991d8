"""Benchmark: dataset load + validate + prepare + write training data, against the seed's way.

Usage: ``python bench/prep_throughput.py ROWS [--workdir DIR] [--json]``

Generates a formatted CSV of ROWS synthetic rows (``daemon.data.synthetic.write_csv``) and its rating
mapping, then runs, each in its own child process so that each peak RSS is its own:

(a) project: ``load_dataset`` + ``split_holdout`` + ``training_data.jsonl`` and
    ``validation_data.jsonl`` written through ``jsonl_chunks`` and ``fsutil.write_lines``
    (durable, as the product writes them: fsync included);
(b) baseline, what the seed did: ``pd.read_csv``, ``df.iterrows()``, one dict per row, then
    ``json.dumps`` per line written to a file (no fsync).

Prints rows/s for each, the ratio (b)/(a) of the wall times, the CSV size, and each child's peak RSS
(``VmHWM``), also above the child's RSS right after its imports, as a ratio to the CSV size.
Targets at 200,000 rows: >= 20x faster than the baseline, peak RSS <= 2x the CSV size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = "respiratory infections"


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` memory line in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_project(csv_path: Path, mapping_path: Path, out_dir: Path) -> int:
    from daemon import fsutil
    from daemon.data import prompts, trainingdata
    from daemon.data.dataset import load_dataset

    start = time.perf_counter()
    ds = load_dataset(csv_path, mapping_path)
    loaded = time.perf_counter()
    system = prompts.system_prompt(TOPICS, ds.mapping.labels)
    train, validation = trainingdata.split_holdout(ds)
    fsutil.write_lines(out_dir / "training_data.jsonl", trainingdata.jsonl_chunks(ds, train, system))
    fsutil.write_lines(out_dir / "validation_data.jsonl", trainingdata.jsonl_chunks(ds, validation, system))
    end = time.perf_counter()
    _report(start, ds.rows_used, stages={"load_s": loaded - start, "split_and_write_s": end - loaded},
            output_bytes=sum((out_dir / n).stat().st_size for n in ("training_data.jsonl", "validation_data.jsonl")))
    return 0


def run_baseline(csv_path: Path, mapping_path: Path, out_dir: Path) -> int:
    import pandas as pd

    from daemon.data import prompts

    start = time.perf_counter()
    mapping = json.loads(mapping_path.read_text())
    system = prompts.system_prompt(TOPICS, mapping)
    df = pd.read_csv(csv_path)
    records = []
    for _, row in df.iterrows():
        prompt = row["formatted_prompt"] if "formatted_prompt" in row else row["Prompt"]
        rationale = row.get("Rationale of Rating", "")
        if pd.isna(rationale):
            rationale = ""
        answer = json.dumps({"rating": int(row["Standardized_Rating"]), "rationale": rationale})
        records.append({"messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer}]})
    with open(out_dir / "baseline.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    _report(start, len(records), output_bytes=(out_dir / "baseline.jsonl").stat().st_size)
    return 0


_IMPORTED_RSS_KIB = 0


def _report(start: float, rows: int, **extra) -> None:
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_kib": _status_kib("VmHWM"),
                      "post_import_rss_kib": _IMPORTED_RSS_KIB, **extra}))


def child(kind: str, csv_path: Path, mapping_path: Path, out_dir: Path) -> int:
    global _IMPORTED_RSS_KIB
    sys.path.insert(0, str(ROOT))
    # Import everything either side needs before measuring, so "above post-import" is the work alone.
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import yaml  # noqa: F401

    from daemon import fsutil  # noqa: F401
    from daemon.data import dataset, prompts, trainingdata  # noqa: F401
    _IMPORTED_RSS_KIB = _status_kib("VmRSS")
    return (run_project if kind == "project" else run_baseline)(csv_path, mapping_path, out_dir)


def _spawn(kind: str, csv_path: Path, mapping_path: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(csv_path), str(mapping_path),
                           str(out_dir)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{kind} run failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, nargs="?", default=200_000)
    parser.add_argument("--workdir", type=Path, help="keep the files here instead of a temporary folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "CSV", "MAPPING", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, csv_path, mapping_path, out_dir = args.child
        return child(kind, Path(csv_path), Path(mapping_path), Path(out_dir))

    sys.path.insert(0, str(ROOT))
    from daemon.data.synthetic import MAPPING, write_csv

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        csv_path = work / "bench.csv"
        mapping_path = work / "bench.mapping.json"
        write_csv(csv_path, args.rows)
        mapping_path.write_text(json.dumps(MAPPING))
        csv_bytes = csv_path.stat().st_size
        project = _spawn("project", csv_path, mapping_path, work / "project")
        baseline = _spawn("baseline", csv_path, mapping_path, work / "baseline")

    result = {"rows": args.rows, "csv_bytes": csv_bytes, "speedup": baseline["seconds"] / project["seconds"]}
    for name, run in (("project", project), ("baseline", baseline)):
        peak = run["peak_rss_kib"] * 1024
        above = (run["peak_rss_kib"] - run["post_import_rss_kib"]) * 1024
        result[name] = {"seconds": round(run["seconds"], 3), "rows_per_s": round(run["rows"] / run["seconds"]),
                        "peak_rss_bytes": peak, "peak_rss_over_csv": round(peak / csv_bytes, 2),
                        "rss_above_imports_bytes": above, "rss_above_imports_over_csv": round(above / csv_bytes, 2),
                        "output_bytes": run.get("output_bytes"),
                        "stages": {k: round(v, 3) for k, v in run.get("stages", {}).items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mb = 1024 * 1024
    print(f"rows: {args.rows:,}   CSV: {csv_bytes / mb:.1f} MiB   cpus: {os.cpu_count()}")
    for name in ("project", "baseline"):
        r = result[name]
        print(f"{name:9s} {r['seconds']:8.3f} s {r['rows_per_s']:>10,} rows/s   peak RSS "
              f"{r['peak_rss_bytes'] / mb:7.1f} MiB ({r['peak_rss_over_csv']:.2f}x CSV)   above imports "
              f"{r['rss_above_imports_bytes'] / mb:7.1f} MiB ({r['rss_above_imports_over_csv']:.2f}x CSV)")
    stages = ", ".join(f"{k} {v:.3f}" for k, v in result["project"]["stages"].items())
    print(f"project stages: {stages}; JSONL written: {result['project']['output_bytes'] / mb:.1f} MiB "
          f"(baseline {result['baseline']['output_bytes'] / mb:.1f} MiB)")
    print(f"speed-up baseline/project: {result['speedup']:.1f}x (target >= 20x); "
          f"project peak RSS {result['project']['peak_rss_over_csv']:.2f}x CSV (target <= 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
