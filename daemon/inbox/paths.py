"""Where the daemon keeps things: the inbox and its subfolders, the outputs, the state directory.

Relative paths are under ``paths.root``; the state directory is ``paths.state_dir``, else
``$STATE_DIRECTORY`` (systemd), else ``<root>/.fine-tuner``. Shared by the service, its job runners
and ``fine-tuner status``; nothing here touches the file system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

JOURNAL_NAME = "journal.sqlite3"
TRAINING_LOCK = "training.lock"


@dataclass(frozen=True)
class Paths:
    root: Path
    inbox: Path
    outputs: Path
    processed: Path
    failed: Path
    work: Path
    state_dir: Path

    @property
    def journal(self) -> Path:
        return self.state_dir / JOURNAL_NAME


def resolve_paths(cfg: Config, env: dict[str, str] | None = None) -> Paths:
    """Where everything lives; relative paths are under ``paths.root``."""
    env = dict(os.environ) if env is None else env
    p = cfg.paths
    root = Path(p.root).absolute()
    inbox = root / p.inbox
    state = p.state_dir or env.get("STATE_DIRECTORY", "").split(":")[0] or ".fine-tuner"
    return Paths(root=root, inbox=inbox, outputs=root / p.outputs, processed=inbox / "processed",
                 failed=inbox / "failed", work=inbox / ".work", state_dir=root / state)
