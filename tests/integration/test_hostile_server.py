"""A hostile model server seen from a real daemon: answers that never end, answers of a gigabyte and
answers of the wrong shape end each job with its documented outcome, the daemon's memory stays
bounded and it keeps serving."""

from __future__ import annotations

import json
import re
import signal

from daemon.data.synthetic import MAPPING
from tests.conftest import leftovers, wait_for
from tests.integration.conftest import MARKER, all_log_text
from tests.integration.test_daemon_rating import raw_export

MiB = 1 << 20
RSS_HEADROOM_BYTES = 250 * MiB  # what hostile answers may add to the daemon's peak memory, at most
CAP = 8 * MiB  # the default ollama.max_response_bytes


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _error(folder) -> dict:
    return json.loads((folder / "error.json").read_text())


def test_endless_and_huge_chat_answers_fail_the_rating_job_with_bounded_memory(root, start_daemon, fake_ollama):
    """Rating jobs whose chat answers are 1 GiB (announced, or not), endless, or endless at a pace
    under the cap each fail with a RatingError naming the cap (or the deadline); the daemon's peak
    RSS stays under its peak after a normal job + 250 MB, and a normal rating job succeeds after them."""
    root.write_config(defaults={"model": "llama3.2:1b"}, evaluation={"enabled": "off"},
                      ollama={"host": fake_ollama.url, "register": "off", "connect_timeout_s": 0.5,
                              "read_timeout_s": 1.0, "retries": 0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    root.drop_bytes("raw.mapping.json", json.dumps(MAPPING).encode())
    root.drop_bytes("raw.csv", raw_export(40, seed=3))
    [built] = wait_for(lambda: root.job_folders(root.processed, "raw"), timeout=60, message="model set built")
    idle_peak = _peak_rss_bytes(d.proc.pid)
    fake_ollama.huge_bytes = 1 << 30
    over_cap = (f"Ollama's answer to POST /api/chat is larger than ollama.max_response_bytes ({CAP}); "
                "reading stopped there")
    cases = [
        ("huge", 0.0, rf"Ollama's answer to POST /api/chat announces 10737\d{{5}} bytes, more than "
                      rf"ollama.max_response_bytes \({CAP}\); it was not read"),
        ("huge_unannounced", 0.0, re.escape(over_cap)),
        ("endless", 0.0, re.escape(over_cap)),
        ("endless", 0.01, re.escape(f"Ollama at {fake_ollama.url} timed out (POST /api/chat)")),  # ~1.6 MB/s
    ]
    peaks = []
    for i, (mode, pause_s, expected) in enumerate(cases):
        fake_ollama.hostile["/api/chat"] = mode
        fake_ollama.endless_chunk_bytes, fake_ollama.endless_pause_s = 16 * 1024, pause_s
        stem = f"hostile{i}"
        root.drop_bytes(f"{stem}.job.yaml", f"task: rate\nmodel: outputs/{built.name}\n".encode())
        root.drop_bytes(f"{stem}.csv", raw_export(6, seed=20 + i, ratings=False))
        [failed] = wait_for(lambda stem=stem: (peaks.append(_peak_rss_bytes(d.proc.pid))
                                               or root.job_folders(root.failed, stem)),
                            timeout=60, message=f"{stem} failed")
        error = _error(failed)
        assert (mode, error["error_type"]) == (mode, "RatingError")
        assert re.fullmatch(f"Ollama could not answer for llama3.2:1b: {expected}; the 0 records rated so far "
                            f"are kept in ratings.csv.part", error["message"]), (mode, error["message"])
    fake_ollama.hostile.clear()
    root.drop_bytes("calm.job.yaml", f"task: rate\nmodel: outputs/{built.name}\n".encode())
    root.drop_bytes("calm.csv", raw_export(6, seed=30, ratings=False))
    wait_for(lambda: root.job_folders(root.processed, "calm"), timeout=60, message="a normal rating job")
    peaks.append(_peak_rss_bytes(d.proc.pid))
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert max(peaks) < idle_peak + RSS_HEADROOM_BYTES, (idle_peak, max(peaks))
    assert [x["status"] for x in d.events("job_finished")] == ["succeeded"] + ["failed"] * 4 + ["succeeded"]
    assert MARKER not in all_log_text(root)
    assert leftovers(root.path) == []


def test_wrong_shaped_model_list_leaves_the_model_set_published_and_not_registered(root, start_daemon,
                                                                                   fake_ollama):
    """/api/tags answering models as a string, or as a list of non-objects, while registering with
    register auto: each job succeeds, its model set is published, and the registration is recorded
    as not registered with an OllamaError naming the call and the key."""
    root.write_config(defaults={"model": "llama3.2:1b"},
                      ollama={"host": fake_ollama.url, "register": "auto", "retries": 0})
    d = start_daemon()
    d.wait_event("daemon_ready")
    cases = [({"models": "llama3.2:1b"}, "'models' is a string, not a list or null"),
             ({"models": ["llama3.2:1b", 7]}, "models[0] is a string, not an object")]
    for i, (body, problem) in enumerate(cases):
        fake_ollama.hostile["/api/tags"] = "body"
        fake_ollama.hostile_bodies["/api/tags"] = json.dumps(body).encode()
        stem = f"shape{i}"
        root.drop_dataset(stem, seed=40 + i)
        [done] = wait_for(lambda stem=stem: root.job_folders(root.processed, stem), timeout=60,
                          message=f"{stem} done")
        out = root.outputs / done.name
        assert sorted(p.name for p in out.iterdir() if p.name in ("Modelfile", "model_set_config.json")) == [
            "Modelfile", "model_set_config.json"]
        registration = json.loads((out / "fine_tuning_metadata.json").read_text())["registration"]
        assert (registration["registered"], registration["error"]["error_type"], registration["error"]["status"]) == (
            False, "OllamaError", 200)
        assert registration["error"]["message"] == f"Ollama answered GET /api/tags with unexpected JSON ({problem})"
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert [x["status"] for x in d.events("job_finished")] == ["succeeded", "succeeded"]
    assert len(d.events("model_not_registered")) == 2
    assert MARKER not in all_log_text(root)
