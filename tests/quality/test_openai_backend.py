"""The openai backend end to end: `rate` and `evaluate` through the command line against the strict
loopback fake OpenAI-compatible server, and where `auto` puts it (after Ollama, before local)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from daemon.config import load_config
from daemon.errors import FineTunerError
from daemon.data import prompts
from daemon.data.synthetic import HEADER, MAPPING, synthetic_rows
from daemon.fine_tuner import FineTuner
from daemon.quality.heldout import EvalModel, EvaluationSkipped, OpenAIPlan, choose_backend
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent.parent
MARKER = "ZZPATIENTMARKER"
INVALID = "ZZINVALID"
KEY = "sk-test-ZZSECRETKEY0123456789"
SCHEMA = prompts.output_schema(sorted(MAPPING.values()))
CHAT = "/chat/completions"
OLLAMA_DOWN = {"host": "http://127.0.0.1:9", "retries": 0, "connect_timeout_s": 0.5}


def _cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "FINE_TUNER_OLLAMA__HOST": OLLAMA_DOWN["host"], "FINE_TUNER_OLLAMA__RETRIES": "0",
            "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


def _prefixes(raws: list[bytes]) -> set[bytes]:
    """The bytes of each request body before its last message (the record)."""
    return {raw[:raw.rindex(b'{"role": "user"')] for raw in raws}


def _input_csv(path: Path, rows: int, invalid: tuple[int, ...]) -> dict[str, int]:
    """Records to rate, each prompt made unique; returns {prompt: expert rating}."""
    truth = {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i, row in enumerate(synthetic_rows(rows, 11)):
            row[1] += f" {MARKER} #{i}" + (f" {INVALID}" if i in invalid else "")
            truth[row[1]] = int(row[3])
            writer.writerow(row)
    return truth


def test_rate_through_the_cli_with_the_openai_backend_rates_every_row(tmp_path):
    """`rate --backend openai` on a bare model rates every record through the fake (the key from the
    named variable, the schema as response_format, one byte-identical prefix); answers are parsed
    strictly, so prose is marked invalid; no record text reaches stdout, stderr or the log."""
    fake = FakeOpenAI(models=("served-model",), api_key=KEY)
    fake.start()
    try:
        source = tmp_path / "new.csv"
        truth = _input_csv(source, 25, invalid=(4, 19))
        fake.responder = lambda model, messages, body: (
            f"It looks like a match {MARKER}" if INVALID in messages[-1]["content"]
            else json.dumps({"rating": truth[messages[-1]["content"]], "rationale": "fits the rule"}))
        mapping = tmp_path / "m.json"
        mapping.write_text(json.dumps(MAPPING))
        res = _cli("rate", "--model", "llama3.2:1b", "--mapping", str(mapping), "--topics", "respiratory infections",
                   "--input", str(source), "--backend", "openai", cwd=tmp_path,
                   env={"FINE_TUNER_OPENAI__BASE_URL": fake.url, "FINE_TUNER_OPENAI__MODEL": "served-model",
                        "FINE_TUNER_OPENAI__API_KEY_ENV": "FT_OPENAI_KEY", "FT_OPENAI_KEY": KEY})
    finally:
        fake.stop()
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "rated: 25 of 25 records with served-model (openai)"
    with open(tmp_path / "new.ratings.csv", newline="", encoding="utf-8") as fh:
        rated = [(r["Row_ID"], r["rating"], r["valid"], r["model"]) for r in csv.DictReader(fh)]
    expected = [(row[0], "" if i in (4, 19) else str(int(row[3])), "false" if i in (4, 19) else "true", "served-model")
                for i, row in enumerate(synthetic_rows(25, 11))]
    assert rated == expected
    summary = json.loads((tmp_path / "new.ratings.summary.json").read_text())
    assert (summary["backend"], summary["model"], summary["rated"], summary["invalid"]) == (
        "openai", "served-model", 25, 2)
    chats = fake.requests_to(CHAT)
    assert len(chats) == 25 and [r.method for r in fake.requests_to("/models")] == ["GET"]
    assert {r.headers["Authorization"] for r in fake.requests} == {f"Bearer {KEY}"}
    assert all((c.body["model"], c.body["temperature"], c.body["seed"], c.body["max_tokens"],
                c.body["response_format"]) == (
        "served-model", 0, 42, 96, {"type": "json_schema", "json_schema": {"name": "rating", "strict": True,
                                                                            "schema": SCHEMA}}) for c in chats)
    assert len(_prefixes([c.raw for c in chats])) == 1
    assert [m["role"] for m in chats[0].body["messages"]] == ["system", "user"]
    logged = (tmp_path / "fine_tuner.log").read_text()
    assert (MARKER in res.stdout + res.stderr + logged, KEY in logged) == (False, False)


def _model_set_folder(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A model set built by FineTuner (not registered, not evaluated); {prompt: expert rating}."""
    df = pd.DataFrame(list(synthetic_rows(120, 7)), columns=HEADER)
    df["formatted_prompt"] = df["formatted_prompt"] + f" {MARKER} #" + df.index.astype(str)
    out = tmp_path / "model"
    ok, _ = FineTuner(config={"ollama": {**OLLAMA_DOWN, "register": "off"}, "evaluation": {"enabled": "off"},
                              "paths": {"root": str(tmp_path)}}).process_dataset(
        df, "llama3.2:1b", MAPPING, "respiratory infections", approach="model_set", output_dir=out)
    assert ok is True
    return out, dict(zip(df["formatted_prompt"], df["Standardized_Rating"].astype(int)))


def test_evaluate_a_model_set_through_the_cli_with_the_openai_backend(tmp_path, fake_openai):
    """`evaluate --backend openai` asks the served model for the model set (its few-shot turns sent
    as messages, one byte-identical prefix) and for the base model zero-shot, and writes the report
    with both under the openai backend."""
    out, truth = _model_set_folder(tmp_path)
    # the "model" answers like the experts only when it is shown the examples
    fake_openai.responder = lambda model, messages, body: (
        json.dumps({"rating": truth[messages[-1]["content"]], "rationale": "x"}) if len(messages) > 2
        else "a match, I think")
    res = _cli("evaluate", str(out), "--backend", "openai", cwd=tmp_path,
               env={"FINE_TUNER_OPENAI__BASE_URL": fake_openai.url, "FINE_TUNER_OPENAI__MODEL": "served-model"})
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "evaluation.json").read_text())
    new, measured, base = report["models"]
    n = report["n"]
    assert [(m["key"], m["backend"], m["model"], m["invalid"], m["accuracy"]) for m in report["models"]] == [
        ("new", "openai", "served-model", 0, 1.0), ("baseline", "baseline", "baseline.json", 0, measured["accuracy"]),
        ("base", "openai", "served-model", n, 0.0)]
    config = json.loads((out / "model_set_config.json").read_text())
    few_shot = [m for ex in config["few_shot_examples"]
                for m in ({"role": "user", "content": ex["input"]}, {"role": "assistant", "content": ex["output"]})]
    chats = fake_openai.requests_to(CHAT)
    assert len(chats) == 2 * n
    with_examples = [c for c in chats if len(c.body["messages"]) > 2]
    zero_shot = [c for c in chats if len(c.body["messages"]) == 2]
    assert (len(with_examples), len(zero_shot)) == (n, n)
    system = {"role": "system", "content": config["system_prompt"]}
    assert {json.dumps(c.body["messages"][:-1]) for c in with_examples} == {json.dumps([system, *few_shot])}
    assert {json.dumps(c.body["messages"][:-1]) for c in zero_shot} == {json.dumps([system])}
    assert (len(_prefixes([c.raw for c in with_examples])), len(_prefixes([c.raw for c in zero_shot]))) == (1, 1)
    assert MARKER not in res.stdout + res.stderr + (out / "evaluation.md").read_text()


# --- where auto puts the openai backend -----------------------------------------------------------

def _config(fake_openai=None, ollama=None, **openai):
    return load_config(None, {}, overrides={
        "ollama": ollama or OLLAMA_DOWN,
        "openai": {**({"base_url": fake_openai.url, "retries": 0} if fake_openai else {}), **openai}})


MODELS = [EvalModel("new", "model set", few_shot=[{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]),
          EvalModel("base", "base model (zero-shot)")]


def _openai_reason(reason: str) -> str:
    """The openai part of a skip reason "no backend can run the evaluation (ollama: ...; openai: ...; local: ...)"."""
    return reason.split("; openai: ", 1)[1].rsplit("; local: ", 1)[0]


def test_auto_takes_the_openai_server_when_ollama_is_down_and_it_lists_the_model(fake_openai):
    """auto: Ollama does not answer, the OpenAI-compatible server lists the base model's name: openai."""
    assert choose_backend("auto", MODELS, "llama3.2:1b", _config(fake_openai)) == ("openai", OpenAIPlan("llama3.2:1b"))
    assert [(r.method, r.path) for r in fake_openai.requests] == [("GET", "/models")]


def test_auto_takes_ollama_first(fake_ollama, fake_openai):
    """auto: Ollama serves the model, so the OpenAI-compatible server is not even asked."""
    config = _config(fake_openai, ollama={"host": fake_ollama.url, "retries": 0})
    assert choose_backend("auto", MODELS, "llama3.2:1b", config) == ("ollama", None)
    assert fake_openai.requests == []


def test_auto_passes_over_a_server_that_does_not_list_the_model(fake_openai):
    """auto: a server that does not list the served name is passed over, and the reason says what to set."""
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("auto", MODELS, "nosuch:1b", _config(fake_openai))
    assert _openai_reason(info.value.reason) == (
        f"the server at {fake_openai.url} does not list the model 'nosuch:1b' (it lists 'served-model', "
        "'llama3.2:1b'); set openai.model to the name it serves the model under")


def test_openai_model_names_the_served_model(fake_openai):
    """openai.model is the name asked for, whatever the base model is called."""
    assert choose_backend("openai", MODELS, "nosuch:1b", _config(fake_openai, model="served-model")) == (
        "openai", OpenAIPlan("served-model"))


def _fine_tune_models(tmp_path: Path) -> tuple[list[EvalModel], Path]:
    adapter = tmp_path / "visits-20261203" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter.gguf").write_bytes(b"GGUF adapter bytes")
    models = [EvalModel("new", "fine-tune", adapter_dir=adapter), EvalModel("model_set", "model set"), MODELS[1]]
    return models, adapter


def test_a_llama_cpp_server_started_with_the_adapter_serves_the_fine_tune_and_its_base(fake_openai, tmp_path):
    """llama.cpp lists the job's adapter.gguf under /lora-adapters (at its root, not under /v1): the
    fine-tune is asked for with its scale 1, the base and the model set with every scale 0."""
    models, adapter = _fine_tune_models(tmp_path)
    fake_openai.models = ["visits-ft"]
    fake_openai.lora_adapters = [{"id": 0, "path": "/elsewhere/other.gguf", "scale": 1.0},
                                 {"id": 1, "path": str(adapter / "adapter.gguf"), "scale": 1.0}]
    chosen, plan = choose_backend("openai", models, "gemma3:270m", _config(fake_openai))
    assert chosen == "openai" and plan.adapter.how == "llama.cpp LoRA adapter 1"
    assert plan.target(models[0]) == ("visits-ft", {"lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]})
    assert plan.target(models[1]) == plan.target(models[2]) == (
        "visits-ft", {"lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]})
    assert [(r.method, r.path) for r in fake_openai.requests] == [("GET", "/models"), ("GET", "/lora-adapters")]
    from daemon.quality.backends import OpenAIRater

    name, extra = plan.target(models[0])
    OpenAIRater(_config(fake_openai).openai, extra=extra).answer(name, [[{"role": "user", "content": "r"}]])
    assert fake_openai.requests[-1].body["lora"] == extra["lora"]


def test_a_llama_cpp_server_without_the_adapter_is_a_reason_not_the_base(fake_openai, tmp_path):
    """A llama.cpp server started without this fine-tune's adapter: openai is passed over with
    what to run instead, never a rating of the base model under the fine-tune's name."""
    models, _adapter = _fine_tune_models(tmp_path)
    fake_openai.lora_adapters = [{"id": 0, "path": "/elsewhere/other.gguf", "scale": 1.0}]
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("auto", models, "llama3.2:1b", _config(fake_openai))
    assert _openai_reason(info.value.reason) == (
        f"the llama.cpp server at {fake_openai.url} was not started with this fine-tune's adapter (1 adapter(s) "
        "loaded, none of them adapter.gguf of this folder); start it with `fine-tuner serve OUTPUT_DIR`, or "
        "llama-server --lora OUTPUT_DIR/adapter/adapter.gguf")


def test_a_vllm_lora_module_or_a_runtime_load_serves_the_fine_tune(fake_openai, tmp_path):
    """vLLM: a --lora-modules entry whose root is the adapter folder is the fine-tune, its parent the
    base; without one, a server that allows runtime loading gets the folder loaded under the job's name."""
    models, adapter = _fine_tune_models(tmp_path)
    fake_openai.lora_modules = {"resp-ft": (str(adapter), "llama3.2:1b")}
    _chosen, plan = choose_backend("openai", models, "llama3.2:1b", _config(fake_openai))
    assert (plan.target(models[0]), plan.target(models[2])) == (("resp-ft", None), ("llama3.2:1b", None))
    fake_openai.lora_modules = {}
    fake_openai.runtime_lora = True
    _chosen, plan = choose_backend("openai", models, "llama3.2:1b", _config(fake_openai))
    assert plan.target(models[0]) == ("ft-visits-20261203", None)
    assert fake_openai.requests[-1].body == {"lora_name": "ft-visits-20261203", "lora_path": str(adapter.resolve())}
    assert "ft-visits-20261203" in fake_openai.lora_modules


def test_a_server_that_cannot_serve_the_adapter_says_how_to_start_one(fake_openai, tmp_path):
    """No /lora-adapters, no LoRA module, no runtime loading: the reason says what to start."""
    models, _adapter = _fine_tune_models(tmp_path)
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("openai", models, "llama3.2:1b", _config(fake_openai))
    assert info.value.reason == (
        f"no backend can run the evaluation (openai: the server at {fake_openai.url} does not serve this "
        "fine-tune's adapter and cannot load it (404); start vLLM with --enable-lora --lora-modules "
        "NAME=OUTPUT_DIR/adapter (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or llama.cpp with `fine-tuner "
        "serve OUTPUT_DIR`)")


def test_the_openai_backend_without_a_base_url_says_so():
    """--backend openai with openai.base_url unset is a skip naming the setting."""
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("openai", MODELS, "llama3.2:1b", _config())
    assert info.value.reason == "no backend can run the evaluation (openai: openai.base_url is not set)"


# --- the llama-server started for a run ---------------------------------------------------------

def _llama_reason(reason: str) -> str:
    """The llama-server part of a skip reason."""
    return reason.split("llama-server: ", 1)[1].rsplit("; local: ", 1)[0]


def test_auto_starts_no_llama_server_unless_asked_to(monkeypatch):
    """Without evaluation.start_llama_server, auto never considers the managed server: the skip
    names Ollama, openai and local only."""
    monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", "/bin/true")
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("auto", MODELS, "nosuch:1b", _config())
    assert "llama-server" not in info.value.reason
    assert info.value.reason.startswith("no backend can run the evaluation (ollama: ")


def test_llama_server_that_is_not_built_is_a_reason(monkeypatch, tmp_path):
    """--backend llama-server where the server is not built says how to build it."""
    monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", str(tmp_path / "no-such-binary"))
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("llama-server", MODELS, "llama3.2:1b", _config())
    assert info.value.reason == ("no backend can run the evaluation (llama-server: llama-server is not built on "
                                 "this machine (make llama-cpp))")


def test_auto_with_start_llama_server_names_the_missing_gguf_and_adapter(monkeypatch, tmp_path):
    """With evaluation.start_llama_server, auto tries the managed server after openai and before
    local; a base whose GGUF is not on the machine, or a fine-tune without adapter.gguf, is a
    reason naming what to do, never the base served in the fine-tune's place."""
    monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", "/bin/true")
    (tmp_path / "models").mkdir()
    config = load_config(None, {}, overrides={
        "ollama": {**OLLAMA_DOWN, "models_dir": str(tmp_path / "models")},
        "evaluation": {"start_llama_server": True}})
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("auto", MODELS, "nosuch:1b", config)
    assert "; openai: openai.base_url is not set; llama-server: " in info.value.reason
    assert _llama_reason(info.value.reason) == (
        "the GGUF of nosuch:1b is not on this machine (name it in base_models (a .gguf file) or keep "
        "Ollama's models folder readable (ollama.models_dir))")

    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")  # the adapter is checked first: the base is not read
    (tmp_path / "job" / "adapter").mkdir(parents=True)
    fine_tune = [EvalModel("new", "fine-tune", adapter_dir=tmp_path / "job" / "adapter"), MODELS[1]]
    config = load_config(None, {}, overrides={
        "ollama": OLLAMA_DOWN, "base_models": {"nosuch:1b": str(gguf)},
        "evaluation": {"start_llama_server": True}})
    with pytest.raises(EvaluationSkipped) as info:
        choose_backend("llama-server", fine_tune, "nosuch:1b", config)
    assert info.value.reason == (
        "no backend can run the evaluation (llama-server: job has no adapter/adapter.gguf (the fine-tune's "
        "GGUF adapter was not written; see training_result.json))")


def test_a_llama_server_that_does_not_come_up_is_a_rater_error_with_its_last_line(monkeypatch, tmp_path):
    """A managed server that exits while loading ends the run with one line saying so (its own last
    line of output), and nothing is left running or written in the state directory."""
    from daemon.quality.heldout import RaterError, served
    from daemon.serving.llamaserver import ServerSpec

    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\necho 'error: unknown model architecture' >&2\nexit 3\n")
    script.chmod(0o700)
    monkeypatch.setenv("FINE_TUNER_LLAMA_SERVER", str(script))
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the server's output goes
    config = load_config(None, {}, overrides={})
    spec = ServerSpec(model=tmp_path / "base.gguf", alias="nosuch:1b")
    with pytest.raises(RaterError) as info:
        with served("llama-server", spec, MODELS, "nosuch:1b", config):
            raise AssertionError("the body runs only once the server is up")
    assert str(info.value).startswith("the llama-server started for nosuch:1b did not come up: llama-server exited "
                                      "with code 3 while loading the model: error: unknown model architecture")
    # one of the product's errors: error.json and the CLI report it like any other
    assert isinstance(info.value, FineTunerError)
    assert info.value.to_dict()["error_type"] == "RaterError"
    assert list((tmp_path / "tmp").iterdir()) == []
