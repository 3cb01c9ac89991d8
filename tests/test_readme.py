"""The README and the docs/ pages stay true: every event the code logs is on the log events page, the
module map matches the package, and they speak to users only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def page(name: str) -> str:
    """A docs/ page's text."""
    return (DOCS / name).read_text(encoding="utf-8")


def every_document() -> dict[str, str]:
    """The README and every docs/ page, by name."""
    return {"README.md": (ROOT / "README.md").read_text(encoding="utf-8"),
            **{f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))}}
EVENT_CALL = re.compile(r"\blog\.(?:debug|info|warning|error|exception)\(\s*\"([a-z][a-z0-9_]*)\"")


def logged_events() -> set[str]:
    """Every event name a ``log.<level>("name", ...)`` call in the package logs."""
    names: set[str] = set()
    for path in (ROOT / "daemon").rglob("*.py"):
        names |= set(EVENT_CALL.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_logged_event_is_on_the_log_events_page():
    """Each event name the code can log appears on docs/logs.md (as `name`), so the list is complete."""
    readme = page("logs.md")
    events = logged_events()
    assert len(events) > 50  # the scan itself works
    assert sorted(e for e in events if f"`{e}`" not in readme) == []


def test_the_documents_speak_about_the_product_only():
    """No issue numbers, sessions, seed jargon or paths outside the repository in the README or a page."""
    for name, text in every_document().items():
        for pattern in (r"[Ii]ssue #?\d", r"\bsession\b", r"issues were silent", r"the seed's", r"\.\./shared"):
            assert re.search(pattern, text) is None, (name, pattern)


def test_readme_names_debian_packages_and_what_make_run_installs():
    """The quick start names the Debian 12 packages to install first, and the README (and the design
    page) say which
    extras `make run` installs: exactly the Makefile's EXTRAS, which its run target installs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert ("run: $(STAMP)" in makefile, "$(call install,$(EXTRAS))" in makefile) == (True, True)
    extras = re.search(r"^EXTRAS\s*:=\s*(\S+)$", makefile, re.M).group(1).split(",")
    [run_line] = [line for line in readme.splitlines() if line.startswith("make run ")]
    assert re.search(r"installs the package with its (.+) extras", run_line).group(1) == " and ".join(extras)
    named = " and ".join(f"`{e}`" for e in extras)
    assert f"`make run` installs\n  the package with its {named} extras" in page("design.md")
    assert ("`sudo apt install python3-venv git make`" in readme, "`sudo apt install g++ cmake`" in readme) == (
        True, True)


def test_the_module_map_names_every_module_of_each_room():
    """The module map (docs/design.md) has a row for each subpackage and lists exactly the modules each
    holds (and the top level's)."""
    readme = page("design.md")
    table = readme[readme.index("### Module map"):]
    listed: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 3 and ("daemon/" in cells[1] or "top level" in cells[1]):
            room = cells[1].strip().strip("`").removeprefix("daemon/").rstrip("/") if "daemon/" in cells[1] else ""
            listed.setdefault(room, set()).update(re.findall(r"`([a-z_0-9]+)`", cells[2]))
    package = ROOT / "daemon"
    rooms = ["", *sorted(p.parent.name for p in package.glob("*/__init__.py"))]  # every subpackage has a row
    assert sorted(listed) == rooms
    for room in rooms:
        present = {p.stem for p in (package / room).glob("*.py") if p.stem != "__init__"}
        assert listed.get(room) == present, room or "top level"


def _quick_start_config() -> str:
    """The YAML block of the README's quick start without Ollama, as written there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Without Ollama", 1)[1].split("\n## ", 1)[0]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_quick_start_without_ollama_config_means_what_the_readme_says(tmp_path, gemma_gguf):
    """The README's five-line config, saved as config.yaml in a folder, is found by the commands run
    there without --config; its model is the base model, whose weights `check` takes from that GGUF
    file and not from Ollama."""
    import json
    import os
    import subprocess
    import sys

    text = _quick_start_config()
    assert len(text.splitlines()) == 5
    [path] = re.findall(r"^  gemma3:270m: (\S+\.gguf)$", text, flags=re.M)
    (tmp_path / "config.yaml").write_text(text.replace(path, str(gemma_gguf)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNER_OLLAMA__HOST": "http://127.0.0.1:9",
           "FINE_TUNER_OLLAMA__RETRIES": "0"}
    env.pop("FINE_TUNER_CONFIG", None)

    def command(*args: str) -> dict:
        res = subprocess.run([sys.executable, "-m", "daemon", *args, "--json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode in (0, 1), res.stderr
        return json.loads(res.stdout)

    shown = command("config", "--show")
    settings = {s["key"]: (s["value"], s["source"]) for s in shown["settings"]}
    where = f"file {tmp_path / 'config.yaml'}"
    assert (shown["file"], shown["found_by"]) == (str(tmp_path / "config.yaml"), "root")
    assert settings["defaults.model"] == ("gemma3:270m", where)
    assert settings["defaults.topics"] == ("respiratory infections", where)
    assert settings["base_models.gemma3:270m"] == (str(gemma_gguf), where)
    facts = command("check", "gemma3:270m")["facts"]
    assert (facts["weights_source"], facts["weights_architecture"], facts["weights_quantization"]) == (
        "gguf file", "gemma3", "Q4_K_M")
