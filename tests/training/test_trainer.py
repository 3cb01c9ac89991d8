"""Tests for daemon/training/trainer.py that need no training: how a failed download of the base weights is
told, and the answer-only loss."""

from __future__ import annotations

import pytest
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


def test_answer_loss_equals_the_models_own_loss(tiny_model_dir):
    """The head applied to the answer positions only gives the loss transformers computes over every
    position (same masking, same normalisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from daemon.training.trainer import answer_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(5, 200, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.clone()
    labels[:, :12] = -100
    labels[1, 15:] = -100
    n = int((labels[:, 1:] != -100).sum())
    expected = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    assert float(answer_loss(model, ids, mask, labels, n)) == pytest.approx(float(expected), rel=1e-6)
