"""The bench/ scripts stay runnable: every name they import from the package exists (a script left
behind by a move into rooms fails here, not when someone runs it)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def _imported(script: Path) -> list[tuple[str, str]]:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "daemon"
            for alias in node.names]


def _exists(module: str, name: str) -> bool:
    loaded = importlib.import_module(module)
    if hasattr(loaded, name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_every_name_a_bench_script_imports_from_the_package_exists(script):
    """Each ``from daemon... import name`` of the script names a module or an attribute that exists."""
    imported = _imported(script)
    assert [f"{m}.{n}" for m, n in imported if not _exists(m, n)] == []


def test_the_scan_sees_the_scripts_imports():
    """The scan itself works: the benches import the package."""
    assert len(SCRIPTS) >= 6 and sum(len(_imported(s)) for s in SCRIPTS) > 10
