"""Tests for daemon/training/trainer.py that need no training: how a failed download of the base weights is told."""

from __future__ import annotations

from huggingface_hub import errors as hub
from huggingface_hub.utils import _http as hub_http

from daemon.training.trainer import download_failure

ENDPOINT = "http://127.0.0.1:9"
# the HTTP client the installed huggingface_hub raises from (httpx; later releases import httpx2)
httpx = getattr(hub_http, "httpx", None) or hub_http.httpx2


def _raised(exc: BaseException, *causes: BaseException) -> BaseException:
    """``exc`` raised from ``causes[0]``, raised from ``causes[1]``, ...: a real chain, as transformers builds it."""
    chain = [exc, *causes]
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    return exc


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("HEAD", f"{ENDPOINT}/org/x/resolve/main/config.json"))


def test_connection_error_under_transformers_wrapping_names_the_hub():
    """transformers' "We couldn't connect" OSError over a refused connection gives the connection cause."""
    exc = _raised(OSError(f"We couldn't connect to '{ENDPOINT}' to load the files"),
                  hub.LocalEntryNotFoundError("not in cache"),
                  httpx.ConnectError("[Errno 111] Connection refused"))
    assert download_failure(exc, ENDPOINT) == (
        f"the Hugging Face Hub at {ENDPOINT} could not be reached (ConnectError: [Errno 111] Connection refused)")


def test_gated_and_missing_repositories_say_what_to_do():
    """A gated repository asks for a token with access; a missing one says it may be private."""
    gated = _raised(OSError("You are trying to access a gated repo."),
                    hub.GatedRepoError("Access to model org/x is restricted.", response=_response(401)))
    missing = hub.RepositoryNotFoundError("Repository Not Found for url", response=_response(404))
    assert download_failure(gated, ENDPOINT) == (
        "the repository is gated: accept its conditions on its Hub page and give a token of that account in HF_TOKEN")
    assert download_failure(missing, ENDPOINT) == (
        "the repository does not exist, or it is private and HF_TOKEN holds no token with access")


def test_other_errors_are_not_download_failures():
    """An error unrelated to the Hub (a corrupt weights file) is left to the generic exit code."""
    assert download_failure(_raised(RuntimeError("Error while deserializing header"), ValueError("bad")),
                            ENDPOINT) is None
    assert download_failure(_raised(OSError("no file named model.safetensors")), ENDPOINT) is None
