"""Safe text for messages, used by every room: ``printable`` escapes control, formatting and surrogate
characters (nothing can rewrite a terminal or a log line) and cuts a text to a limit; ``display_name``
is a file's escaped base name, never its folder; ``has_unsafe`` says whether a name holds whitespace or
such characters. Imports nothing of ours.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path


UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def printable(text: str, limit: int = 80) -> str:
    """``text`` safe to put in a message: control, formatting and surrogate characters become
    ``\\xNN``/``\\uNNNN`` escapes (nothing can rewrite a terminal or a log line); cut to ``limit``."""
    out = "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                  if unicodedata.category(c) in UNSAFE_CATEGORIES else c for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def display_name(path: str | os.PathLike) -> str:
    """A file's base name for messages: bytes that are not UTF-8 (lone surrogates from
    ``os.listdir``) become ``\\xNN``, control characters are escaped. Never the folder: a job's
    files sit in the daemon's work folder, which is nobody's business in an error."""
    name = os.fsencode(Path(path).name).decode("utf-8", errors="backslashreplace")
    return printable(name, limit=255)


def has_unsafe(text: str) -> bool:
    """Whether ``text`` holds whitespace, or control, formatting or surrogate characters."""
    return any(c.isspace() or unicodedata.category(c) in UNSAFE_CATEGORIES for c in text)
