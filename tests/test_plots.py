"""`dvc plots show` renders the committed plots, and headless Chromium draws every chart."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VEGA = {"vega": "vega@5", "vega-lite": "vega-lite@5", "vega-embed": "vega-embed@6"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nirvana-vega"


def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing; skip the test if that fails."""
    found = shutil.which("chromium")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and could not be installed with apt-get (needs root and Debian)")
    return found


def vega_scripts() -> list[Path]:
    """vega, vega-lite and vega-embed builds from npm, cached between runs; skip if npm cannot fetch them."""
    builds = [CACHE / "node_modules" / name / "build" / f"{name}.min.js" for name in VEGA]
    if not all(b.exists() for b in builds):
        if not shutil.which("npm"):
            pytest.skip("npm is needed to fetch vega, vega-lite and vega-embed")
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", *VEGA.values()],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"npm could not install the vega libraries: {done.stderr[-300:]}")
    return builds


def test_plots_page_draws_every_chart(tmp_path: Path) -> None:
    browser, scripts = chromium(), vega_scripts()
    repo = tmp_path / "repo"
    (repo / "plots").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.yaml", repo)  # dvc.yaml interpolates ${finetune.launch}
    for csv in (ROOT / "plots").glob("*.csv"):
        shutil.copy(csv, repo / "plots")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(
        ["dvc", "plots", "show", "--html-template", str(ROOT / "data/plots_template.html"), "-o", "page"],
        cwd=repo,
        check=True,
        env=env,
        capture_output=True,
    )
    page = repo / "page" / "index.html"
    for script in scripts:
        shutil.copy(script, page.parent)
    html = page.read_text()
    charts = len(re.findall(r'<div id = "[^"]+"', html)) or html.count("vegaEmbed(")
    assert charts == 4 and "cdn.jsdelivr" not in html

    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--allow-file-access-from-files",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    drawn = len(re.findall(r"<canvas|<svg", dom))
    assert drawn >= charts, f"{drawn} of {charts} charts drew:\n{dom[:2000]}"
