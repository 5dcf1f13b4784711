"""Plain `dvc plots show` writes a page that needs no network (.dvc/config points it at the template in data/, with
vega, vega-lite and vega-embed inlined), and headless Chromium, with every host unresolvable, draws every chart."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # `dvc plots show` and a headless browser

# What each library's bundle assigns when it loads: the globals the page's vegaEmbed calls need.
GLOBALS = [").vega={}", ").vegaLite={}", ").vegaEmbed="]


def dvc_plots() -> list[str]:
    """The names of dvc.yaml's plots: the page must embed and draw each of them."""
    return [next(iter(plot)) for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]]


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


def plots_page(tmp_path: Path) -> Path:
    """Run a bare `dvc plots show` in a copy of the repository's pipeline, DVC config, template and plot data."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the quality_bars template
    shutil.copy(ROOT / "data" / "plots_template.html", repo / "data")
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.yaml", repo)  # dvc.yaml interpolates ${finetune.launch}
    # the plot CSVs are pipeline outputs in DVC's cache (not in a fresh clone): a small set in their columns
    (repo / "plots").mkdir()
    widths = ["layer,attn_kept,attn_dense,mlp_kept,mlp_dense", "0,3,3,1200,1536", "1,2,3,1100,1536"]
    models = ["model,acc_average,ppl_wiki_128", "dense,0.45,27.2", "pruned,0.49,53.0", "finetuned,0.49,50.4"]
    (repo / "plots/widths.csv").write_text("\n".join(widths) + "\n")
    (repo / "plots/models.csv").write_text("\n".join(models) + "\n")
    shutil.copytree(ROOT / "results", repo / "results")  # benchmark curves that dvc.yaml plots too
    subprocess.run(["dvc", "plots", "show"], cwd=repo, check=True, env=env, capture_output=True)
    return repo / "dvc_plots" / "index.html"


def test_dvc_plots_show_inlines_vega_and_loads_no_script(tmp_path: Path) -> None:
    html = plots_page(tmp_path).read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.DOTALL)
    assert not [attrs for attrs, _ in scripts if "src" in attrs], "a script is loaded from elsewhere"
    assert not re.search(r"""src\s*=\s*["']?(https?:)?//""", html), "the page fetches something over the network"
    inline = "".join(body for _, body in scripts)
    assert all(name in inline for name in GLOBALS) and len(inline) > 500_000
    assert html.count("vegaEmbed(") == len(dvc_plots())


def test_plots_page_draws_every_chart_offline(tmp_path: Path) -> None:
    browser, page = chromium(), plots_page(tmp_path)
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
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves: a CDN script could not load
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    drawn, plots = len(re.findall(r"<canvas|<svg", dom)), len(dvc_plots())
    assert drawn >= plots, f"{drawn} of {plots} charts drew:\n{dom[:2000]}"
