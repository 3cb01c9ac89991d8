"""Fixtures for process-level tests: a tmp root with a config, drops, and daemon subprocesses.

Every daemon is started in its own process group and killed (the whole group) when the test ends,
whatever happened. Its stdout (JSON log lines) goes to a file so that a full pipe never blocks it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from daemon.data.synthetic import MAPPING, write_csv
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
MARKER = "ZZPATIENTMARKER7731"  # planted in cells; must never appear in logs or error files

BASE_CONFIG = {
    # approach model_set: no capability check (it would look for weights), so a job takes ~0.1 s
    "defaults": {"model": "no-such-model:1b", "topics": "respiratory infections", "approach": "model_set"},
    "ollama": {"register": "off"},
    "watch": {"pair_timeout_s": 1.0, "settle_s": 0.3, "rescan_s": 2.0, "workers": 2, "stop_timeout_s": 20.0},
}


class Root:
    """A daemon root folder: config, inbox, outputs, and helpers to drop files the two ways."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inbox = path / "inbox"
        self.outputs = path / "outputs"
        self.processed = self.inbox / "processed"
        self.failed = self.inbox / "failed"
        self.config = path / "config.yaml"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.write_config()

    def write_config(self, **sections: dict) -> None:
        cfg = json.loads(json.dumps(BASE_CONFIG))
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        self.config.write_text(yaml.safe_dump(cfg))

    def drop_bytes(self, name: str, data: bytes) -> Path:
        """Write-then-rename: the file appears in the inbox complete."""
        part = self.inbox / f".{name}.part"
        part.write_bytes(data)
        os.rename(part, self.inbox / name)
        return self.inbox / name

    def dataset_bytes(self, rows: int = 20, seed: int = 7, marker: bool = True) -> bytes:
        tmp = self.path / f".src-{rows}-{seed}.csv"
        write_csv(tmp, rows, seed)
        text = tmp.read_text(encoding="utf-8")
        tmp.unlink()
        if marker:
            text = text.replace("Triage note:", f"Triage note: {MARKER}")
        return text.encode("utf-8")

    def drop_dataset(self, stem: str, *, rows: int = 20, seed: int = 7, mapping: bool = True) -> None:
        if mapping:
            self.drop_bytes(f"{stem}.mapping.json", json.dumps(MAPPING).encode())
        self.drop_bytes(f"{stem}.csv", self.dataset_bytes(rows, seed))

    def folders(self, where: Path) -> list[str]:
        return sorted(p.name for p in where.iterdir()) if where.exists() else []

    def job_folders(self, where: Path, stem: str) -> list[Path]:
        """The job folders of ``stem`` in ``where`` whose files have arrived: the daemon reserves the
        folder's name (an empty folder) and then renames the finished claim onto it."""
        if not where.exists():
            return []
        return sorted(p for p in where.iterdir() if p.name.startswith(f"{stem}-") and any(p.iterdir()))

    def inputs_everywhere(self) -> list[str]:
        """Every dataset file name anywhere under the inbox (inbox, .work, processed, failed)."""
        return sorted(p.name for p in self.inbox.rglob("*.csv"))


class Daemon:
    """A running ``python -m daemon watch`` subprocess."""

    def __init__(self, root: Root, args: list[str], env: dict[str, str], log_name: str,
                 log_dir: Path | None = None) -> None:
        self.root = root
        self.log_path = (log_dir or root.path) / log_name
        self.err_path = (log_dir or root.path) / (log_name.removesuffix(".log") + ".stderr")
        self._log = open(self.log_path, "ab")
        self._err = open(self.err_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "watch", "--config", str(root.config), "--root", str(root.path), *args],
            cwd=REPO, stdout=self._log, stderr=self._err, env=env, start_new_session=True)

    def lines(self) -> list[dict]:
        """The complete log lines so far: the last one may still be being written, or was cut off
        by a kill -9, so text after the last newline is not a line yet."""
        complete = self.log_path.read_bytes().split(b"\n")[:-1]
        return [json.loads(raw.decode("utf-8")) for raw in complete if raw.strip()]

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        return wait_for(lambda: len(self.events(name)) >= count and self.events(name),
                        timeout=timeout, message=f"{count} x {name} in {self.log_path.name}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()
        self._err.close()


@pytest.fixture
def root(tmp_path) -> Root:
    return Root(tmp_path / "root")


@pytest.fixture
def start_daemon(root) -> Iterator:
    """Factory: start a daemon on ``root``; every one started is killed (process group) at the end."""
    started: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None, log_name: str | None = None,
              on: Root | None = None, log_dir: Path | None = None) -> Daemon:
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FINE_TUNER_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        full_env.update(env or {})
        d = Daemon(on or root, list(args), full_env, log_name or f"daemon-{len(started)}.log", log_dir)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def all_log_text(root: Root) -> str:
    """Every log line and every note the daemon wrote (logs, job.log, error.json, duplicate.json)."""
    parts = [p.read_text(encoding="utf-8", errors="replace") for p in root.path.glob("daemon-*.*")]
    for pattern in ("**/job.log", "**/error.json", "**/duplicate.json"):
        parts += [p.read_text(encoding="utf-8", errors="replace") for p in root.path.glob(pattern)]
    return "\n".join(parts)
