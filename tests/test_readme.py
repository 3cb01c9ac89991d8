"""The README stays true: every event the code logs is listed, and it speaks to users only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENT_CALL = re.compile(r"\blog\.(?:debug|info|warning|error|exception)\(\s*\"([a-z][a-z0-9_]*)\"")


def logged_events() -> set[str]:
    """Every event name a ``log.<level>("name", ...)`` call in the package logs."""
    names: set[str] = set()
    for path in (ROOT / "daemon").rglob("*.py"):
        names |= set(EVENT_CALL.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_logged_event_is_in_the_readme():
    """Each event name the code can log appears in the README (as `name`), so the list is complete."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    events = logged_events()
    assert len(events) > 50  # the scan itself works
    assert sorted(e for e in events if f"`{e}`" not in readme) == []


def test_readme_speaks_about_the_product_only():
    """No issue numbers, sessions, seed jargon or paths outside the repository in the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for pattern in (r"[Ii]ssue #?\d", r"\bsession\b", r"issues were silent", r"the seed's", r"\.\./shared"):
        assert re.search(pattern, readme) is None, pattern
