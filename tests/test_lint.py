"""`make lint`, which `make test` runs before pytest, fails on a lint, format or type error."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint(tree: Path) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent
    return subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "lint", f"VENV={venv}"], cwd=tree, capture_output=True, text=True
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("nirvana", "stages", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "error,tool",
    [
        ("import os\n", "F401"),  # unused import: ruff check
        ("x = [1,2 ,3]\n", "would be reformatted"),  # formatting: ruff format --check
        ('\ndef f() -> int:\n    return "a"\n', "Incompatible return value type"),  # mypy
    ],
)
def test_an_error_fails(tree: Path, error: str, tool: str) -> None:
    path = tree / "nirvana" / "broken.py"
    path.write_text('"""A module with one mistake."""\n\n' + error)
    done = lint(tree)
    assert done.returncode != 0 and tool in done.stdout + done.stderr
