"""The documentation site builds strictly, every page is reachable, and a broken link fails the build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 300


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``, as ``make docs`` runs it."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def nav_pages() -> list[str]:
    """The pages the site's navigation lists, in order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [next(iter(entry.values())) for entry in config["nav"]]


def test_the_site_builds_strictly_with_every_page(tmp_path):
    """The strict build passes and writes one HTML page per topic page, each with its own title."""
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    for page in nav_pages():
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        title = re.search(r"^# (.+)$", (DOCS / page).read_text(encoding="utf-8"), re.M).group(1)
        assert title.replace("`", "") in re.sub("<[^>]+>", "", html.read_text(encoding="utf-8")), page


def test_every_page_is_in_the_nav_and_the_readme_points_at_each():
    """No page is left out of the navigation, and the README's reading list links every topic page."""
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav_pages()) == pages
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert sorted(set(re.findall(r"\]\(docs/([a-z_]+\.md)", readme))) == sorted(p for p in pages if p != "index.md")
    assert len(readme.splitlines()) <= README_MAX_LINES


def test_a_broken_link_or_a_missing_page_fails_the_build(tmp_path):
    """A link to a page that does not exist, or to an anchor a page lacks, fails the strict build
    with a line naming it."""
    for broken in ("[gone](no-such-page.md)", "[gone](quality.md#no-such-section)"):
        copy = tmp_path / broken[8:14].replace(".", "_")
        shutil.copytree(DOCS, copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        with open(copy / "docs" / "inbox.md", "a", encoding="utf-8") as fh:
            fh.write(f"\nSee {broken}.\n")
        done = build(copy / "mkdocs.yml", copy / "site")
        assert done.returncode != 0
        target = broken[broken.index("(") + 1:-1]
        assert target.split("#")[-1] in done.stderr, done.stderr[-2000:]
