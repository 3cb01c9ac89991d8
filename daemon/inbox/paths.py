"""Where the daemon keeps things: the inbox and its subfolders, the outputs, the state directory.

Relative paths are under ``paths.root``; the state directory is ``paths.state_dir``, else
``$STATE_DIRECTORY`` (systemd), else ``<root>/.fine-tuner``. Shared by the service, its job runners
and ``fine-tuner status``; nothing here touches the file system. A job's output folder is recorded
in the journal relative to the root (``recorded_output``) and found again under the current root
(``output_folder``), so that a moved or copied root reads its own folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, state_directory

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

    def recorded_output(self, folder: Path) -> str:
        """How the journal records a job's output folder: relative to the root (``outputs/<job_id>``);
        absolute only when the outputs are configured outside the root."""
        folder = Path(os.path.normpath(folder))
        root = Path(os.path.normpath(self.root))
        return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)

    def output_folder(self, recorded: str | None) -> Path | None:
        """A job's output folder under this root, from what the journal recorded: a relative path is
        under the root; an absolute one (written before paths were recorded relative, or by a root
        that was moved or copied since) is its job's folder in this root's outputs. Never a folder
        outside the outputs folder; None when nothing was recorded."""
        if not recorded:
            return None
        outputs = Path(os.path.normpath(self.outputs))
        path = Path(os.path.normpath(self.root / recorded))  # an absolute ``recorded`` stays as it is
        if path.parent == outputs:
            return path
        name = Path(recorded).name
        return outputs / name if name not in ("", ".", "..") else None


def resolve_paths(cfg: Config, env: dict[str, str] | None = None) -> Paths:
    """Where everything lives; relative paths are under ``paths.root``."""
    env = dict(os.environ) if env is None else env
    p = cfg.paths
    root = Path(p.root).absolute()
    inbox = root / p.inbox
    return Paths(root=root, inbox=inbox, outputs=root / p.outputs, processed=inbox / "processed",
                 failed=inbox / "failed", work=inbox / ".work", state_dir=state_directory(cfg, env))
