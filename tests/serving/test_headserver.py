"""A head's vectors through llama-server: the base GGUF cut after a layer holds that layer's first blocks
in the head's dtype; llama-server serving the cuts for embeddings gives the vectors the features child
gives (the tiny Llama, and Gemma 3 270M in the dtype a job picks here); a head job rates through it as
its evaluation did; what cannot be served is refused, saying why."""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.data.visits import generate_visits
from daemon.fine_tuner import FineTuner
from daemon.quality import head
from daemon.quality.backends import HeadRater
from daemon.quality.ratefile import model_from_folder, rate_file
from daemon.serving.headserver import HeadServerError, HeadServers, cut_gguf, cut_path
from daemon.training.features import POOLINGS
from daemon.training.supervisor import resolve_base_weights
from tests.conftest import leftovers, llama_server_children
from tests.tiny_model import TINY_NAME

# together (the job fixture is built once), beside tests/quality/test_head.py's group, not behind it
pytestmark = pytest.mark.xdist_group("headserver")

TOPIC = "respiratory infections"
SKIP = ("C_BioSense_ID", "Expert Rating", "Standardized_Rating", "Rationale_of_Rating")
# how close the served vectors must be to the child's (the least cosine of a record's two vectors,
# the largest difference against the largest value): float32 passes differ in the order of additions
# only; bfloat16 passes round every product's inputs, and torch keeps the residual stream in
# bfloat16 where llama.cpp keeps it in float32 (Gemma 3 270M measured: cosine 0.9998 at the least)
CLOSE = {"float32": (0.99999, 1e-3), "bfloat16": (0.999, 5e-2)}


def _text(row: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in row.items() if k not in SKIP)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def weights(tiny_gguf):
    return resolve_base_weights(TINY_NAME, {TINY_NAME: str(tiny_gguf)})


def _fit(weights, model: str, rows: int, dtype: str = "auto"):
    train = generate_visits(rows, seed=11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        fitted, _ = head.fit_head(weights, model, [_text(r) for r in train],
                                  [int(r["Standardized_Rating"]) for r in train], topics=TOPIC, dtype=dtype)
    return fitted


@pytest.fixture(scope="module")
def fitted(weights):
    """A head fitted in float32 on 80 generated visits through the tiny GGUF's weights."""
    return _fit(weights, TINY_NAME, 80, "float32")


def _assert_the_same_vectors(local: dict, served: dict, dtype: str) -> None:
    min_cos, max_rel = CLOSE[dtype]
    assert sorted(local) == sorted(served)
    for kind in local:
        a, b = local[kind].astype(np.float64), served[kind].astype(np.float64)
        assert a.shape == b.shape and a.shape[0] > 0
        cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= min_cos, (kind, cos.min())
        assert np.abs(a - b).max() <= max_rel * np.abs(a).max(), (kind, np.abs(a - b).max() / np.abs(a).max())


def test_a_cut_holds_the_first_layers_with_their_matrices_in_the_dtype_asked_for(tiny_gguf, tmp_path):
    """The cut after layer 1 of 2: block count 1, every tensor but layer 2's, in the source's order;
    layer 1's matrices in bfloat16 (the source's values rounded), its norms and every other tensor
    as stored, every other key as stored. It is made once (a second call leaves it as it is); a
    layer past the last is refused and leaves nothing behind."""
    import gguf

    source = gguf.GGUFReader(tiny_gguf)
    arch = source.fields["general.architecture"].contents()
    path = cut_gguf(tiny_gguf, tmp_path / "cuts" / "L1.gguf", 1, "bfloat16")
    cut = gguf.GGUFReader(path)
    assert cut.fields[f"{arch}.block_count"].contents() == 1
    assert {k: f.contents() for k, f in cut.fields.items() if not k.startswith("GGUF.") and "block_count" not in k} \
        == {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.") and "block_count" not in k}
    assert [t.name for t in cut.tensors] == [t.name for t in source.tensors if not t.name.startswith("blk.1.")]
    by_name = {t.name: t for t in source.tensors}
    for tensor in cut.tensors:
        stored = by_name[tensor.name]
        matrix = tensor.name.startswith("blk.0.") and len(tensor.shape) > 1
        assert tensor.tensor_type.name == ("BF16" if matrix else stored.tensor_type.name), tensor.name
        if matrix:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            expected = gguf.quants.dequantize(stored.data, stored.tensor_type)
            assert values.shape == expected.shape
            assert np.abs(values - expected).max() <= 2 ** -7 * np.abs(expected).max()
        else:
            assert np.array_equal(np.asarray(tensor.data), np.asarray(stored.data)), tensor.name
    made = path.stat().st_mtime_ns
    assert cut_gguf(tiny_gguf, path, 1, "bfloat16") == path and path.stat().st_mtime_ns == made
    with pytest.raises(ValueError, match="has 2 layers; a cut after layer 3 cannot be made"):
        cut_gguf(tiny_gguf, tmp_path / "cuts" / "L3.gguf", 3, "float32")
    assert sorted(p.name for p in (tmp_path / "cuts").iterdir() if not p.name.startswith(".") or "tmp" in p.name) \
        == ["L1.gguf"]


def test_llama_server_gives_the_vectors_the_features_child_gives(weights, fitted, tmp_path):
    """Every member's vectors of 12 visits the head never saw, from llama-server on the cuts (made in
    the cache the environment names, once: head_servers_started says how many were made) and from
    the features child, agree to float rounding; so do the head's probabilities, and its ratings
    are the same."""
    texts = [_text(r) for r in generate_visits(12, seed=5)]
    local = head.head_vectors(weights, fitted, texts)
    env = {**os.environ, "FINE_TUNER_CACHE_DIR": str(tmp_path / "cache")}
    done = []
    with capture_logs() as logs:
        for _ in range(2):  # the second time, the cuts are there already
            with HeadServers(weights.gguf_path, weights.gguf_sha256, fitted, log_dir=tmp_path / "logs",
                             env=env) as servers:
                served = servers.vectors(texts, on_progress=lambda n, total: done.append((n, total)))
    assert done[-1] == (12, 12)
    started = [e for e in logs if e["event"] == "head_servers_started"]
    assert [(e["layers"], e["dtype"], e["cuts_made"]) for e in started] == [
        (fitted.layers, "float32", len(fitted.layers)), (fitted.layers, "float32", 0)]
    assert started[1]["cut_s"] == 0 and all(e["load_s"] >= 0 for e in started)
    assert sorted(p.name for p in (tmp_path / "cache" / "cuts" / weights.gguf_sha256[:24]).iterdir()
                  if p.suffix == ".gguf") == [f"L{layer}-float32.gguf" for layer in fitted.layers]
    assert cut_path(weights.gguf_sha256, fitted.layers[0], "float32", env).is_file()
    _assert_the_same_vectors(local, served, "float32")
    ours, theirs = fitted.probabilities(local), fitted.probabilities(served)
    assert max(abs(a[c] - b[c]) for a, b in zip(ours, theirs) for c in a) <= 1e-3
    assert [max(p, key=p.get) for p in ours] == [max(p, key=p.get) for p in theirs]


def test_a_rating_stopped_part_way_stops_the_heads_servers(weights, fitted):
    """The service shutting down while a head rates through llama-server: the rating stops as
    interrupted after the record in hand, and none of its servers is left running."""
    import threading

    from daemon.errors import TrainingInterruptedError

    stop = threading.Event()
    convs = [[{"role": "user", "content": _text(r)}] for r in generate_visits(6, seed=7)]
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            stop.set()

    with pytest.raises(TrainingInterruptedError, match="shutting down"):
        HeadRater(weights, fitted, via=HeadRater.SERVED).answer(convs, on_progress=progress, stop_event=stop)
    assert seen == [1, 2] and llama_server_children() == []


def test_a_cut_that_would_fill_the_disk_is_not_started(weights, fitted, tmp_path, monkeypatch):
    """With less free space than a cut needs (and a margin), no cut is written and the servers are
    not started: the error says how much is needed and what to do."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    env = {**os.environ, "FINE_TUNER_CACHE_DIR": str(tmp_path / "cache")}
    with pytest.raises(HeadServerError, match=r"cannot cut tiny.gguf after layer 1: the cut needs 0\.0 GB and .* "
                                              r"has 0\.0 GB free") as err:
        HeadServers(weights.gguf_path, weights.gguf_sha256, fitted, log_dir=tmp_path, env=env).start()
    assert "free disk space" in err.value.hint
    assert [p.name for p in (tmp_path / "cache" / "cuts" / weights.gguf_sha256[:24]).iterdir()
            if p.suffix == ".gguf"] == []
    assert llama_server_children() == []


class _Hostile(BaseHTTPRequestHandler):
    """A server answering /tokenize with a redirect, /embeddings with an endless list, /other with a
    body that is not JSON."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/tokenize":
            self.send_response(307)
            self.send_header("Location", "http://192.0.2.1/tokenize")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        try:
            if self.path == "/embeddings":
                self.wfile.write(b'[{"embedding": [[')
                while True:
                    self.wfile.write(b"0.0, " * 8192)
            self.wfile.write(b"<html>not json</html>")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *_args) -> None:
        pass


def test_a_hostile_server_costs_one_clear_error_not_a_redirect_or_the_memory(fitted, tmp_path):
    """Every request to a head's servers is bounded as every client's here (serving.http): a redirect
    is refused, not followed; an endless answer stops at its cap (a few MB for 40 tokens' states);
    a body that is not JSON is named so. No value of the answer is quoted."""
    hostile = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=hostile.serve_forever, daemon=True)
    thread.start()
    server = types.SimpleNamespace(url=f"http://127.0.0.1:{hostile.server_address[1]}", log_path=tmp_path / "x.log")
    servers = HeadServers(tmp_path / "any.gguf", "0" * 64, fitted, log_dir=tmp_path)
    try:
        with pytest.raises(HeadServerError, match="llama-server answered /tokenize with HTTP 307"):
            servers._tokens(server, "a visit")
        with pytest.raises(HeadServerError, match=r"answer to /embeddings is larger than [\d,]+ bytes"):
            servers._states(server, list(range(40)), 64)
        with pytest.raises(HeadServerError, match="answer to /other is not JSON"):
            servers._post(server, "/other", {}, 1024)
    finally:
        servers.close()
        hostile.shutdown()
        hostile.server_close()
        thread.join(5)


def test_a_head_of_raw_states_or_on_a_broken_gguf_is_refused_saying_why(fitted, tmp_path):
    """A head fitted on raw hidden states (before they were normed) cannot be served: llama-server
    gives normed ones; a base GGUF cut off after its version is named with where it ends."""
    raw = dataclasses.replace(fitted, base={**fitted.base, "states": "raw"})
    assert raw.states == "raw"
    with pytest.raises(HeadServerError, match="reads the raw hidden states"):
        HeadServers(tmp_path / "any.gguf", "0" * 64, raw, log_dir=tmp_path)
    (tmp_path / "cut-off.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(HeadServerError, match=r"the GGUF cut-off.gguf ends before its header does.*\(at byte 8\)"):
        HeadServers(tmp_path / "cut-off.gguf", "0" * 64, fitted, log_dir=tmp_path).start()
    assert llama_server_children() == []


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_gguf):
    """A head job on the tiny GGUF base (approach head), Ollama down."""
    out = tmp_path_factory.mktemp("served-head-job")
    cfg = {"base_models": {TINY_NAME: str(tiny_gguf)},
           "ollama": {"register": "auto", "host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
           "evaluation": {"enabled": "required", "backend": "auto"}, "paths": {"root": str(out)}}
    df = pd.DataFrame(list(synthetic_rows(160, 5)), columns=HEADER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        ok, meta = FineTuner(config=cfg).process_dataset(df, TINY_NAME, MAPPING, TOPIC, approach="head",
                                                         output_dir=out / "job")
    assert ok is True
    return {"folder": out / "job", "meta": meta, "cfg": cfg, "df": df}


def test_rate_through_llama_server_gives_a_head_jobs_evaluation_ratings(job, tmp_path):
    """rate --backend llama-server with a head job's folder: each held-out record gets the rating its
    (local) evaluation gave it, with a confidence, the model named as served; no server and no
    server log is left behind."""
    from daemon.config import load_config

    folder, df = job["folder"], job["df"]
    rows = job["meta"]["split"]["validation_source_rows"]
    src = tmp_path / "new.csv"
    df.iloc[[r - 1 for r in rows]].drop(columns=["Expert Rating", "Standardized_Rating"]).to_csv(src, index=False)
    model = model_from_folder(folder)
    assert model.head.states == "normed"
    cfg = load_config(None, {}, overrides=job["cfg"])
    summary = rate_file(model, src, tmp_path / "ratings.csv", cfg, backend="llama-server")
    assert (summary["backend"], summary["rated"], summary["invalid"]) == (HeadRater.SERVED, len(rows), 0)
    with open(tmp_path / "ratings.csv", newline="") as fh:
        rated = list(csv.DictReader(fh))
    with open(folder / "predictions.csv", newline="") as fh:
        evaluated = {int(r["row"]): r["new_rating"] for r in csv.DictReader(fh)}
    assert [r["rating"] for r in rated] == [evaluated[r] for r in rows]
    assert all(r["confidence"] for r in rated) and rated[0]["model"].endswith("+ head (llama-server)")
    assert leftovers(tmp_path) == []


def test_an_evaluation_through_llama_server_measures_a_head_as_the_local_one_did(job):
    """evaluate with backend llama-server: the head's kappa and ratings equal the job's own (local)
    evaluation's; the baseline is measured beside it as always."""
    import json

    from daemon.config import load_config
    from daemon.quality.heldout import evaluate_folder

    folder = job["folder"]
    local = json.loads((folder / "evaluation.json").read_text())
    cfg = load_config(None, {}, overrides=job["cfg"])
    report = evaluate_folder(folder, job["meta"], cfg, backend="llama-server")
    assert [m["key"] for m in report["models"]] == [m["key"] for m in local["models"]] == ["new", "baseline"]
    assert report["models"][0]["kappa"] == local["models"][0]["kappa"]
    assert report["models"][0]["n"] == local["models"][0]["n"] > 0


def test_gemma_through_llama_server_gives_the_vectors_and_ratings_of_the_features_child(gemma_gguf, tmp_path):
    """On Gemma 3 270M (Q4_K_M), a head fitted in the dtype a job picks on this machine: llama-server on
    the six cuts gives each member's vectors of 6 new visits and 3 odd texts as the features child
    does (to float rounding), and the same rating of every one. One run of the child computes the
    training rows' vectors and the new texts' (a text's vectors depend on that text alone)."""
    gemma = resolve_base_weights("gemma3:270m", {"gemma3:270m": str(gemma_gguf)})
    train = generate_visits(32, seed=11)
    # and texts a tokenizer may split otherwise: the server tokenizes, the child used the GGUF's tokenizer
    texts = [_text(r) for r in generate_visits(6, seed=5)] + [
        "  fièvre 38,5°C – toux 😷\r\nDx:\tJ06.9;R05.9;  ", "<b>cough</b> &amp; <start_of_turn>user", "咳嗽\u00a0x"]
    question = head.question_text(TOPIC)
    info, arrays = head.compute_features(gemma, [_text(r) for r in train] + texts, layers="candidates",
                                         poolings=POOLINGS, question=question)
    rows = len(train)
    fit = head.fit({kind: a[:rows] for kind, a in arrays.items()}, [int(r["Standardized_Rating"]) for r in train])
    fitted = head.Head(fit.members, question, head.MAX_TOKENS, fit.classes, rows, fit.cv,
                       {"model": "gemma3:270m", "weights_sha256": head.weights_sha256(gemma),
                        **{k: info[k] for k in ("layers_total", "hidden_size", "dtype", "states")}})
    assert fitted.states == "normed" and len(fitted.layers) == 6 and fitted.dtype == info["dtype"]
    local = {kind: a[rows:] for kind, a in arrays.items()}
    with HeadServers(gemma.gguf_path, gemma.gguf_sha256, fitted, log_dir=tmp_path) as servers:
        served = servers.vectors(texts)
    _assert_the_same_vectors(local, served, fitted.dtype)
    ours, theirs = fitted.probabilities(local), fitted.probabilities(served)
    assert [max(p, key=p.get) for p in ours] == [max(p, key=p.get) for p in theirs]
