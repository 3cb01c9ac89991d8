"""Building an output folder: under a temporary name beside its final place, published whole.

``staging`` gives the folder a job builds in (``outputs/.tmp-<name>-*``, or the final folder
itself when the caller writes in place); ``publish`` moves a complete build into place: a new
folder is renamed whole, into an existing one each file is replaced atomically; ``discard`` leaves
no half output after a failure (a trainer's folder, with its stderr log, is kept as
``failed-<name>``). ``write_metadata`` writes ``fine_tuning_metadata.json`` atomically and
``record_evaluation`` records an evaluation's summary in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .. import fsutil
from . import names


def staging(output_dir: str | os.PathLike, staged: bool) -> tuple[Path, Path]:
    """(the folder to build in, the folder to publish to); without ``staged`` both are the final
    folder, created when missing."""
    output_dir = Path(output_dir)
    if not staged:
        output_dir.mkdir(parents=True, exist_ok=True)
        return output_dir, output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    return tmp, output_dir


def publish(build_dir: Path, final_dir: Path) -> None:
    """A new folder is renamed into place whole; into an existing folder each file is replaced
    atomically (the seed wrote into a shared ``outputs/``), the metadata last."""
    if not final_dir.exists():
        fsutil.publish_dir(build_dir, final_dir)
        return
    for item in sorted(build_dir.iterdir(), key=lambda p: p.name == names.METADATA):
        target = final_dir / item.name
        if item.is_dir() and target.is_dir():
            # an adapter folder from an earlier run: keep it beside, never delete it
            os.rename(target, fsutil.unique_path(final_dir / f"{item.name}.previous"))
        os.replace(item, target)
    fsutil.fsync_dir(final_dir)
    build_dir.rmdir()


def discard(build_dir: Path) -> Path | None:
    """A failed run leaves no half output. When the trainer ran, its folder (with its stderr log)
    is kept as ``failed-<name>`` for the error message; the folder it moved to is returned."""
    if (build_dir / names.TRAINER_STDERR).exists():
        keep = fsutil.unique_path(build_dir.parent / f"failed-{build_dir.name.removeprefix('.tmp-')}")
        os.rename(build_dir, keep)
        return keep
    shutil.rmtree(build_dir, ignore_errors=True)
    return None


def write_metadata(folder: Path, meta: dict) -> Path:
    """Write ``fine_tuning_metadata.json`` atomically; its path."""
    path = Path(folder) / names.METADATA
    fsutil.write_json(path, meta)
    return path


def record_evaluation(folder: Path, meta: dict, summary: dict) -> dict:
    """Record an evaluation's summary (``evalreport.metadata_summary``) under ``evaluation`` in the
    folder's metadata, written atomically; the metadata as written."""
    meta["evaluation"] = summary
    write_metadata(folder, meta)
    return meta


__all__ = ["discard", "publish", "record_evaluation", "staging", "write_metadata"]
