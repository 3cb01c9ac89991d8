"""Tests for the Ollama part of the capability report (daemon.serving.capability.ollama_checks)."""

from __future__ import annotations

import dataclasses

import pytest

from daemon.serving.capability import CapabilityReport, build_report, ollama_checks
from daemon.config import load_config
from daemon.serving.ollama import OllamaClient, UnreachableMemory

OLLAMA_CHECKS = ("ollama_reachable", "ollama_model", "adapter_architecture", "base_quantization")


@pytest.fixture
def client(fake_ollama):
    with OllamaClient(fake_ollama.config(), env={}) as c:
        yield c


@pytest.fixture(autouse=True)
def without_llama_cpp(tmp_path, monkeypatch):
    """These checks are about what Ollama itself takes: no llama.cpp adapter converter in the cache."""
    monkeypatch.setenv("FINE_TUNER_CACHE_DIR", str(tmp_path / "empty-cache"))


def test_with_llama_cpps_converter_a_qwen2_model_takes_a_gguf_adapter(client, monkeypatch):
    """With the pinned llama.cpp source in the cache (make test fetches it), qwen2 passes: its adapter
    is registered as adapter.gguf."""
    monkeypatch.delenv("FINE_TUNER_CACHE_DIR")
    from daemon import llamacpp

    assert llamacpp.pinned().has_source()
    report = _report("qwen2.5:0.5b", client)
    assert _checks(report)["adapter_architecture"] == (True, True)
    assert _detail(report, "adapter_architecture") == (
        "architecture 'qwen2' takes the GGUF LoRA adapter that llama.cpp's converter writes "
        "(Ollama converts safetensors adapters only for llama, gemma2)")


def _report(model: str, client, register: str = "auto") -> CapabilityReport:
    cfg = load_config(env={})
    cfg = dataclasses.replace(cfg, ollama=dataclasses.replace(cfg.ollama, register=register))
    return build_report(model, cfg, client)


def _checks(report: CapabilityReport) -> dict[str, tuple[bool, bool]]:
    """name → (ok, required) for the Ollama checks only (weights checks depend on the machine)."""
    return {c.name: (c.ok, c.required) for c in report.checks if c.name in OLLAMA_CHECKS}


def _detail(report: CapabilityReport, name: str) -> str:
    return next(c.detail for c in report.checks if c.name == name)


def test_supported_llama_model(client, fake_ollama):
    """A reachable llama model passes every required Ollama check; the quantized base is noted."""
    report = _report("llama3.2:1b", client)
    assert _checks(report) == {"ollama_reachable": (True, False), "ollama_model": (True, True),
                               "adapter_architecture": (True, True), "base_quantization": (False, False)}
    assert {k: report.facts[k] for k in ("ollama_version", "architecture", "format", "parameter_size",
                                         "quantization_level")} == {
        "ollama_version": "0.12.3", "architecture": "llama", "format": "gguf", "parameter_size": "1.2B",
        "quantization_level": "Q4_K_M"}
    assert _detail(report, "adapter_architecture") == "architecture 'llama' takes a safetensors LoRA adapter in Ollama"


def test_ollama_checks_returns_the_architecture(client):
    """ollama_checks returns general.architecture for a known model."""
    report = CapabilityReport(model="gemma2:2b")
    assert ollama_checks(report, client, "required") == "gemma2"
    assert _checks(report)["adapter_architecture"] == (True, True)


def test_mistral_reports_llama_and_is_supported(client, fake_ollama):
    """A Mistral base reports architecture llama in Ollama and therefore takes adapters."""
    fake_ollama.add_model("mistral:7b", architecture="llama", parameter_size="7.2B", quantization="F16")
    report = CapabilityReport(model="mistral:7b")
    assert ollama_checks(report, client, "auto") == "llama"
    assert _checks(report) == {"ollama_reachable": (True, False), "ollama_model": (True, True),
                               "adapter_architecture": (True, True), "base_quantization": (True, False)}


def test_unsupported_architecture(client):
    """Without llama.cpp's converter, a qwen2 model fails the required adapter_architecture check and
    the report is unsupported."""
    report = _report("qwen2.5:0.5b", client)
    assert _checks(report)["adapter_architecture"] == (False, True)
    assert report.supported is False
    assert "adapter_architecture" in [c.name for c in report.failed]
    assert _detail(report, "adapter_architecture") == (
        "architecture 'qwen2' cannot take a safetensors LoRA adapter in Ollama (only llama, gemma2; "
        "Mistral reports llama) and llama.cpp's adapter converter is not on this machine: run "
        "`make llama-cpp`, or use approach model_set")
    assert report.facts["architecture"] == "qwen2"


def test_unknown_model_says_ollama_pull(client, fake_ollama):
    """A model Ollama does not have fails ollama_model with an `ollama pull` hint."""
    report = _report("nope:1b", client)
    assert _checks(report) == {"ollama_reachable": (True, False), "ollama_model": (False, True),
                               "adapter_architecture": (False, True)}
    assert _detail(report, "ollama_model") == (
        f"'nope:1b' is not in Ollama at {fake_ollama.url}: run ollama pull nope:1b")
    assert report.supported is False


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("register", "required"), [("auto", False), ("off", False), ("required", True)])
def test_ollama_down(client, fake_ollama, register, required):
    """With Ollama down every Ollama check fails; they are required only when registration is required."""
    fake_ollama.fault = "down"
    report = _report("llama3.2:1b", client, register)
    assert _checks(report) == {"ollama_reachable": (False, required), "ollama_model": (False, required),
                               "adapter_architecture": (False, required)}
    assert _detail(report, "ollama_model") == "not checked: Ollama is not reachable"
    assert ("ollama_reachable" in [c.name for c in report.failed]) is required


def test_register_off_makes_a_known_unsupported_architecture_informational(client):
    """With ollama.register off, an unsupported Ollama architecture is reported but not required."""
    report = _report("qwen2.5:0.5b", client, "off")
    assert _checks(report)["adapter_architecture"] == (False, False)
    assert "adapter_architecture" not in [c.name for c in report.failed]


@pytest.mark.timeout(30)
def test_silent_server_fails_reachable_once_for_the_shared_memory(fake_ollama):
    """A server that accepts connections but never answers fails ollama_reachable as timed out; a
    second report with the same memory opens no new connection."""
    memory = UnreachableMemory()
    cfg = fake_ollama.config(retries=0, connect_timeout_s=0.5, read_timeout_s=0.5)
    fake_ollama.fault = "hang"
    reports = []
    for _ in range(2):
        with OllamaClient(cfg, env={}, memory=memory) as c:
            report = CapabilityReport(model="llama3.2:1b")
            assert ollama_checks(report, c, "auto") is None
            reports.append(report)
    assert fake_ollama.accepted == 1
    assert [_checks(r)["ollama_reachable"] for r in reports] == [(False, False), (False, False)]
    assert _detail(reports[0], "ollama_reachable") == (
        f"Ollama at {fake_ollama.url} timed out (GET /api/version) "
        "(Ollama did not answer completely within 1 s (ollama.connect_timeout_s + ollama.read_timeout_s): "
        "check the server's load, or raise ollama.read_timeout_s / ollama.create_timeout_s)")
