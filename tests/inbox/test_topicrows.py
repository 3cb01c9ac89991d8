"""The topic's rows file: what a write cut short by a kill leaves behind is swept at start-up."""

from __future__ import annotations

from pathlib import Path

from daemon.inbox import topicrows
from daemon.inbox.paths import Paths


def paths_under(root: Path) -> Paths:
    return Paths(root=root, inbox=root / "inbox", outputs=root / "outputs", processed=root / "inbox" / "processed",
                 failed=root / "inbox" / "failed", work=root / "inbox" / ".work", state_dir=root / ".fine-tuner")


def test_sweep_removes_a_cut_short_write_and_keeps_the_rows_file(tmp_path):
    """A ``.NAME.jsonl.XXXX.tmp`` left by a killed write goes; the rows file itself stays as it was."""
    paths = paths_under(tmp_path)
    folder = paths.state_dir / topicrows.ROWS_DIR
    folder.mkdir(parents=True)
    kept = folder / "abc.jsonl"
    kept.write_text('{"topic": "flu"}\n')
    (folder / ".abc.jsonl.k2j4.tmp").write_text('{"topic": "fl')
    topicrows.sweep(paths)
    assert sorted(p.name for p in folder.iterdir()) == ["abc.jsonl"]
    assert kept.read_text() == '{"topic": "flu"}\n'


def test_sweep_without_a_rows_folder_creates_nothing(tmp_path):
    """A root whose jobs never recorded rows is left as it is."""
    paths = paths_under(tmp_path)
    topicrows.sweep(paths)
    assert not paths.state_dir.exists()
