"""Where the daemon keeps things: a job's output folder as the journal records it and as it is
found again under the current root."""

from __future__ import annotations

from pathlib import Path

from daemon.config import load_config
from daemon.inbox.paths import resolve_paths


def _paths(root: str, **paths: str):
    return resolve_paths(load_config(None, {}, {"paths": {"root": root, **paths}}), env={})


def test_an_output_folder_is_recorded_relative_to_the_root_and_found_under_the_current_one():
    """outputs/<job_id> is recorded relative to the root and read back under whichever root reads
    it; outputs configured outside the root are recorded absolute and read where they are."""
    old, new = _paths("/srv/a"), _paths("/srv/b")
    assert old.recorded_output(old.outputs / "j1") == "outputs/j1"
    assert new.output_folder("outputs/j1") == Path("/srv/b/outputs/j1")
    apart = _paths("/srv/a", outputs="/data/outputs")
    assert apart.recorded_output(apart.outputs / "j1") == "/data/outputs/j1"
    assert apart.output_folder("/data/outputs/j1") == Path("/data/outputs/j1")
    assert new.output_folder(None) is None


def test_a_recorded_path_outside_the_outputs_is_read_as_its_job_folder_under_them():
    """An absolute path of another root (one moved or copied since) or anything else outside the
    outputs folder is read as the folder of that name in this root's outputs, never where it points."""
    paths = _paths("/srv/b")
    assert [paths.output_folder(p) for p in ("/srv/a/outputs/j1", "/etc/passwd", "outputs/../../etc/j2",
                                             "outputs/j3/deeper", "/srv/b/outputs/..", "..")] == [
        Path("/srv/b/outputs/j1"), Path("/srv/b/outputs/passwd"), Path("/srv/b/outputs/j2"),
        Path("/srv/b/outputs/deeper"), None, None]
