"""Tests for daemon/serving/register.py: model-set and adapter registration against the fake Ollama, and the
ollama.register policy under every fault mode."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from structlog.testing import capture_logs

from daemon.errors import ConfigError, OllamaError, OllamaUnavailableError, RegistrationError
from daemon.serving.ollama import OllamaClient
from daemon.data.prompts import answer_json, output_schema, system_prompt
from daemon.data import turns
from daemon.serving.register import NEUTRAL_PROBE, register_adapter, register_model_set, register_with_policy

MARKER = "ZZPATIENT-7731-QX"  # planted in every cell-derived text; must never reach logs or errors
MAPPING = {"Match": 1, "Does Not Match": 0}
SCHEMA = output_schema([0, 1])
SYSTEM = system_prompt("falls", MAPPING)


@pytest.fixture
def client(fake_ollama):
    with OllamaClient(fake_ollama.config(), env={}) as c:
        yield c


def model_set_config(name: str = "llama3.2-visits:latest", base: str = "llama3.2:1b") -> dict:
    return {
        "base_model": base,
        "target_topics": ["falls"],
        "system_prompt": SYSTEM,
        "few_shot_examples": [
            {"input": f"Chief complaint: fell from ladder {MARKER}", "output": answer_json(1, f"a fall {MARKER}"),
             "rating": 1},
            {"input": f"Chief complaint: sore throat {MARKER}", "output": answer_json(0, "no fall"), "rating": 0},
        ],
        "output_schema": SCHEMA,
        "ollama": {"model_name": name, "parameters": {"temperature": 0}},
    }


def write_adapter(folder, alpha: int = 32) -> dict[str, bytes]:
    """A small but well-formed PEFT adapter: adapter_config.json and a real safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps({"base_model_name_or_path": "meta-llama/Llama-3.2-1B-Instruct", "peft_type": "LORA",
                         "r": 4, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]}).encode()
    tensor = struct.pack("<4f", 0.5, -0.25, 0.125, 1.0)
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, len(tensor)]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + tensor
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return {"adapter_config.json": config, "adapter_model.safetensors": weights}


def _adapter_kwargs(tmp_path, base: str = "llama3.2:1b") -> dict:
    return dict(name="llama3.2-visits-ft:latest", base=base, adapter_dir=tmp_path / "adapter", system=SYSTEM,
                parameters={"temperature": 0}, output_schema=SCHEMA)


# --- model set ---------------------------------------------------------------------------------

def test_register_model_set_end_to_end(client, fake_ollama):
    """The create body carries from, system, few-shot messages and temperature 0; the check chat uses the schema."""
    config = model_set_config()
    with capture_logs() as logs:
        result = register_model_set(client, config)
    created = fake_ollama.get_model("llama3.2-visits")
    assert result == {"registered": True, "name": "llama3.2-visits:latest", "digest": created.digest,
                      "check": {"ok": True, "duration_s": result["check"]["duration_s"],
                                "detail": 'the answer is a JSON object whose "rating" is one of the scale'}}
    (create,) = fake_ollama.requests_to("/api/create")
    assert create.body == {
        "model": "llama3.2-visits:latest", "stream": True, "from": "llama3.2:1b", "system": SYSTEM,
        "messages": [
            {"role": "user", "content": config["few_shot_examples"][0]["input"]},
            {"role": "assistant", "content": config["few_shot_examples"][0]["output"]},
            {"role": "user", "content": config["few_shot_examples"][1]["input"]},
            {"role": "assistant", "content": config["few_shot_examples"][1]["output"]},
        ],
        "parameters": {"temperature": 0}}
    (chat,) = fake_ollama.requests_to("/api/chat")
    assert chat.body["format"] == SCHEMA
    assert chat.body["options"]["temperature"] == 0
    assert chat.body["messages"] == [{"role": "user", "content": config["few_shot_examples"][0]["input"]}]
    assert len(fake_ollama.requests_to("/api/show")) == 1
    assert created.parent_model == "llama3.2:1b"
    assert created.parameters == {"stop": ["<|eot_id|>"], "temperature": 0}
    assert MARKER not in repr(logs)


def test_model_set_with_name_override_and_no_examples(client, fake_ollama):
    """name= overrides the config's model name; without few-shot examples the neutral probe is sent."""
    config = model_set_config()
    config["few_shot_examples"] = []
    result = register_model_set(client, config, name="job-output:v2")
    assert (result["name"], result["check"]["ok"]) == ("job-output:v2", True)
    (chat,) = fake_ollama.requests_to("/api/chat")
    assert chat.body["messages"] == [{"role": "user", "content": NEUTRAL_PROBE}]
    assert fake_ollama.requests_to("/api/create")[0].body.get("messages") == []


def test_bad_answer_fails_the_check_without_leaking_it(client, fake_ollama):
    """A chat answer that is not the rating JSON fails the check; the answer text appears nowhere."""
    fake_ollama.chat_content = f"I think rating is high {MARKER}"
    with capture_logs() as logs:
        result = register_model_set(client, model_set_config())
    assert result["registered"] is True
    assert result["check"]["ok"] is False
    assert result["check"]["detail"] == (f"the answer ({len(fake_ollama.chat_content)} characters) is not a JSON "
                                         'object whose "rating" is one of the scale')
    assert MARKER not in repr(result) + repr(logs)


def test_rating_outside_the_scale_fails_the_check(client, fake_ollama):
    """An answer whose rating is not in the schema's enum fails the check."""
    fake_ollama.chat_content = json.dumps({"rating": 7, "rationale": "x"})
    assert register_model_set(client, model_set_config())["check"]["ok"] is False


def test_required_mode_raises_when_the_check_fails(client, fake_ollama):
    """With ollama.register required, a registered model failing its check raises RegistrationError."""
    fake_ollama.chat_content = f"not json {MARKER}"
    with pytest.raises(RegistrationError) as info:
        register_with_policy("required", lambda: register_model_set(client, model_set_config()))
    assert "failed its check" in info.value.message
    assert MARKER not in str(info.value) + json.dumps(info.value.to_dict())


def test_auto_mode_keeps_a_failed_check(client, fake_ollama):
    """With auto, a failed check is recorded in the result and nothing is raised."""
    fake_ollama.chat_content = "not json"
    result = register_with_policy("auto", lambda: register_model_set(client, model_set_config()))
    assert (result["registered"], result["check"]["ok"]) == (True, False)


def test_unknown_base_is_recorded_in_auto(client):
    """A model set on a base Ollama lacks is not registered in auto mode; the server's text is the reason."""
    result = register_with_policy("auto", lambda: register_model_set(client, model_set_config(base="missing:7b")))
    assert result["registered"] is False
    assert result["error"]["server_error"] == "pull model manifest: file does not exist"
    assert result["error"]["error_type"] == "OllamaError"


# --- adapter -----------------------------------------------------------------------------------

def test_register_adapter_uploads_blobs_and_attaches_them(client, fake_ollama, tmp_path):
    """Blob digests equal the files' sha256, the create body maps file names to them, show lists an ADAPTER."""
    files = write_adapter(tmp_path / "adapter")
    expected = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}
    result = register_adapter(client, **_adapter_kwargs(tmp_path), probe=f"probe {MARKER}")
    assert {d: fake_ollama.blobs[d] for d in expected.values()} == {expected[n]: files[n] for n in files}
    (create,) = fake_ollama.requests_to("/api/create")
    assert create.body == {"model": "llama3.2-visits-ft:latest", "stream": True, "from": "llama3.2:1b",
                           "adapters": expected, "system": SYSTEM, "parameters": {"temperature": 0}}
    created = fake_ollama.get_model("llama3.2-visits-ft")
    assert result == {"registered": True, "name": "llama3.2-visits-ft:latest", "digest": created.digest,
                      "adapters": expected, "check": result["check"]}
    assert result["check"]["ok"] is True
    assert "\nADAPTER " in created.modelfile()
    (chat,) = fake_ollama.requests_to("/api/chat")
    assert (chat.body["format"], chat.body["messages"][-1]["content"]) == (SCHEMA, f"probe {MARKER}")


def test_register_adapter_on_gemma2(client, fake_ollama, tmp_path):
    """gemma2 takes safetensors adapters too."""
    write_adapter(tmp_path / "adapter")
    result = register_adapter(client, **_adapter_kwargs(tmp_path, base="gemma2:2b"))
    assert result["registered"] is True
    assert fake_ollama.get_model("llama3.2-visits-ft").parent_model == "gemma2:2b"


def test_register_adapter_on_unsupported_base(client, fake_ollama, tmp_path):
    """An adapter on a qwen2 base fails with the server's 'unsupported architecture' (error line in the stream)."""
    write_adapter(tmp_path / "adapter")
    with pytest.raises(OllamaError) as info:
        register_adapter(client, **_adapter_kwargs(tmp_path, base="qwen2.5:0.5b"))
    assert (info.value.status, info.value.server_error) == (200, "unsupported architecture")
    with pytest.raises(RegistrationError) as required:
        register_with_policy("required",
                             lambda: register_adapter(client, **_adapter_kwargs(tmp_path, base="qwen2.5:0.5b")))
    assert (required.value.status, required.value.server_error) == (200, "unsupported architecture")


def test_register_gguf_adapter_on_a_base_ollama_does_not_convert(client, fake_ollama, tmp_path):
    """A qwen2 fine-tune is registered with adapter.gguf alone (no conversion) and the turn format as
    TEMPLATE; a .gguf that is not GGUF is refused by the server."""
    write_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter.gguf").write_bytes(b"GGUF" + bytes(60))
    result = register_adapter(client, **_adapter_kwargs(tmp_path, base="qwen2.5:0.5b"), adapter_format="gguf",
                              template=turns.CHATML.ollama)
    assert (result["registered"], sorted(result["adapters"])) == (True, ["adapter.gguf"])
    (create,) = fake_ollama.requests_to("/api/create")
    assert (sorted(create.body["adapters"]), create.body["template"]) == (["adapter.gguf"], turns.CHATML.ollama)
    (tmp_path / "adapter" / "adapter.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(OllamaError) as info:
        register_adapter(client, **_adapter_kwargs(tmp_path, base="qwen2.5:0.5b"), adapter_format="gguf")
    assert (info.value.status, info.value.server_error) == (400, "supplied file was not in GGUF format")


def test_register_adapter_missing_file(client, fake_ollama, tmp_path):
    """An adapter folder without adapter_model.safetensors raises RegistrationError before any upload."""
    write_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(RegistrationError) as info:
        register_adapter(client, **_adapter_kwargs(tmp_path))
    assert info.value.message == f"the adapter folder {tmp_path / 'adapter'} lacks adapter_model.safetensors"
    assert fake_ollama.requests == []


# --- policy ------------------------------------------------------------------------------------

def test_policy_off_registers_nothing():
    """Mode off returns the fixed not-registered result without calling the action."""
    calls = []
    assert register_with_policy("off", lambda: calls.append(1) or {}) == {
        "registered": False, "reason": "ollama.register is off"}
    assert calls == []


def test_policy_rejects_an_unknown_mode():
    """An unknown mode is a ConfigError naming the setting."""
    with pytest.raises(ConfigError) as info:
        register_with_policy("sometimes", lambda: {})
    assert info.value.problems == ["ollama.register: must be one of auto, required, off (got 'sometimes')"]


def test_policy_passes_a_result_through(client):
    """auto returns the action's result when registration works."""
    result = register_with_policy("auto", lambda: register_model_set(client, model_set_config()))
    assert (result["registered"], result["name"], result["check"]["ok"]) == (True, "llama3.2-visits:latest", True)


FAULTS = [("down", "OllamaUnavailableError", None), ("slow", "OllamaUnavailableError", None),
          ("error500", "OllamaError", 500), ("reset", "OllamaUnavailableError", None),
          ("garbage", "OllamaError", 200)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fault", "error_type", "status"), FAULTS)
@pytest.mark.parametrize("kind", ["model_set", "adapter"])
def test_fault_auto_records_and_required_raises(fake_ollama, tmp_path, fault, error_type, status, kind):
    """Under every fault mode auto returns registered False with a reason, required raises RegistrationError."""
    write_adapter(tmp_path / "adapter")
    fake_ollama.slow_s = 5.0
    with OllamaClient(fake_ollama.config(read_timeout_s=0.3, create_timeout_s=0.3), env={}) as c:
        if kind == "model_set":
            action = lambda: register_model_set(c, model_set_config())  # noqa: E731
        else:
            action = lambda: register_adapter(c, **_adapter_kwargs(tmp_path))  # noqa: E731
        fake_ollama.fault = fault
        with capture_logs() as logs:
            result = register_with_policy("auto", action)
        assert result["registered"] is False
        assert (result["error"]["error_type"], result["error"]["status"]) == (error_type, status)
        assert result["reason"] == result["error"]["message"] + " (" + result["error"]["hint"] + ")"
        with pytest.raises(RegistrationError) as info:
            register_with_policy("required", action)
    assert info.value.status == status
    assert isinstance(info.value.__cause__, OllamaUnavailableError) is (error_type == "OllamaUnavailableError")
    assert MARKER not in repr(logs) + repr(result) + str(info.value)


# --- one job pays for a silent server once ------------------------------------------------------

@pytest.mark.timeout(60)
def test_one_job_waits_for_a_silent_server_once(fake_ollama, tmp_path):
    """Within one job the registration reuses the capability check's finding that the server does
    not answer (no new connection); the next job probes the server again."""
    import pandas as pd

    from daemon.fine_tuner import FineTuner
    from daemon.data.synthetic import HEADER, MAPPING as LABELS, synthetic_rows

    cfg = {"ollama": {"host": fake_ollama.url, "connect_timeout_s": 0.5, "read_timeout_s": 0.5,
                      "retries": 2, "backoff_s": 0.01, "backoff_max_s": 0.02, "register": "auto"},
           "paths": {"root": str(tmp_path)}}
    tuner = FineTuner(config=cfg)
    df = pd.DataFrame(list(synthetic_rows(60, 7)), columns=HEADER)
    fake_ollama.fault = "hang"
    _, first = tuner.process_dataset(df, "silent:1b", LABELS, "flu", output_dir=tmp_path / "first")
    checks = {c["name"]: c["ok"] for c in first["capability"]["checks"]}
    assert (first["approach"], checks["ollama_reachable"], first["registration"]["registered"]) == (
        "model_set", False, False)
    assert f"Ollama at {fake_ollama.url} timed out (GET /api/version)" in first["registration"]["reason"]
    assert fake_ollama.accepted == 1
    _, second = tuner.process_dataset(df, "silent:1b", LABELS, "flu", output_dir=tmp_path / "second")
    assert second["registration"]["registered"] is False
    assert fake_ollama.accepted == 2
