"""The agreement statistics every report shares (daemon/quality/agreement.py)."""

from __future__ import annotations

from daemon.quality.agreement import bootstrap


def test_bootstrap_cost_does_not_grow_with_the_number_of_labels():
    """80 rows rated on a 15,000-value scale are resampled in well under 1 MiB (an (L+1)² matrix per
    round would take 1.8 GB) and give the same numbers as the same rows on a small scale."""
    import tracemalloc

    import numpy  # noqa: F401 - imported before tracing, so only the bootstrap's own memory counts

    expert = [str(i % 40) for i in range(80)]
    answers = [str(i % 40) if i % 3 else str(14_999 - i) for i in range(80)]
    small = {str(v): str(k) for k, v in enumerate(sorted(set(expert + answers)))}
    bootstrap(expert[:4], answers[:4], seed=1, samples=2)
    tracemalloc.start()
    try:
        wide = bootstrap(expert, answers, seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert wide == bootstrap([small[v] for v in expert], [small[v] for v in answers], seed=3)
