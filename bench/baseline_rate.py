"""Benchmark: rating with the bag-of-words baseline (``rate --backend baseline``) against the fastest
any served model can be, in the same run.

A model-set job is built from 400 generated visits (Ollama unreachable, so no registration and no
evaluation; the job still fits its ``baseline.json``), then the same file of new visits is rated
twice by ``ratefile.rate_file``: (a) with the folder's baseline, (b) through a loopback stand-in for
Ollama that answers every chat at once (``ollama.parallel`` 4), which is only the client's own
cost: a real model adds its time to every record on top. Prints records/s of both and the ratio.
Target: the baseline rates >= 1,000 records/s on 2 cores.

Usage: ``python bench/baseline_rate.py [--records 5000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_RECORDS_S = 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    args = parser.parse_args()

    import json

    from bench.rate_throughput import _Slow
    from daemon.config import load_config
    from daemon.data.jobsettings import job_settings
    from daemon.data.visits import MAPPING, generate_visits, write_csv
    from daemon.fine_tuner import FineTuner, JobInputs
    from daemon.quality import ratefile

    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        work = Path(tmp)
        overrides = {"ollama": {"host": "http://127.0.0.1:9", "retries": 0, "register": "off", "parallel": 4},
                     "evaluation": {"enabled": "off"}, "paths": {"root": str(work)}}
        train = work / "visits.csv"
        write_csv(train, generate_visits(400, seed=1))
        (work / "visits.mapping.json").write_text(json.dumps(MAPPING))
        started = time.monotonic()
        tuner = FineTuner(config=overrides)
        settings = job_settings(tuner.config.defaults, {"model": "llama3.2:1b", "topics": "respiratory infections",
                                                        "approach": "model_set"}, source="bench")
        ok, meta = tuner.execute(tuner.plan_job(JobInputs(
            csv_path=train, mapping_path=work / "visits.mapping.json", settings=settings, output_dir=work / "out",
            stem="visits", staged=True)))
        assert ok and meta["baseline"]["fitted"], meta.get("baseline")
        print(f"job with its baseline built in {time.monotonic() - started:.1f} s "
              f"(baseline fitted in {meta['baseline']['fit_s']:.2f} s on {meta['baseline']['train_rows']} rows)")
        new = work / "new.csv"
        write_csv(new, generate_visits(args.records, seed=2, vocabulary="b"))
        model = ratefile.model_from_folder(work / "out")

        def timed(backend: str, cfg, tag: str) -> float:
            began = time.monotonic()
            summary = ratefile.rate_file(model, new, work / f"{tag}.csv", cfg, backend=backend)
            seconds = time.monotonic() - began
            assert summary["rated"] == args.records, summary
            return args.records / seconds

        baseline_rate = timed("baseline", load_config(None, {}, overrides=overrides), "baseline")
        _Slow.delay_s = 0.0
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            served = {**overrides, "ollama": {**overrides["ollama"], "host": f"http://127.0.0.1:{server.server_port}"}}
            server_rate = timed("ollama", load_config(None, {}, overrides=served), "ollama")
        finally:
            server.shutdown()
    print(f"(a) baseline: {baseline_rate:,.0f} records/s ({args.records} records)")
    print(f"(b) a model server answering at once (client cost only): {server_rate:,.0f} records/s")
    print(f"ratio (a)/(b): {baseline_rate / server_rate:.1f}x; target (a) >= {TARGET_RECORDS_S:,.0f} records/s: "
          f"{'met' if baseline_rate >= TARGET_RECORDS_S else 'NOT met'}")
    return 0 if baseline_rate >= TARGET_RECORDS_S else 1


if __name__ == "__main__":
    sys.exit(main())
