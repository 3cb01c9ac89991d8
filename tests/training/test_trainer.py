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


def test_a_shared_prefix_is_computed_once_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Rows that begin alike (the system turn) share one forward pass of that prefix; the loss and
    every LoRA gradient equal the full forward's, with right padding and answers of unequal length."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from daemon.training import trainer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()  # no dropout: both paths must see the same network
    system = torch.randint(5, 200, (24,))
    rows = [torch.cat([system, torch.randint(5, 200, (n,))]) for n in (12, 16, 9)]
    examples = [(r.tolist(), [-100] * (len(r) - 5) + r[-5:].tolist()) for r in rows]
    ids, mask, labels = trainer.collate(examples, 0)
    n = int((labels[:, 1:] != -100).sum())
    assert trainer.shared_prefix(ids, mask, labels) == 24

    def loss_and_grads():
        model.zero_grad()
        loss = trainer.answer_loss(model, ids, mask, labels, n)
        loss.backward()
        return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    shared_loss, shared_grads = loss_and_grads()
    monkeypatch.setattr(trainer, "MIN_SHARED_PREFIX", 10**9)
    full_loss, full_grads = loss_and_grads()
    assert shared_loss == pytest.approx(full_loss, rel=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) == 8
    for key, grad in full_grads.items():
        assert torch.allclose(shared_grads[key], grad, rtol=1e-4, atol=1e-6), key


def test_shared_prefix_stops_before_the_first_answer_and_needs_two_rows():
    import torch

    from daemon.training.trainer import shared_prefix

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    assert shared_prefix(ids, mask, labels) == 3  # position 3 predicts the first answer token
    labels[0, 2:] = ids[0, 2:]
    assert shared_prefix(ids, mask, labels) == 1
    assert shared_prefix(ids[:1], mask[:1], labels[:1]) == 0
    labels[1] = -100  # a row without an answer: no sharing
    assert shared_prefix(ids, mask, labels) == 0


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    """Losses 3, 2, 2.5 with patience 1: training stops after the third epoch and the weights are
    put back to the second epoch's; the frozen weights are never copied or touched."""
    import torch

    from daemon.training.trainer import EarlyStopping

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    stopping = EarlyStopping(model, 1)
    for epoch, loss in enumerate([3.0, 2.0, 2.5], 1):
        with torch.no_grad():
            model[1].weight.fill_(float(epoch))
        stopping.epoch_ended(loss)
    assert stopping.stopped
    assert set(stopping.best_state) == {"0.bias", "1.weight", "1.bias"}
    stopping.restore_best()
    assert model[1].weight.tolist() == [[2.0, 2.0]] and torch.equal(model[0].weight, frozen)
    assert stopping.summary() == {"patience": 1, "watched": "all held-out rows", "loss_by_epoch": [3.0, 2.0, 2.5],
                                  "best_epoch": 2, "epochs_run": 3, "stopped_early": True}


def test_early_stopping_off_or_improving_changes_nothing():
    import torch

    from daemon.training.trainer import EarlyStopping

    model = torch.nn.Linear(2, 1)
    off = EarlyStopping(model, 0)
    off.epoch_ended(1.0)
    assert (off.stopped, off.summary()["epochs_run"]) == (False, 0)
    on = EarlyStopping(model, 1)
    for loss in (3.0, 2.0, 1.0, None):  # None: no validation rows, nothing is watched
        on.epoch_ended(loss)
    with torch.no_grad():
        model.weight.fill_(7.0)
    on.restore_best()  # the last epoch was the best: the weights stay as they are
    assert (on.stopped, on.best_epoch, model.weight.tolist()) == (False, 3, [[7.0, 7.0]])
