"""Pytest plugin: the tiny Llama the training tests run on (built by ``daemon.tinymodel``).

``tiny_model_dir`` is the session fixture (built once per test session, about ten seconds of one core),
``tiny_base_models`` the matching ``base_models`` config slice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.tinymodel import TINY_NAME, build_tiny_model

__all__ = ["TINY_NAME", "build_tiny_model", "tiny_base_models", "tiny_model_dir"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding the tiny Llama (config.json, model.safetensors, tokenizer files)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base_models(tiny_model_dir) -> dict[str, str]:
    """The ``base_models`` config slice that maps the tiny model's Ollama name to its directory."""
    return {TINY_NAME: str(tiny_model_dir)}
