"""report.html in a real browser (headless Chromium): not blank at laptop and phone width, no console error,
the DOM holds the results table and the samples, and nothing is wider than a phone's screen (wide tables
scroll inside their own box). The report is built by `alignkit report` from a small hand-made pipeline run
dir (tests/unit/test_html_report.py's fixture), so no training runs.

Chromium is Debian's `chromium` package; when it is missing and this is root with apt, it is installed
(`apt-get install -y chromium`), else the tests skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from alignkit.report_cli import main as report_main
from tests.unit.test_html_report import make_pipeline_run


def _install_chromium() -> str | None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and this is not root with apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=command[1] == "update")
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"could not install chromium ({' '.join(command)}): {e}")
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("apt-get install -y chromium did not install chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    return shutil.which("chromium") or _install_chromium()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    run = make_pipeline_run(tmp_path_factory.mktemp("browser"), alarm=True)
    assert report_main([str(run)]) == 0
    return run / "report.html"


def _run(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with its own profile (tests may run side by side), console logged to stderr."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Lines the page wrote to the console (the report has no script, so any is an error) or uncaught errors."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.parametrize("width", [1280, 390])
def test_page_is_not_blank_at_laptop_and_phone_width(chromium: str, report_html: Path, tmp_path: Path, width: int):
    shot = tmp_path / f"report-{width}.png"
    done = _run(chromium, tmp_path, f"--screenshot={shot}", f"--window-size={width},2000", report_html.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    assert _console_errors(done.stderr) == []
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, width)
    non_white = (img.min(axis=-1) < 0.9).mean()
    assert 0.03 < non_white < 0.9 and img.std() > 0.05  # text, tables and plots drawn; not one flat colour


def test_dom_holds_the_table_the_samples_and_the_plots(chromium: str, report_html: Path, tmp_path: Path):
    done = _run(chromium, tmp_path, "--dump-dom", report_html.as_uri())
    dom = done.stdout
    assert _console_errors(done.stderr) == []
    assert '<table class="results">' in dom and "DPO beats SFT by 0.014 ± 0.006 gold at KL 0.30." in dom
    assert dom.count('<table class="samples">') == 12
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', dom)) >= 4
    assert "<script" not in dom and "&lt;script&gt;alert('x')&lt;/script&gt;" in dom  # model text stayed text
    assert 'id="curve-ppo"' in dom and "proxy_up_gold_down" in dom


def test_nothing_is_wider_than_a_phone(chromium: str, report_html: Path, tmp_path: Path):
    """At 390 px the page itself does not scroll sideways: the wide results table scrolls in its own box.
    (Measured by a test page that loads the report in a 390 px iframe; the report has no script of its own.)"""
    probe = report_html.parent / "probe.html"
    probe.write_text(
        '<!DOCTYPE html><html><body style="margin:0"><iframe id="f" src="report.html" '
        'style="width:390px;height:800px;border:0"></iframe><script>'
        'document.getElementById("f").onload = function () { var d = this.contentDocument.documentElement;'
        ' var p = document.createElement("pre"); p.id = "measure";'
        ' p.textContent = "scroll=" + d.scrollWidth + " client=" + d.clientWidth; document.body.appendChild(p); };'
        "</script></body></html>")
    done = _run(chromium, tmp_path, "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                probe.as_uri())
    found = re.search(r'<pre id="measure">scroll=(\d+) client=(\d+)</pre>', done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    scroll, client = map(int, found.groups())
    assert 300 < client <= 390 and scroll <= client
