"""The HTML page of ``fine-tuner report`` in a real browser: headless Chromium (``make chromium``
installs it) renders the page the command wrote for real jobs, as a screenshot and as its DOM."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from daemon.config import load_config
from daemon.text import printable
from daemon.inbox import history
from tests.inbox.history_jobs import JOBS, PlannedJob, build_history

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
HOSTILE = PlannedJob('<img src=x onerror="document.title=1">\u202e-20260615T090000-0badf00d',
                     "<script>document.title=2</script>", 60, 0.0, "2026-06-15T09:00:00.000+00:00", evaluated=False)
CHART_BLUE = (31, 95, 191)  # the new model's line, #1f5fbf
DARKEST_BLUE = (8, 48, 107)  # matplotlib's Blues at its top: the fullest cell of a confusion matrix
# written into a copy of the page (the page itself allows no script) to read what the browser made of it
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    rows: document.querySelectorAll("#jobs tbody tr[data-job]").length,
    jobs: [...document.querySelectorAll("#jobs td.job")].map(td => td.textContent),
    images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    points: document.querySelectorAll("svg circle").length,
    scripts: document.scripts.length, title: document.title,
    fits: document.getElementById("jobs").getBoundingClientRect().right <= document.documentElement.clientWidth});
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The page `fine-tuner report --format html --output FILE` wrote for the real jobs (and one
    with a hostile id and topic), and the rows it shows."""
    root = tmp_path_factory.mktemp("report")
    build_history(root, (*JOBS, HOSTILE))
    out = root / "report.html"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINE_TUNER_")} | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "daemon", "report", "--root", str(root), "--format", "html",
                          "--output", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stderr) == (0, "")
    return out, history.report_rows(load_config(None, {}, {"paths": {"root": str(root)}}))


def chromium(workdir: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium with a profile of its own in ``workdir``; its stdout. It runs in its
    own process group, killed whole afterwards, so no helper process outlives the test."""
    assert CHROMIUM.exists(), "Chromium is missing: run `make chromium`"
    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={workdir / 'profile'}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, proc.returncode
    return out


def test_screenshot_shows_the_chart_the_table_and_the_confusion_matrices(page, tmp_path):
    """Chromium renders the page to a full screenshot holding the chart's line colour and the
    darkest cell colour of a confusion matrix, with the variety of colours of a real page."""
    path, _ = page
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,3200", "--hide-scrollbars", path.as_uri())
    with Image.open(shot) as image:
        image.verify()
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = {c for _, c in rgb.getcolors(maxcolors=1 << 22)}
        assert rgb.size == (1280, 3200)
    assert len(colours) > 1000
    assert (CHART_BLUE in colours, DARKEST_BLUE in colours) == (True, True)


def test_the_browser_loads_every_image_and_runs_no_markup_from_the_data(page, tmp_path):
    """In the browser's DOM: a table row per report row, every confusion matrix decoded at its
    size, a chart point per model and job, the hostile job id shown as text, no script but the probe
    (the hostile topic's <script> and the id's <img onerror> are text), and the table within the
    window's width."""
    path, rows = page
    probe = tmp_path / "probe.html"
    text = path.read_text(encoding="utf-8")
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
                     .replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=10000", "--window-size=1280,3200", probe.as_uri())
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    sizes = []
    for job in (j for j in JOBS if j.evaluated):
        with Image.open(path.parent / "outputs" / job.job_id / "confusion_matrix.png") as image:
            sizes.append([True, *image.size])
    assert found == {"rows": len(rows), "jobs": [j.job_id for j in JOBS] + [printable(HOSTILE.job_id)],
                     "images": sizes, "points": 2 * 3 + 2, "scripts": 1, "title": "Model quality over time",
                     "fits": True}
