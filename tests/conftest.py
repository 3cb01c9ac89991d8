"""Shared test helpers: waiting on conditions, leak checks, common fixtures.

Fixture modules of their own (the fake Ollama server, the tiny model) are plugged in here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["tests.fake_ollama", "tests.fake_openai", "tests.tiny_model", "tests.real_model"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# A test is slow (left out of `make test-fast`, the edit loop) when it trains, loads or serves a model:
# it takes the tiny model or the real GGUF, or sits in a module that builds a trained model once and
# keeps to one xdist worker (an xdist_group).
SLOW_FIXTURES = frozenset({"tiny_model_dir", "tiny_base_models", "gemma_gguf"})


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests ``slow`` (see SLOW_FIXTURES)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.slow)


# for child processes running third-party trainers (axolotl, TRL): offline, no telemetry, one
# thread each (the model is tiny; on a busy machine more threads only wait for each other)
THIRD_PARTY_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def llama_server_children() -> list[str]:
    """The command lines of this process's llama-server children."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and cmdline.endswith("llama-server"):
            found.append(cmdline)
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders (``*.tmp``, ``.tmp-*``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".tmp-"))


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves non-daemon threads running."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate()
                  if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"leaked threads: {[t.name for t in leaked]}"


@pytest.fixture
def mapping_dict() -> dict:
    from daemon.data.synthetic import MAPPING
    return dict(MAPPING)


@pytest.fixture
def synthetic_csv(tmp_path) -> Callable[..., Path]:
    """Factory: write a synthetic formatted dataset CSV of ``rows`` rows into tmp_path."""
    from daemon.data.synthetic import write_csv

    def make(rows: int = 60, name: str = "visits.csv", seed: int = 7, **kw) -> Path:
        path = tmp_path / name
        write_csv(path, rows, seed, **kw)
        return path

    return make


def mounts() -> set[str]:
    """Every mount point of this process (to check that a test left none behind)."""
    with open("/proc/self/mounts") as fh:
        return {line.split()[1] for line in fh}


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """``mount OPTIONS TARGET`` for the block (a real tmpfs or bind mount: these tests run as root,
    as CI does); unmounted afterwards, and checked to be gone."""
    subprocess.run(["mount", *options, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)
        assert str(target) not in mounts()


# an absolute path under one of this machine's top-level folders (/tmp/..., /usr/..., /home/...):
# a URL's path (/api/version) is not one
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'=(,\[])(/(?:%s)(?:/[\w.+-]+)*)(?![\w.+-])" % "|".join(
    re.escape(name) for name in sorted(os.listdir("/"), key=len, reverse=True)), re.MULTILINE)
BINARY_SUFFIXES = (".safetensors", ".png", ".bin", ".pt")


def machine_paths_in(folder: Path, *roots: str | Path) -> list[str]:
    """Where the files under ``folder`` name a folder of this machine: any of ``roots``, the
    Python environment, the home folder, the working directory, or any absolute path under a
    top-level folder of this machine (binary files are searched for the roots only). ``file: path``
    per hit."""
    import sys

    known = {str(r) for r in (*roots, sys.prefix, sys.base_prefix, Path.home(), Path.cwd()) if str(r) != "/"}
    known |= {str(Path(r).resolve()) for r in known}
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8", errors="replace")
        name = path.relative_to(folder)
        hits += [f"{name}: {root}" for root in sorted(known) if root in text]
        if not path.name.endswith(BINARY_SUFFIXES):
            hits += [f"{name}: {m}" for m in _ABSOLUTE_PATH.findall(text)]
    return hits
