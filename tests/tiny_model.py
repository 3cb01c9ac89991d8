"""Pytest plugin: the tiny Llama the training tests run on (built by ``daemon.training.tinymodel``).

``tiny_model_dir`` is the session fixture (built once per test session, about ten seconds of one core),
``tiny_base_models`` the matching ``base_models`` config slice, ``tiny_gguf`` the same model as a GGUF
file (llama.cpp's converter, f32).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from daemon.training.tinymodel import TINY_NAME, build_tiny_model

__all__ = ["TINY_NAME", "build_tiny_model", "tiny_base_models", "tiny_gguf", "tiny_model_dir"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding the tiny Llama (config.json, model.safetensors, tokenizer files).

    Under pytest-xdist the workers of one run share it: the first builds it (about ten seconds of
    a core) while the others wait on a lock, so the model is trained once per run, not per worker.
    Tests only read it (a test that damages weights works on a copy)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target = shared / "tiny-llama-shared"
    with open(shared / "tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            building = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=shared))
            build_tiny_model(building)
            os.rename(building, target)
    return target


@pytest.fixture(scope="session")
def tiny_base_models(tiny_model_dir) -> dict[str, str]:
    """The ``base_models`` config slice that maps the tiny model's Ollama name to its directory."""
    return {TINY_NAME: str(tiny_model_dir)}


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny base as a GGUF file (llama.cpp's converter, f32), made once per worker."""
    from daemon.llamacpp import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", gpt2_pre=True)
