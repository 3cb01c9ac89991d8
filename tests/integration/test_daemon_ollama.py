"""Ollama faults seen from the daemon: every fault ends in a bounded time with the configured result.

One daemon per ``ollama.register`` mode, pointed at the fake Ollama with short timeouts; the faults
are switched on the fake one after another, each with its own drop, then a normal drop shows that
the daemon is still up and registers again.
"""

from __future__ import annotations

import json
import signal

import requests

from tests.conftest import wait_for
from tests.integration.conftest import MARKER, all_log_text

# fault -> (error type, what the reason says); every fault hits the first call, POST /api/create
FAULTS = {
    "down": ("OllamaUnavailableError", "refused the connection (POST /api/create)"),
    "slow": ("OllamaUnavailableError", "timed out (POST /api/create)"),
    "error500": ("OllamaError", "answered 500 to POST /api/create: fake internal server error"),
    "reset": ("OllamaUnavailableError", "closed or reset the connection before a complete answer (POST /api/create)"),
    "garbage": ("OllamaError", "sent a line that is not JSON in the POST /api/create stream"),
}


# with register auto a single-attempt probe (GET /api/version) runs first; "reset" only breaks streams
AUTO_FAULTS = {
    "down": ("OllamaUnavailableError", "refused the connection (GET /api/version)"),
    "slow": ("OllamaUnavailableError", "timed out (GET /api/version)"),
    "error500": ("OllamaError", "answered 500 to GET /api/version: fake internal server error"),
    "reset": FAULTS["reset"],
    "garbage": ("OllamaError", "GET /api/version"),
}


def _config(root, fake, mode: str) -> None:
    fake.slow_s = 3.0  # longer than every timeout below
    root.write_config(defaults={"model": "llama3.2:1b"},
                      ollama={"host": fake.url, "register": mode, "connect_timeout_s": 0.5,
                              "read_timeout_s": 0.5, "create_timeout_s": 0.5, "retries": 0,
                              "backoff_s": 0.01, "backoff_max_s": 0.02})


def _drop_and_wait(root, stem: str, seed: int, where) -> dict:
    root.drop_dataset(stem, seed=seed)
    [folder] = wait_for(lambda: root.job_folders(where, stem), timeout=30, message=f"{stem} finished")
    return folder


def _meta(root, job_id: str) -> dict:
    return json.loads((root.outputs / job_id / "fine_tuning_metadata.json").read_text())


def test_register_auto_every_fault_still_gives_an_unregistered_model_set(root, start_daemon, fake_ollama):
    """With register auto each fault ends in a succeeded model set with registered false and a
    reason; with no fault the model set is registered and listed by the server."""
    _config(root, fake_ollama, "auto")
    d = start_daemon()
    d.wait_event("daemon_ready")
    for i, (fault, (error_type, reason)) in enumerate(AUTO_FAULTS.items()):
        fake_ollama.fault = fault
        folder = _drop_and_wait(root, f"auto{fault}", 500 + i, root.processed)
        registration = _meta(root, folder.name)["registration"]
        assert (fault, registration["registered"], registration["error"]["error_type"]) == (
            fault, False, error_type)
        assert reason in registration["reason"], (fault, registration["reason"])
    fake_ollama.fault = None
    folder = _drop_and_wait(root, "autofine", 599, root.processed)
    registration = _meta(root, folder.name)["registration"]
    assert registration["registered"] is True
    assert fake_ollama.get_model(registration["name"]) is not None
    tags = [m["name"] for m in fake_ollama_tags(fake_ollama)]
    assert registration["name"] in tags
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert [x["status"] for x in d.events("job_finished")] == ["succeeded"] * 6
    assert MARKER not in all_log_text(root)


def test_register_required_every_fault_fails_the_job_with_registration_error(root, start_daemon, fake_ollama):
    """With register required each fault fails the job (error.json RegistrationError, no outputs);
    afterwards a normal drop still succeeds and is registered."""
    _config(root, fake_ollama, "required")
    d = start_daemon()
    d.wait_event("daemon_ready")
    for i, (fault, (_, reason)) in enumerate(FAULTS.items()):
        fake_ollama.fault = fault
        folder = _drop_and_wait(root, f"req{fault}", 600 + i, root.failed)
        error = json.loads((folder / "error.json").read_text())
        assert (fault, error["error_type"], error["attempts"]) == (fault, "RegistrationError", 1)
        assert error["message"].startswith("registration in Ollama failed: "), error["message"]
        assert reason in error["message"], (fault, error["message"])
        assert not (root.outputs / folder.name).exists()
    fake_ollama.fault = None
    folder = _drop_and_wait(root, "reqfine", 699, root.processed)
    registration = _meta(root, folder.name)["registration"]
    assert (registration["registered"], registration["check"]["ok"]) == (True, True)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert [x["status"] for x in d.events("job_finished")] == ["failed"] * 5 + ["succeeded"]
    assert MARKER not in all_log_text(root)


def fake_ollama_tags(fake) -> list[dict]:
    """The server's model list as GET /api/tags returns it."""
    return requests.get(f"{fake.url}/api/tags", timeout=5).json()["models"]
