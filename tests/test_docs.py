"""The README is a front door: short, every docs page one click from it, no link to a missing file or heading,
and the commands it gives for comparing runs print what they promise."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move depth to docs/"
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text


def test_every_docs_page_is_one_click_from_the_readme() -> None:
    linked = {(ROOT / target.split("#")[0]).resolve() for target in links(ROOT / "README.md")}
    missing = [page.name for page in (ROOT / "docs").glob("*.md") if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_no_link_points_to_a_missing_file_or_heading() -> None:
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_exp_show_line_keeps_the_method_column() -> None:
    """DVC names the method column `params.yaml:method` because metrics/plan.json has a `method` too: a `--keep`
    that says `method$` lost it, and a NIRVANA-against-FLAP table could not say which row is which."""
    (line,) = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if "dvc exp show --md" in ln]
    args = shlex.split(line)
    assert args[:3] == ["dvc", "exp", "show"]
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", *args[1:]], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    header = [cell.strip() for cell in shown.splitlines()[0].strip("|").split("|")]
    assert header == ["Experiment", "metrics/pruned.json:ppl_wiki_128", "params.yaml:method", "sparsity"], shown[:500]
    assert any("nirvana" in row for row in shown.splitlines()[2:]), shown[:500]


def test_every_stage_command_in_the_docs_is_the_one_dvc_runs() -> None:
    """A `python stages/<name>.py ...` line (with its continuation) in a page is that stage's dvc.yaml `cmd`,
    so a reader who runs it by hand gives the script every path it expects."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    commands = [" ".join(stage.get("do", stage)["cmd"].split()) for stage in stages]
    written = [
        " ".join(match.group(1).replace("\\\n", " ").split())
        for page in PAGES
        for match in re.finditer(r"^ +(python stages/\w+\.py(?:.*\\\n)*.*)$", page.read_text(), re.MULTILINE)
    ]
    assert written, "no stage command in the docs: this test would check nothing"
    wrong = [command for command in written if command not in commands]
    assert not wrong, f"not a dvc.yaml cmd: {wrong}"
