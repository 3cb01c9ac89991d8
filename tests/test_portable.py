"""Tests for keeping this machine's paths out of published folders (daemon.portable)."""

from __future__ import annotations

import sys
from pathlib import Path

from daemon.portable import machine_roots, scrub, scrub_file, scrub_value


def test_known_folders_become_labels_the_longest_first(tmp_path):
    """The job folder is '.', a folder inside another gets its own label, the Python environment
    '<python>'; a longer name that only starts like a known folder is left alone."""
    job, weights = tmp_path / "outputs" / "job", tmp_path / "weights"
    roots = machine_roots([job], {"..": job.parent, "<base weights>": weights})
    text = (f"see {job}/trainer_stderr.log, {job.parent}/failed-job/x, {weights}, {tmp_path}/outputs/job-2 "
            f"and {sys.prefix}/lib/site.py")
    assert scrub(text, roots) == ("see ./trainer_stderr.log, ../failed-job/x, <base weights>, ../job-2 "
                                  "and <python>/lib/site.py")


def test_every_path_cuts_other_absolute_paths_but_not_urls_or_ratios():
    """With every_path, an absolute path left over keeps its last part only; a URL, a ratio and a
    label written before stay as they are."""
    text = ("/opt/x/lib/mod.py:12: Warning (/usr/lib/y.py) base=/srv/m\n"
            "21/21 [00:01<00:00] https://huggingface.co/org/m <python>/lib/a.py a / b")
    assert scrub(text, {}, every_path=True) == (
        "…/mod.py:12: Warning (…/y.py) base=…/m\n"
        "21/21 [00:01<00:00] https://huggingface.co/org/m <python>/lib/a.py a / b")


def test_relative_folders_never_match_ordinary_text(tmp_path, monkeypatch):
    """A folder given by a relative name ('.') is matched by its absolute form only: a sentence's
    full stop is not a folder."""
    monkeypatch.chdir(tmp_path)
    roots = machine_roots(["job"], {"..": "."})
    assert "." not in roots and str(tmp_path) in roots
    assert scrub(f"done. 3.5 in {tmp_path}/job/a", roots) == "done. 3.5 in ./a"


def test_values_and_files_are_scrubbed_in_place(tmp_path):
    """Every string of a JSON-like value is scrubbed (keys are not); a log file is rewritten only
    when something changed, and a missing one stays missing."""
    job = tmp_path / "job"
    roots = machine_roots([job])
    value = {str(job): [f"{job}/a", 3, {"k": f"x {job}"}], "n": None}
    assert scrub_value(value, roots) == {str(job): ["./a", 3, {"k": "x ."}], "n": None}
    log = tmp_path / "stderr.log"
    log.write_text(f"trainer: {job}/adapter\n/usr/lib/python3/x.py:1: Warning\n")
    scrub_file(log, roots)
    assert log.read_text() == "trainer: ./adapter\n…/x.py:1: Warning\n"
    scrub_file(tmp_path / "absent.log", roots)
    assert not Path(tmp_path / "absent.log").exists()
