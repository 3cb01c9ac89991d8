"""llama.cpp's own server (built by make from the pinned source) serving the real Gemma 3 270M GGUF:
`fine-tuner serve` starts it, `rate --backend openai` rates through it, SIGTERM stops both."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from daemon.data.visits import MAPPING, generate_visits, write_csv
from daemon.llamacpp import server_binary

pytestmark = pytest.mark.xdist_group("real-model")

ROOT = Path(__file__).resolve().parents[2]
NAME = "gemma3:270m"
TOPIC = "respiratory infections"


def _cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.timeout(900)
def test_serve_runs_llama_server_on_gemma_and_rate_through_it_answers_in_the_schema(tmp_path, gemma_gguf):
    """A Gemma 3 270M model set (no training) served by `fine-tuner serve` (llama-server, Gemma's turn
    format, two slots, one thread) rates 10 new visits through `rate --backend openai`: every answer a JSON
    object of the schema with a rating of the mapping (the server holds the answer to the schema)
    and a confidence from the server's log-probabilities. SIGTERM ends `serve` with status 0 and
    the server with it."""
    assert server_binary() is not None, "llama-server is not built: `make llama-cpp` (make test builds it)"
    visits = generate_visits(70, seed=3)
    write_csv(tmp_path / "train.csv", visits[:60])
    write_csv(tmp_path / "new.csv", visits[60:])
    (tmp_path / "mapping.json").write_text(json.dumps(MAPPING))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "ollama": {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5},
        "base_models": {NAME: str(gemma_gguf)}, "paths": {"root": str(tmp_path)},
        "evaluation": {"enabled": "off"}}))
    model = tmp_path / "model"
    res = _cli("process", "--config", str(config), "--input", str(tmp_path / "train.csv"), "--mapping",
               str(tmp_path / "mapping.json"), "--model", NAME, "--approach", "model_set", "--topics", TOPIC,
               "--output-dir", str(model))
    assert res.returncode == 0, res.stderr[-3000:]

    serve = subprocess.Popen([sys.executable, "-m", "daemon", "serve", str(model), "--config", str(config),
                              "--parallel", "2", "--threads", "1", "--log", str(tmp_path / "llama-server.log")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(line.startswith("base_url: ") for line in lines):
            line = serve.stdout.readline()
            assert line, f"serve ended: {serve.stderr.read()[-2000:]}"
            lines.append(line.strip())
        base_url = next(line for line in lines if line.startswith("base_url: "))[len("base_url: "):]
        # the server presents the model set under the model set's own name (it is not registered in Ollama)
        built = json.loads((model / "fine_tuning_metadata.json").read_text())["model_set"]["model_name"]
        assert built != NAME
        assert requests.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"] == built
        rated = _cli("rate", "--config", str(config), "--model", str(model), "--input", str(tmp_path / "new.csv"),
                     "--backend", "openai", "--output", str(tmp_path / "ratings.csv"),
                     FINE_TUNER_OPENAI__BASE_URL=base_url,
                     # room for a whole answer: the schema bounds the rationale at 500 characters, but
                     # the base model may spend a token on each (its reasons run longer than a
                     # fine-tune's); a machine busy with the rest of the suite answers slowly
                     FINE_TUNER_EVALUATION__MAX_NEW_TOKENS="768", FINE_TUNER_OPENAI__READ_TIMEOUT_S="600")
        assert rated.returncode == 0, rated.stderr[-3000:]
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    with pytest.raises(requests.ConnectionError):  # llama-server went with it
        requests.get(f"{base_url}/models", timeout=5)
    # one generating thread: two threads spin-waiting for each other on cores that the rest of the
    # suite keeps busy made this test take up to 9 minutes
    assert "threadpool init, n_threads = 1\n" in (tmp_path / "llama-server.log").read_text(errors="replace")
    with open(tmp_path / "ratings.csv", newline="", encoding="utf-8") as fh:
        ratings = list(csv.DictReader(fh))
    assert [r["C_BioSense_ID"] for r in ratings] == [v["C_BioSense_ID"] for v in visits[60:]]
    assert all(r["valid"] == "true" and int(r["rating"]) in MAPPING.values() for r in ratings), ratings
    summary = json.loads((tmp_path / "ratings.summary.json").read_text())
    assert (summary["backend"], summary["rated"], summary["invalid"]) == ("openai", 10, 0)
    # llama.cpp returns the answer tokens' log-probabilities: every rating has its confidence
    assert all(0 < float(r["confidence"]) <= 1 for r in ratings), ratings
    assert summary["confidence"]["source"] == "the server's token log-probabilities (logprobs)"


@pytest.mark.timeout(600)
def test_llama_server_renders_gemma_turns_and_decides_the_rating_directly(tmp_path, gemma_gguf):
    """llama-server serving Gemma 3 270M with the built-in gemma turn format renders each conversation
    as Gemma's turns (the record in it, not the template's name), and a direct decision through it
    (the rating-only schema, a few tokens) is an allowed rating with each rating's probability from
    the server's log-probabilities (summing to 1)."""
    from daemon.config import OpenAIConfig
    from daemon.data.prompts import answer_rating, system_prompt
    from daemon.quality.backends import OpenAIRater
    from daemon.serving.llamaserver import LlamaServer, ServerSpec

    visits = generate_visits(2, seed=5)
    system = system_prompt(TOPIC, MAPPING)
    users = [f"Chief complaint: {v['ChiefComplaintOrig']}" for v in visits]
    spec = ServerSpec(model=gemma_gguf, alias=NAME, chat_template="gemma", parallel=1, threads=1)
    with LlamaServer(spec, log_path=tmp_path / "llama-server.log") as server:
        conversations = [[{"role": "system", "content": system}, {"role": "user", "content": u}] for u in users]
        rendered = requests.post(f"{server.url}/apply-template", json={"messages": conversations[0]}, timeout=60)
        assert rendered.json() == {"prompt": f"<start_of_turn>user\n{system}\n\n{users[0]}<end_of_turn>\n"
                                             "<start_of_turn>model\n"}
        values = sorted(MAPPING.values())
        cfg = OpenAIConfig(base_url=server.base_url, parallel=1, read_timeout_s=300.0, retries=0)
        answers = OpenAIRater(cfg, values=values, direct=True).answer(NAME, conversations)
    assert [answer_rating(a.text, values) in values for a in answers] == [True, True], [a.text for a in answers]
    assert [json.loads(a.text).keys() == {"rating"} for a in answers] == [True, True]
    assert [sorted(a.probs) == values and abs(sum(a.probs.values()) - 1) < 1e-9 for a in answers] == [True, True]
