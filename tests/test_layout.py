"""The package's rooms and their import rule, read from the source with ``ast``.

A room imports only the rooms before it in the order a job passes through them (base modules, data,
outputs, training, serving, quality, fine_tuner, inbox, cli); each room's ``__init__`` states the same
rule. ``outputs`` owns the output folder (its file names, its one reader, building and publishing it):
it comes right after ``data`` so that every room which writes or reads the folder can import it, and
it imports only the base modules and ``data`` (the prompt template it reads back).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon"
BASE = ("errors", "text", "fsutil", "portable", "logconfig", "config", "llamacpp")
ORDER = ["base", "data", "outputs", "training", "serving", "quality", "fine_tuner", "inbox", "cli"]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    """The room of a ``daemon.*`` module: its subpackage, ``base`` or its own name at the top level."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "cli"  # daemon/__init__.py is the facade: it may reach FineTuner and the capability report
    return "base" if parts[1] in BASE else parts[1]


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every ``daemon`` module (or package) the file imports, anywhere in it (lazy imports included)."""
    module = module_name(path, package)
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "daemon"}
        elif isinstance(node, ast.ImportFrom):
            parts = here.split(".")
            target = (".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                      if node.level else node.module or "")
            if target.split(".")[0] != "daemon":
                continue
            for alias in node.names:  # "from .data import prompts" imports the module daemon.data.prompts
                candidate = package.parent.joinpath(*target.split("."), alias.name)
                found.add(f"{target}.{alias.name}" if candidate.with_suffix(".py").exists() or candidate.is_dir()
                          else target)
    return found


def defined_names(module_file: Path) -> set[str]:
    """Top-level names a module defines (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names |= {e.id for e in elements if isinstance(e, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def missing_imports(package: Path = PACKAGE) -> list[str]:
    """``from <our module> import name`` where ``name`` is neither a submodule nor defined there
    (a lazy import left pointing at a module's old room fails only when it runs)."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            parts = here.split(".")
            target = (".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                      if node.level else node.module or "")
            if target.split(".")[0] != "daemon":
                continue
            base = package.parent.joinpath(*target.split("."))
            source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if not source.is_file():
                missing.append(f"{module} imports from {target}, which does not exist")
                continue
            defined = defined_names(source)
            for alias in node.names:
                sub = base / alias.name
                if not (sub.with_suffix(".py").is_file() or sub.is_dir() or alias.name in defined
                        or "__getattr__" in defined or alias.name == "*"):
                    missing.append(f"{module} imports {alias.name} from {target}, which has none")
    return missing


def test_every_import_of_ours_names_something_that_exists():
    """Lazy imports inside functions are checked too: each names a real module or a defined name."""
    assert missing_imports() == []


def broken_rules(package: Path = PACKAGE) -> list[str]:
    """One line per import that reaches a later room than its module's own."""
    broken = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        room = room_of(module)
        for target in sorted(imports_of(path, package) - {"daemon"}):
            other = room_of(target)
            if module == "daemon.errors" or ORDER.index(other) > ORDER.index(room):
                broken.append(f"{module} ({room}) imports {target} ({other})")
    return broken


def test_every_import_follows_the_room_order():
    """No module imports a room after its own (no upward import)."""
    assert broken_rules() == []


def package_copy(tmp_path) -> Path:
    """A copy of the package's modules under ``tmp_path`` (to plant a broken import in)."""
    copy = tmp_path / "daemon"
    for path in PACKAGE.rglob("*.py"):
        dest = copy / path.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return copy


def test_the_rule_check_can_fail(tmp_path):
    """A data module importing the Ollama client is reported: the check reads real imports."""
    copy = package_copy(tmp_path)
    prompts = copy / "data" / "prompts.py"
    prompts.write_text(prompts.read_text(encoding="utf-8") + "\n\ndef _f():\n    from ..serving import ollama\n",
                       encoding="utf-8")
    assert broken_rules(copy) == ["daemon.data.prompts (data) imports daemon.serving.ollama (serving)"]


@pytest.mark.parametrize("room", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_room_says_what_it_owns_and_may_import(room):
    """Each subpackage's docstring names its modules and its import rule."""
    doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = sorted(p.stem for p in (PACKAGE / room).glob("*.py") if p.stem != "__init__")
    assert [m for m in modules if f"``{m}``" not in doc] == []
    assert "may import" in doc.lower()


def test_errors_imports_nothing_of_ours():
    """The exception family stands alone, so every room can import it."""
    assert imports_of(PACKAGE / "errors.py") == set()


def import_cycle(package: Path = PACKAGE) -> list[str] | None:
    """One circle in the import graph of our modules (lazy imports included): the modules around
    it, the first repeated at the end; None when there is none."""
    graph = {module_name(p, package): imports_of(p, package) - {"daemon"} for p in sorted(package.rglob("*.py"))}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_no_modules_import_each_other():
    """No two modules import each other, directly or around a longer circle: what both need lives
    in a module of its own (a room's order alone does not forbid a circle inside a room)."""
    assert import_cycle() is None


def test_the_cycle_check_can_fail(tmp_path):
    """The agreement statistics importing the confidence module, which imports them, is reported."""
    copy = package_copy(tmp_path)
    agreement = copy / "quality" / "agreement.py"
    agreement.write_text(agreement.read_text(encoding="utf-8") + "\n\ndef _f():\n    from . import confidence\n",
                         encoding="utf-8")
    assert import_cycle(copy) == ["daemon.quality.agreement", "daemon.quality.confidence", "daemon.quality.agreement"]
