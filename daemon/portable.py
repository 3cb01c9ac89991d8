"""Keeping the paths of this machine out of the folders that are handed on.

An output folder is meant to be copied to another machine (a bigger trainer, a colleague), so the
files published in it name their siblings relatively and never a folder of the machine that built
them: not the job's own folder, the base weights, the Python environment or a home directory.
``scrub`` rewrites the known folders into short labels (the job folder becomes ``.``) and, with
``every_path``, cuts any other absolute path down to its last part (``…/modeling_utils.py``), which
is what a third-party log such as the trainer's stderr needs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .fsutil import write_text

# An absolute path that is not part of a URL (``https://host/x``), a ratio (``21/21``) or a label
# this module wrote (``<python>/lib``): a '/' at the start or after a space, quote, bracket or '='.
_ABSOLUTE = re.compile(r"(?:^|(?<=[\s'\"(\[=,]))/(?![/\s])[^\s'\"()\[\],:;]*", re.MULTILINE)


def machine_roots(job_dirs: Iterable[str | os.PathLike] = (),
                  labelled: Mapping[str, str | os.PathLike | None] | None = None) -> dict[str, str]:
    """Folder → label: each job folder (``.``: the folder the file lies in, under any of the names
    it had while it was built), the ``labelled`` folders (label → folder, None skipped), the
    Python environment (``<python>``) and the home folder (``~``)."""
    roots: dict[str, str] = {}
    for label, folder in [*((".", d) for d in job_dirs), *(labelled or {}).items()]:
        if folder:
            roots[str(Path(folder).resolve())] = label
            if os.path.isabs(folder):  # a relative name ('.', 'outputs') would match ordinary text
                roots[str(folder)] = label
    for folder in {sys.prefix, sys.base_prefix}:
        roots.setdefault(folder, "<python>")
    home = os.path.expanduser("~")
    if home not in ("/", "~"):
        roots.setdefault(home, "~")
    return roots


def scrub(text: str, roots: Mapping[str, str], *, every_path: bool = False) -> str:
    """``text`` with each folder of ``roots`` replaced by its label (the longest folder first, so
    that a job folder inside the home folder becomes ``.`` and not ``~/...``); with ``every_path``
    any absolute path left is cut to ``…/<last part>``."""
    for folder in sorted((r for r in roots if r and r != "/"), key=len, reverse=True):
        label = roots[folder]
        text = re.sub(re.escape(folder.rstrip("/")) + r"(?![\w.-])", lambda _m, label=label: label, text)
    if every_path:
        text = _ABSOLUTE.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    return text


def scrub_value(value: Any, roots: Mapping[str, str]) -> Any:
    """A JSON-like value with every string in it scrubbed of ``roots`` (keys are left alone)."""
    if isinstance(value, str):
        return scrub(value, roots)
    if isinstance(value, Mapping):
        return {k: scrub_value(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_value(v, roots) for v in value]
    return value


def scrub_file(path: str | os.PathLike, roots: Mapping[str, str], *, every_path: bool = True) -> None:
    """Rewrite a text file (a log) scrubbed, atomically; bytes that are not UTF-8 are kept as
    replacement characters. A missing file is left missing."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return
    cleaned = scrub(text, roots, every_path=every_path)
    if cleaned != text:
        write_text(path, cleaned)
